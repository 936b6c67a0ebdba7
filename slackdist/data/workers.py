"""Channels in parallel: `prepare` hands channels to forked worker processes and merges in channel order.

Each worker opens the export itself and runs :func:`~slackdist.data.channel.run_channel` on the
channels it is given; the parent re-orders the results by channel index, so the output is the same
whatever the number of workers or the order they finish in.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from multiprocessing.connection import Connection, wait
from typing import Any

from slackdist.data.channel import ChannelResult, Job, run_channel
from slackdist.data.interrupts import interrupts_deferred
from slackdist.data.report import import_plotting
from slackdist.errors import SlackdistError
from slackdist.slack.days import count_day_files
from slackdist.slack.export import ExportSource, open_export


def _worker_main(job: Job, conn: Connection) -> None:
    """A forked worker: reads the channels whose indices the parent sends, sends back each result."""
    # Ctrl-C reaches every process of the terminal's process group; only the parent handles it (it stops
    # the workers), so no worker prints a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ends it; not the clean-up handler it was forked with
    with ExitStack() as stack:
        try:  # each worker opens the export itself: a zip's file handle must not be shared by processes
            src, failure = stack.enter_context(open_export(job.export)), None
        except Exception as e:  # noqa: BLE001 - sent back as the answer to every channel
            src, failure = None, e
        try:
            while (index := conn.recv()) is not None:
                try:
                    if failure is not None:
                        raise failure
                    reply: tuple[bool, Any] = (True, run_channel(job, src, index))
                except Exception as e:  # noqa: BLE001 - re-raised in the parent
                    reply = (False, e)
                conn.send(reply)
        except EOFError:  # the parent is gone
            pass


@contextmanager
def channel_results(job: Job, src: ExportSource, workers: int) -> Iterator[Iterator[ChannelResult]]:
    """Channel results as they finish: in-process (in channel order), or from forked worker processes.

    Each worker has its own pipe (not ``multiprocessing.Pool``: its workers share a result-queue lock,
    and a worker stopped while holding it left ``Pool.terminate()`` waiting for it forever). Leaving the
    block (done, an error, Ctrl-C) stops the workers and waits for them, so nothing writes into the
    temporary folder once the caller removes it.
    """
    n = len(job.channels)
    if workers <= 1 or n <= 1 or "fork" not in mp.get_all_start_methods():
        yield (run_channel(job, src, index) for index in range(n))
        return
    # Biggest channels first (most day files; no stat() of every file): a big channel started last
    # would leave the other workers idle at the end.
    sizes = [count_day_files(src, [channel]) for channel in job.channels]
    order = sorted(range(n), key=lambda i: (-sizes[i], i))
    context = mp.get_context("fork")
    procs: list[Any] = []
    conns: list[Connection] = []
    try:
        with interrupts_deferred():  # a Ctrl-C while forking is raised once every worker is recorded
            for _ in range(min(workers, n)):
                mine, theirs = context.Pipe()
                proc = context.Process(target=_worker_main, args=(job, theirs), daemon=True)
                proc.start()
                theirs.close()
                procs.append(proc)
                conns.append(mine)
        yield _hand_out(job, conns, order, plots=job.parts is not None)
    finally:
        for proc in procs:
            if proc.is_alive():
                # SIGKILL, not SIGTERM: a worker forked while the parent held SIGTERM (interrupts_deferred)
                # has that holding handler until its first line runs, and would swallow a SIGTERM. It has
                # nothing to clean up: its part files are in the temporary folder the parent removes.
                proc.kill()
        for proc in procs:
            proc.join()
        for conn in conns:
            conn.close()


def _hand_out(job: Job, conns: list[Connection], order: list[int], plots: bool) -> Iterator[ChannelResult]:
    """Give each worker a channel, and the next one each time it answers, until all are done.

    Raises:
        SlackdistError: a worker process stopped without answering (killed, out of memory).
    """
    todo = iter(order)
    busy: dict[Connection, int] = {}

    def give(conn: Connection) -> None:
        index = next(todo, None)
        _pipe(job, conn.send, index)  # None: nothing left, exit
        if index is None:
            busy.pop(conn, None)
        else:
            busy[conn] = index

    for conn in conns:
        give(conn)
    done, idle_at = 0, len(order) - len(conns) + 1
    while busy:
        for conn in wait(list(busy)):
            ok, payload = _pipe(job, conn.recv)
            give(conn)  # the next channel before this result is merged: the worker keeps busy
            if not ok:
                raise payload
            done += 1
            if done == idle_at and plots:
                # Fewer channels left than workers: a core is idle now, so pay the plots' slow
                # matplotlib import here instead of after the last channel.
                import_plotting()
            yield payload


def _pipe(job: Job, op: Any, *args: Any) -> Any:
    """One send or receive on a worker's pipe; a closed pipe means the worker is gone."""
    try:
        return op(*args)
    except (EOFError, OSError) as e:
        raise SlackdistError(
            f"{job.export}: a worker process stopped unexpectedly (killed, or out of memory?); run again, "
            "or with --workers 1"
        ) from e


def in_channel_order(results: Iterator[ChannelResult], bar: Any) -> Iterator[ChannelResult]:
    """Results re-ordered by channel index (so the output does not depend on the schedule).

    The progress bar moves as each channel finishes, whatever its place in the order.
    """
    pending: dict[int, ChannelResult] = {}
    wanted = 0
    for result in results:
        bar.update(result.report.day_files)
        pending[result.index] = result
        while wanted in pending:
            yield pending.pop(wanted)
            wanted += 1
