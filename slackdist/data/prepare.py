"""`slackdist prepare EXPORT --out DIR`: a Slack export becomes train/validation/test JSONL and a report.

Streams the export channel by channel, day file by day file: read -> clean -> redact -> group ->
window -> record -> split. Everything is written into ``DIR.tmp-XXXX`` next to DIR and moved into
place at the end, so an error leaves nothing behind and DIR never holds half-written files.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import IO, Any

from slackdist.config import Config, DataConfig, split_fractions
from slackdist.data.card import write_dataset_card
from slackdist.data.conversations import ChannelGrouper, Conversation, Post
from slackdist.data.records import (
    SPLIT_NAMES,
    PersonaMatcher,
    RecordBuilder,
    group_of,
    hash_split,
    load_token_counter,
    time_split,
)
from slackdist.data.report import (
    ReportBuilder,
    import_plotting,
    percent,
    render_markdown,
    report_json,
    write_plots,
)
from slackdist.errors import SlackdistError
from slackdist.slack.export import (
    Channel,
    ExportSource,
    Message,
    UserInfo,
    Warnings,
    channel_named,
    count_day_files,
    count_messages,
    drop_reason,
    iter_messages,
    list_channels,
    load_users,
    open_export,
)
from slackdist.slack.markup import MarkupContext, clean_text, code_blocks, decode_entities, format_reactions
from slackdist.slack.redact import Redactor

OUTPUT_FILES = tuple(f"{name}.jsonl" for name in SPLIT_NAMES) + ("report.json", "report.md", "README.md")
# Same bytes as json.dumps(record, ensure_ascii=False); one encoder instead of a new one per record.
_RECORD_ENCODER = json.JSONEncoder(ensure_ascii=False)


@dataclass
class Report:
    """What `prepare` produced: the report dict (as in report.json) and where the files went."""

    data: dict[str, Any]
    out_dir: Path | None

    @property
    def quality(self) -> dict[str, Any]:
        return self.data["quality"]

    @property
    def totals(self) -> dict[str, Any]:
        return self.data["totals"]

    def markdown(self) -> str:
        return render_markdown(self.data)


# ---------------------------------------------------------------- cleaning


class Cleaner:
    """Raw Message -> cleaned, redacted Post (mentions, links, emoji, files, reactions, speaker name)."""

    def __init__(self, cfg: DataConfig, ctx: MarkupContext, redactions: Counter) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.redactor = Redactor(keep_emails=cfg.keep_emails, keep_phones=cfg.keep_phones)
        self.redactions = redactions
        self._names: dict[str, tuple[str, Counter]] = {}  # display name -> (redacted, what was redacted)

    def __call__(self, msg: Message) -> Post | None:
        """The post of a human message, or None when nothing is left after cleaning."""
        raw = msg.text
        text = clean_text(raw, self.ctx).strip() if raw else ""
        reactions = msg.reactions if self.cfg.reactions else None
        if msg.files or reactions:
            parts = [text] if text else []
            # A legacy file_share's text already says "uploaded a file: <url|name>": name each file once.
            parts += [f"[file: {name}]" for name in dict.fromkeys(msg.files) if name not in text]
            if reactions:
                line = format_reactions(reactions, self.cfg.min_reaction_count, self.cfg.emoji_unicode)
                if line:
                    parts.append(line)
            text = "\n".join(parts)
        if not text:
            return None
        full = self.redactor.redact_into(text, self.redactions)
        code: tuple[str, ...] = ()
        changed: tuple[bool, ...] = ()
        if "```" in raw:
            # What the report checks the records against: each block as written, entities decoded,
            # before redaction (a block that held a secret is then reported as changed, "redacted").
            code = tuple(decode_entities(b) for b in code_blocks(raw))
            changed = tuple(self.redactor.redact(b)[0] != b for b in code)
        # The display name goes through the same redactor (an e-mail or phone number as a name).
        name = self._names.get(msg.user_name)
        if name is None:
            name = self._names[msg.user_name] = self.redactor.redact(msg.user_name)
        if name[1]:
            self.redactions.update(name[1])
        return Post.from_message(msg, full, code, name[0], changed)


def resolve_persona(name: str, users: dict[str, UserInfo]) -> PersonaMatcher:
    """``--as NAME``: the user ids whose id, display, real or user name is NAME (case-insensitive)."""
    key = name.strip().lstrip("@").casefold()
    ids = frozenset(
        u.id
        for u in users.values()
        if key in {n.casefold() for n in (u.id, u.name, u.real_name, u.display_name, u.username) if n}
    )
    return PersonaMatcher(name.strip().lstrip("@"), ids)


# ---------------------------------------------------------------- output


class PartWriter:
    """Writes one channel's records: straight into its split (hash) or into a spool (time).

    Each channel writes its own part files (``parts/<channel index>.<split>.jsonl``), so channels
    can be processed in parallel and still be joined in a fixed order; on a dry run it only counts.
    """

    def __init__(
        self, parts: Path | None, index: int, fractions: tuple[float, float, float], by: str, seed: int
    ):
        self.parts, self.index, self.fractions, self.by, self.seed = parts, index, fractions, by, seed
        self.counts = [0, 0, 0]
        self.starts: dict[str, float] = {}  # time split: conversation group -> start
        self.group_records: Counter = Counter()
        self._group_split: dict[str, int] = {}
        self._files: dict[str, IO[str]] = {}

    def _file(self, suffix: str) -> IO[str] | None:
        if self.parts is None:
            return None
        fh = self._files.get(suffix)
        if fh is None:
            fh = self._files[suffix] = open(self.parts / f"{self.index:06d}.{suffix}", "w", encoding="utf-8")  # noqa: SIM115
        return fh

    def add(self, record: dict[str, Any]) -> None:
        group = group_of(record)
        if self.by == "time":
            start = record["meta"]["start"]
            if start < self.starts.get(group, float("inf")):
                self.starts[group] = start
            self.group_records[group] += 1
            groups = self._file("groups")  # the join reads each line's group here, not by parsing the line
            if groups is not None:
                groups.write(group + "\n")
            suffix = "spool"
        else:
            split = self._group_split.get(group)
            if split is None:
                split = self._group_split[group] = hash_split(group, self.fractions, self.seed)
            self.counts[split] += 1
            suffix = SPLIT_NAMES[split]
        fh = self._file(suffix)
        if fh is not None:
            fh.write(_RECORD_ENCODER.encode(record) + "\n")

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()


class PartJoiner:
    """Concatenates the channels' part files, in channel order, into DIR/{train,validation,test}.jsonl.

    With the hash split a channel's part files are final once the channel is done, so they are appended
    as the results arrive in channel order, while the workers are still busy (the main process is idle
    then) instead of after the last channel. The time split needs every conversation's start first.
    """

    def __init__(self, tmp: Path, by: str) -> None:
        self.parts, self.by = tmp / "parts", by
        self.outs = [open(tmp / f"{name}.jsonl", "wb") for name in SPLIT_NAMES]  # noqa: SIM115
        self.joined = 0  # channels appended so far (hash split)

    def add(self, index: int) -> None:
        """Channel ``index`` is done, and so is every channel before it."""
        if self.by == "time":
            return
        assert index == self.joined
        for split, name in enumerate(SPLIT_NAMES):
            part = self.parts / f"{index:06d}.{name}"
            if part.exists():  # bytes straight from the part file: no decoding and re-encoding
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, self.outs[split], 1 << 20)
                part.unlink()
        self.joined += 1

    def finish(self, n_channels: int, fractions, starts: dict[str, float]) -> None:
        """Join what is left (every channel with the time split) and close the outputs."""
        if self.by == "time":
            assign = time_split(starts, fractions)
            for index in range(n_channels):
                spool = self.parts / f"{index:06d}.spool"
                if spool.exists():
                    with open(spool, "rb") as f, open(self.parts / f"{index:06d}.groups", "rb") as g:
                        for line, group in zip(f, g, strict=True):
                            self.outs[assign[group[:-1].decode("utf-8")]].write(line)
        else:
            for index in range(self.joined, n_channels):
                self.add(index)
        self.close()
        shutil.rmtree(self.parts)

    def close(self) -> None:
        for fh in self.outs:
            fh.close()


def _make_temp_dir(out: Path) -> tuple[Path, list[Path]]:
    """``OUT.tmp-XXXX`` next to OUT; also returns the parent folders it had to create."""
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for folder in reversed(created):
        folder.mkdir()
    return Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent)), created


def _install(tmp: Path, out: Path) -> None:
    """Move the finished files into place: the folder itself when new, else file by file (each atomic)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    for path in sorted(tmp.iterdir()):
        os.replace(path, out / path.name)
    tmp.rmdir()


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SlackdistError(f"{out}: --out must be a folder, and this is a file")


# ---------------------------------------------------------------- one channel (in-process or in a worker)


@dataclass
class _Job:
    """What processing a channel needs; shared with worker processes by fork."""

    export: Path
    cfg: DataConfig
    users: dict[str, UserInfo]
    channels: list[Channel]
    builder: RecordBuilder
    workspace: str
    parts: Path | None
    fractions: tuple[float, float, float]


@dataclass
class ChannelResult:
    """One channel's counts, warnings and split bookkeeping (its records are in its part files)."""

    index: int
    report: ReportBuilder
    warnings: Warnings
    counts: list[int]
    starts: dict[str, float]
    group_records: Counter


def run_channel(job: _Job, src: ExportSource, index: int) -> ChannelResult:
    """Read, clean, group and write one channel.

    Every channel starts from the export's users (names learnt from ``user_profile`` stay within the
    channel), so the output does not depend on channel order or on the number of workers.
    """
    cfg = job.cfg
    channel = job.channels[index]
    users = dict(job.users)
    ctx = MarkupContext.from_users(users, job.channels, emoji_unicode=cfg.emoji_unicode)
    report = ReportBuilder(
        export=src.name, workspace=job.workspace, persona_mode=job.builder.persona_mode, preview=cfg.preview
    )
    warnings = Warnings()
    cleaner = Cleaner(cfg, ctx, report.redactions)
    writer = PartWriter(job.parts, index, job.fractions, cfg.split_by, cfg.seed)
    keep = _Keep(cfg.include_bots, cfg.include_bots and channel_named(channel, cfg.channels))
    try:
        for conv in _channel_conversations(src, channel, users, warnings, cleaner, report, keep):
            _emit(conv, job.builder, report, writer)
    finally:
        writer.close()
    return ChannelResult(index, report, warnings, writer.counts, writer.starts, writer.group_records)


def _worker_main(job: _Job, conn: Connection) -> None:
    """A forked worker: reads the channels whose indices the parent sends, sends back each result."""
    # Ctrl-C reaches every process of the terminal's process group; only the parent handles it (it stops
    # the workers), so no worker prints a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
def _channel_results(job: _Job, src: ExportSource, workers: int) -> Iterator[Iterator[ChannelResult]]:
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
        with _interrupts_deferred():  # a Ctrl-C while forking is raised once every worker is recorded
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
                proc.terminate()
        for proc in procs:
            proc.join()
        for conn in conns:
            conn.close()


def _hand_out(job: _Job, conns: list[Connection], order: list[int], plots: bool) -> Iterator[ChannelResult]:
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


def _pipe(job: _Job, op: Any, *args: Any) -> Any:
    """One send or receive on a worker's pipe; a closed pipe means the worker is gone."""
    try:
        return op(*args)
    except (EOFError, OSError) as e:
        raise SlackdistError(
            f"{job.export}: a worker process stopped unexpectedly (killed, or out of memory?); run again, "
            "or with --workers 1"
        ) from e


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block is done, then raise it: for steps that must not be cut
    in half (creating and recording the temporary folder, forking the workers, moving the output into
    place, removing the temporary folder). Outside the main thread (no signals there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler not installed from Python: leave it alone
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt


def _in_channel_order(results: Iterator[ChannelResult], bar: Any) -> Iterator[ChannelResult]:
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


# ---------------------------------------------------------------- the pipeline


def prepare(
    export: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None, cfg: DataConfig
) -> Report:
    """Run the whole data build; write DIR/{train,validation,test}.jsonl, report.json/.md and plots.

    Args:
        export: export folder or .zip.
        out_dir: output folder (None only with ``cfg.dry_run``); its files are replaced atomically.
        cfg: the data section of the config. ``cfg.persona`` implies persona roles.

    Returns:
        The report.

    Raises:
        SlackdistError: bad input (one line naming the file), no conversation left, or a warning
            under ``cfg.strict``. Nothing is written then.
        KeyboardInterrupt: Ctrl-C; the workers are stopped, the temporary folder is removed and DIR is
            left as it was.
    """
    started = time.perf_counter()
    if cfg.persona and cfg.roles != "persona":
        cfg.roles = "persona"
    out = None if cfg.dry_run or out_dir is None else Path(out_dir)
    if out is None and not cfg.dry_run:
        raise SlackdistError("--out DIR is required (or use --dry-run)")
    if out is not None:
        _check_out(out)
    fractions = split_fractions(cfg.split)
    counter = load_token_counter(cfg.tokenizer)
    warnings = Warnings()
    tmp: Path | None = None
    joiner: PartJoiner | None = None
    created: list[Path] = []
    try:
        with open_export(export, warnings) as src:
            users = load_users(src, warnings)
            _strict(cfg, warnings)
            private: list[Channel] = []
            channels = list_channels(
                src,
                include_dms=cfg.include_dms,
                include_private=cfg.include_private,
                channels=cfg.channels,
                exclude_channels=cfg.exclude_channels,
                warnings=warnings,
                left_out_private=private,
            )
            if not channels:
                raise SlackdistError(_nothing_left(src, None, cfg, private))
            workspace = cfg.workspace or src.name
            persona = resolve_persona(cfg.persona, users) if cfg.persona else None
            builder = RecordBuilder(cfg, workspace=workspace, counter=counter, persona=persona)
            report = ReportBuilder(
                export=src.name, workspace=workspace, persona_mode=builder.persona_mode, preview=cfg.preview
            )
            if out is not None:
                with _interrupts_deferred():  # so a Ctrl-C cannot leave a folder that `tmp` does not name
                    tmp, created = _make_temp_dir(out)
                (tmp / "parts").mkdir()
            job = _Job(
                Path(export),
                cfg,
                users,
                channels,
                builder,
                workspace,
                None if tmp is None else tmp / "parts",
                fractions,
            )
            counts = [0, 0, 0]
            starts: dict[str, float] = {}
            group_records: Counter = Counter()
            workers = cfg.workers or os.cpu_count() or 1
            joiner = None if tmp is None else PartJoiner(tmp, cfg.split_by)
            with (
                _progress(count_day_files(src, channels)) as bar,
                _channel_results(job, src, workers) as results,
            ):
                for result in _in_channel_order(results, bar):
                    if joiner is not None:
                        joiner.add(result.index)
                    report.merge(result.report)
                    _merge_warnings(warnings, result.warnings)
                    _strict(cfg, warnings)
                    counts = [a + b for a, b in zip(counts, result.counts, strict=True)]
                    starts.update(result.starts)
                    group_records.update(result.group_records)
            if report.quality.records == 0:
                raise SlackdistError(_nothing_left(src, report, cfg, private, warnings.notes))
            if cfg.split_by == "time":
                assign = time_split(starts, fractions)
                for group, n in group_records.items():
                    counts[assign[group]] += n
            report.splits.update(dict(zip(SPLIT_NAMES, counts, strict=True)))
            data = report.finish(
                warnings=_warnings_summary(warnings),
                config=_public_config(cfg),
                output=None if out is None else str(out),
                seconds=time.perf_counter() - started,
            )
            if tmp is not None:
                assert out is not None
                assert joiner is not None
                joiner.finish(len(channels), fractions, starts)
                (tmp / "report.json").write_text(report_json(data), encoding="utf-8")
                (tmp / "report.md").write_text(render_markdown(data), encoding="utf-8")
                write_dataset_card(tmp, report.splits)  # README.md: the folder loads with `datasets`
                write_plots(report.turn_counts, report.token_counts, tmp)
                with _interrupts_deferred():  # DIR gets every new file or keeps every old one
                    _install(tmp, out)
                    tmp = None
    except BaseException:
        with _interrupts_deferred():
            if joiner is not None:
                joiner.close()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                for folder in created:
                    shutil.rmtree(folder, ignore_errors=True)
        raise
    return Report(data=data, out_dir=out)


def _merge_warnings(into: Warnings, other: Warnings) -> None:
    into.counts.update(other.counts)
    into.notes.update(other.notes)
    for kind, examples in other.examples.items():
        mine = into.examples.setdefault(kind, [])
        mine.extend(examples[: max(0, into.max_examples - len(mine))])


_FEED_NOTE = "bot_messages_that_are_feed_posts"


@dataclass(frozen=True)
class _Keep:
    """Which non-human messages one channel keeps (see ``drop_reason``)."""

    bots: bool  # --include-bots
    feeds: bool  # also integration feed posts: --include-bots and the channel named with --channels


def _channel_conversations(
    src, channel, users, warnings, cleaner, report, keep: _Keep = _Keep(False, False)
) -> Iterator[Conversation]:
    """Whole conversations of one channel, counting every message's fate on the way."""
    stats = report.channel(channel.name, channel.kind)
    grouper = ChannelGrouper(channel, gap_hours=cleaner.cfg.gap_hours)
    source = None
    for msg in iter_messages(src, channel, users, warnings):
        if msg.source_file != source:
            source = msg.source_file
            report.day_files += 1
        reason = drop_reason(msg, include_bots=keep.bots, include_feeds=keep.feeds)
        if reason == "bot" and msg.is_feed:  # for the nothing-left hint: --include-bots would not keep it
            warnings.note(_FEED_NOTE)
        post = cleaner(msg) if reason is None else None
        if reason is None and post is None:
            reason = "empty_after_cleaning"
        report.message(stats, reason)
        if post is None:
            grouper.note_dropped(msg.ts, msg.thread_ts)
            continue
        done = grouper.add(post)
        if done:
            yield from done
    yield from grouper.finish()
    report.quality.threads_reopened += grouper.threads_reopened
    report.quality.thread_parents_joined += grouper.parents_joined
    report.end_channel(channel)


def _emit(conv: Conversation, builder: RecordBuilder, report: ReportBuilder, writer) -> None:
    """Window one whole conversation, build and write its records, account for it in the report."""
    plan, built = builder.build_conversation(conv)
    report.conversation(conv, plan, built)
    for window, b in built:
        if b.record is not None:
            report.record(window, b)
            writer.add(b.record)


def _strict(cfg: DataConfig, warnings: Warnings) -> None:
    if cfg.strict and warnings:
        warnings.raise_if_any()


def _nothing_left(
    src: ExportSource,
    report: ReportBuilder | None,
    cfg: DataConfig,
    private: list[Channel],
    notes: Counter | None = None,
) -> str:
    """The one-line error when no record is left: what was left out, and the flag that keeps it."""
    human = 0 if report is None else sum(s.human_messages for s in report.channels.values())
    if cfg.persona and human:
        return f"{src.path}: --as {cfg.persona!r}: that person answers in no conversation ({human} human messages read)"
    left_out = _left_out(src, report, private, notes or Counter())
    if report is None and not left_out:
        return f"{src.path}: no channel left after --channels / --exclude-channels"
    top = "" if report is None else ", ".join(f"{k} {v}" for k, v in report.dropped.most_common(3))
    return (
        f"{src.path}: no conversation left ({human} human messages"
        + (f"; left out: {'; '.join(left_out)}" if left_out else "")
        + f"; most dropped: {top or 'none'})"
    )


def _left_out(
    src: ExportSource, report: ReportBuilder | None, private: list[Channel], notes: Counter
) -> list[str]:
    """Messages left out by the privacy and bot switches, each with the flag that keeps them."""
    dms = [c for c in private if c.kind in ("dm", "mpim")]
    hints = []
    n_private = count_messages(src, [c for c in private if c.kind == "private"])
    if n_private:
        hints.append(f"{n_private} messages in private channels (--include-private keeps them)")
    n_dms = count_messages(src, dms)
    if n_dms:
        hints.append(f"{n_dms} messages in DMs and group DMs (--include-dms keeps them)")
    dropped = Counter() if report is None else report.dropped
    feeds = dropped["bot_feed"] + notes[_FEED_NOTE]
    if dropped["bot"] - notes[_FEED_NOTE]:
        hints.append(f"{dropped['bot'] - notes[_FEED_NOTE]} bot messages (--include-bots keeps them)")
    if feeds:
        hints.append(
            f"{feeds} integration feed posts (--include-bots keeps them in channels named with --channels)"
        )
    return hints


def _warnings_summary(warnings: Warnings) -> dict[str, Any]:
    summary = warnings.summary()
    return {
        "count": warnings.total,
        "by_kind": summary["counts"],
        "examples": [e for examples in summary["examples"].values() for e in examples],
        "notes": summary["notes"],
    }


def _public_config(cfg: DataConfig) -> dict[str, Any]:
    return asdict(cfg)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


class _progress:
    """A tqdm bar over day files on an interactive stderr (disable=None: off when not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None

    def __enter__(self) -> Any:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            return _NoBar()
        self.bar = tqdm(total=self.total, unit="file", desc="day files", file=sys.stderr, disable=None)
        return self.bar

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- CLI


def summary_lines(report: Report) -> list[str]:
    """The short summary `prepare` prints."""
    t, q = report.totals, report.quality
    s = t["splits"]
    lines = [
        f"read {t['messages']} messages ({t['human_messages']} human) from {t['channels']} channels, "
        f"{t['day_files']} day files in {t['seconds']:.1f} s",
        f"{t['records']} conversations -> train {s['train']}, validation {s['validation']}, test {s['test']}; "
        f"coverage {100 * (t['coverage'] or 0):.1f}% of human messages",
        f"quality: mixing channels {q['conversations_mixing_channels']}, raw markup {q['turns_with_raw_markup']}, "
        f"escapes {q['turns_with_html_escapes']}, code blocks intact {q['code_blocks_intact']}/{q['code_blocks']}",
        f"measured on the records: {percent(q['reply_partner_coverage'])} of messages with a reply partner reach a "
        f"turn, conversations kept whole {percent(q['conversations_kept_whole_ratio'])}, "
        f"threads kept whole {percent(q['threads_kept_whole_ratio'])}",
    ]
    if report.data.get("split_warning"):
        lines.append(f"warning: {report.data['split_warning']}")
    if report.data["warnings"]["count"]:
        lines.append(f"{report.data['warnings']['count']} warnings (see the report)")
    if report.out_dir is not None:
        lines.append(f"wrote {', '.join(OUTPUT_FILES)} and plots to {report.out_dir}")
    return lines


def _forget_interrupt_in_exec() -> None:
    """Let a handled Ctrl-C exit with our code (130), not by SIGINT.

    CPython (3.11) remembers a KeyboardInterrupt that passed through code run from a string (``exec`` /
    ``eval``: dataclass and namedtuple definitions while a module is imported lazily) even when it is
    caught later, and under ``python -m`` then ends the process by SIGINT (https://bugs.python.org/issue1054041
    added that exit); the next string evaluation resets the flag.
    """
    eval("None")  # noqa: S307 - a constant: only its side effect on the interpreter's flag matters


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist prepare EXPORT --out DIR`.

    Raises:
        SlackdistError: bad input; cli.py prints it as one line and exits 2.
    """
    data = cfg.data
    if args.out is None and not data.dry_run:
        raise SlackdistError("--out DIR is required (or use --dry-run to print the report only)")
    try:
        report = prepare(args.export, args.out, data)
    except KeyboardInterrupt:
        _forget_interrupt_in_exec()
        kept = f"; {args.out} is as it was" if args.out is not None and Path(args.out).exists() else ""
        print(f"slackdist prepare: interrupted, nothing written{kept}", file=sys.stderr)
        return 130
    if data.dry_run:
        print(report.markdown())
    print("\n".join(summary_lines(report)))
    return 0
