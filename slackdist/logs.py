"""How slackdist's log lines reach the terminal: one handler, `slackdist: message` on stderr.

`slackdist.cli.main` calls `setup_logging` once per process. Only the "slackdist" logger gets a
handler; the root logger gets none (no `logging.basicConfig`), so a library that brings its own
handler (huggingface_hub, transformers) prints each of its lines once, not once more through the root.
`SLACKDIST_VERBOSE=1` shows info lines too (which model loaded how, the LoRA targets) and the
library notices silenced below.
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER = "slackdist"
VERBOSE_ENV = "SLACKDIST_VERBOSE"
PREFIX = "slackdist: "

# Library notices that are noise on a first run. bitsandbytes' CPU backend tries to fetch an
# optional faster kernel from the hub when it is imported (through the `kernels` package, which says
# it skips its publisher check offline) and warns when it cannot (offline, or an unverified
# publisher); its own CPU kernel then runs, which is what every test here measured.
_QUIET_LOGGERS = {"bitsandbytes.backends.cpu.ops": logging.ERROR, "kernels._internals.hf_hub": logging.ERROR}


class _StderrHandler(logging.StreamHandler):
    """A stream handler writing to whatever `sys.stderr` is when a line is logged (pytest swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(verbose: bool | None = None) -> None:
    """Give the "slackdist" logger its one handler (idempotent) and set the levels.

    Args:
        verbose: info lines too (default: from the SLACKDIST_VERBOSE environment variable).
    """
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(PREFIX + "%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else level)
