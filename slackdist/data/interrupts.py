"""Ctrl-C during `prepare`: steps that must not be cut in half, and a clean exit code afterwards.

`prepare` answers Ctrl-C with exit code 130 (SIGTERM: 143, `slackdist.files.sigterm_interrupts`),
one line, and DIR as it was: the workers are stopped, the temporary folder is removed. For that, the
few steps that create or move files, or fork, hold the interrupt until they are done
(:func:`interrupts_deferred`).
"""

from __future__ import annotations

from slackdist.files import signals_deferred

interrupts_deferred = signals_deferred
"""Hold Ctrl-C (SIGINT) and SIGTERM until the block is done, then deliver them: for steps that must not
be cut in half (creating and recording the temporary folder, forking the workers, moving the output
into place, removing the temporary folder). The one helper every command shares (`slackdist.files`)."""


def forget_interrupt_in_exec() -> None:
    """Let a handled Ctrl-C exit with our code (130), not by SIGINT.

    CPython (3.11) remembers a KeyboardInterrupt that passed through code run from a string (``exec`` /
    ``eval``: dataclass and namedtuple definitions while a module is imported lazily) even when it is
    caught later, and under ``python -m`` then ends the process by SIGINT (https://bugs.python.org/issue1054041
    added that exit); the next string evaluation resets the flag.
    """
    eval("None")  # noqa: S307 - a constant: only its side effect on the interpreter's flag matters
