"""Ctrl-C during `prepare`: steps that must not be cut in half, and a clean exit code afterwards.

`prepare` answers Ctrl-C with exit code 130, one line, and DIR as it was: the workers are stopped,
the temporary folder is removed. For that, the few steps that create or move files, or fork, hold
the interrupt until they are done (:func:`interrupts_deferred`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def interrupts_deferred() -> Iterator[None]:
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


def forget_interrupt_in_exec() -> None:
    """Let a handled Ctrl-C exit with our code (130), not by SIGINT.

    CPython (3.11) remembers a KeyboardInterrupt that passed through code run from a string (``exec`` /
    ``eval``: dataclass and namedtuple definitions while a module is imported lazily) even when it is
    caught later, and under ``python -m`` then ends the process by SIGINT (https://bugs.python.org/issue1054041
    added that exit); the next string evaluation resets the flag.
    """
    eval("None")  # noqa: S307 - a constant: only its side effect on the interpreter's flag matters
