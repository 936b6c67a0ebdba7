"""Outputs a reader never sees half-written, and interrupts that leave nothing behind.

Files: `write_text_atomic` writes a temp file next to the target and renames it over it.

Folders: every command that writes an output folder builds it whole in a temporary folder next to
it (`Stage` / `staged_dir`: ``.NAME.tmp-XXXX``) and installs it with `install_dir`: the old folder
is renamed aside (``.NAME.old-XXXX``), the new one renamed into its place, and only then is the old
one deleted. So OUT holds either every old file or every new one, never a mix; if the rename fails
the old folder is put back. Before any work starts, `check_output_dir` refuses an output folder
that would destroy something: a non-empty folder that is not this command's output (unless
``--overwrite``), the current folder, or a folder holding the command's own input.

Interrupts: `sigterm_interrupts` makes SIGTERM raise `Interrupted` (a KeyboardInterrupt) where
Ctrl-C raises KeyboardInterrupt, so both take the same clean-up path (the temporary folder is
removed, OUT is left as it was); `signals_deferred` holds both signals while a few steps run that
must not be cut in half (creating, installing or removing a temporary folder).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from slackdist.errors import SlackdistError

TEMP_INFIX = ".tmp-"
"""A temporary output folder is ``.NAME.tmp-XXXX`` next to NAME."""
BACKUP_INFIX = ".old-"
"""The old output, renamed aside while the new one is renamed in: ``.NAME.old-XXXX``."""


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write text to a temp file in the same folder, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_line(obj: Any) -> bytes:
    """One JSON Lines line in UTF-8: orjson, 5-14x faster than the standard library's encoder on the
    records and provenance lines `prepare` writes (1.3 KB records: 0.8 µs vs 11.2 µs). Compact separators;
    a string orjson refuses (a lone surrogate) goes through `json` and fails as it always did. NaN and
    infinities become null (records hold none: a message whose ts is not finite is dropped)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """JSON (indented, UTF-8) through `write_text_atomic`."""
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


# ---------------------------------------------------------------- interrupts


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that it takes the same clean-up path."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt_signal(e: KeyboardInterrupt) -> signal.Signals:
    """The signal behind an interrupt: SIGTERM for `Interrupted`, else SIGINT (Ctrl-C)."""
    return signal.Signals(e.signum if isinstance(e, Interrupted) else signal.SIGINT)


def interrupted(e: KeyboardInterrupt) -> str:
    """ "interrupted" for Ctrl-C, "interrupted by SIGTERM" for a SIGTERM: the start of the one line."""
    sig = interrupt_signal(e)
    return "interrupted" if sig == signal.SIGINT else f"interrupted by {sig.name}"


def interrupt_exit_code(e: KeyboardInterrupt) -> int:
    """The shell's code for a process ended by that signal: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + interrupt_signal(e)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While active, SIGTERM raises `Interrupted` in the main thread (elsewhere, or where SIGTERM's
    handler was not installed from Python, it does nothing)."""
    previous = signal.getsignal(signal.SIGTERM) if _in_main_thread() else None
    if previous is None:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block is done, then deliver them to the handlers they
    would have reached (the default SIGINT handler raises KeyboardInterrupt; `sigterm_interrupts`'
    raises `Interrupted`; a default SIGTERM ends the process). For steps that must not be cut in half.
    When the block raises, the held signals are dropped: the error is already on its way out.
    Outside the main thread (no signals there) it does nothing."""
    if not _in_main_thread():
        yield
        return
    held: list[int] = []
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not None:  # None: a handler not installed from Python; leave it alone
            previous[signum] = handler
            signal.signal(signum, lambda s, frame: held.append(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum in dict.fromkeys(held):
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)


# ---------------------------------------------------------------- output folders


def _real(path: str | os.PathLike[str]) -> Path:
    """The path with symlinks resolved: a symlinked output folder is replaced where it really is."""
    return Path(os.path.realpath(path))


def _holds(folder: Path, path: Path) -> bool:
    """`path` is `folder` or lies inside it (both resolved)."""
    return path == folder or folder in path.parents


def check_output_dir(
    out: str | os.PathLike[str],
    *,
    markers: Sequence[str],
    what: str,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> None:
    """Refuse an output folder whose replacement would destroy something, before any work starts.

    Args:
        out: the output folder (it need not exist).
        markers: names (glob patterns) of which a folder written by this command holds at least one.
        what: what this command writes, for the message ("a prepared data folder").
        overwrite: ``--overwrite``: replace a non-empty folder even without any of `markers`.
        inputs: paths this command reads (None: none); the output may not be one of them or hold one.

    Raises:
        SlackdistError: one line naming the folder: `out` is a file; it is or holds the current
            folder or an input; or it is non-empty, holds none of `markers` and `overwrite` is off.
    """
    shown = Path(out)
    if not shown.exists():
        return
    if not shown.is_dir():
        raise SlackdistError(f"{shown}: exists and is not a folder; choose a folder for the output")
    real = _real(shown)
    if _holds(real, Path.cwd().resolve()):
        raise SlackdistError(
            f"{shown}: is the current folder or holds it, and the output replaces the whole folder; "
            "choose another folder (or run from elsewhere)"
        )
    for path in inputs:
        if path is not None and Path(path).exists() and _holds(real, _real(path)):
            raise SlackdistError(
                f"{shown}: holds {path}, which this command reads, and the output replaces the whole "
                "folder; choose another folder"
            )
    if overwrite or not any(shown.iterdir()) or any(any(shown.glob(m)) for m in markers):
        return
    raise SlackdistError(
        f"{shown}: not empty and not {what} (no {' or '.join(markers)}); pass --overwrite to replace "
        "the whole folder, or choose another one"
    )


MODEL_FOLDER_MARKERS = ("config.json",)
"""What a model folder (`save_pretrained`: tiny-model, real-model, merge) holds."""


def check_model_folder(
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> None:
    """`out` may be replaced by a model folder: new, empty, a model folder, or `overwrite`.

    Raises:
        SlackdistError: one line naming the folder (`check_output_dir`).
    """
    check_output_dir(
        out, markers=MODEL_FOLDER_MARKERS, what="a model folder", overwrite=overwrite, inputs=inputs
    )


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder ``PREFIXxxxxxxxx`` in `parent`, made with the process's umask (unlike
    `tempfile.mkdtemp`'s private 0700: an output folder is an ordinary one)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{parent}: no free name for a temporary folder {prefix}*")


def install_dir(tmp: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Put the finished folder `tmp` in the place of `out` by one rename.

    An existing `out` is first renamed aside (``.NAME.old-XXXX``) and deleted only once `tmp` is in
    its place; if that rename fails, it is put back. Ctrl-C and SIGTERM are held meanwhile
    (`signals_deferred`), so they cannot leave `out` missing. `tmp` must be on the same file system
    (next to `out`, as `Stage` makes it).

    Raises:
        OSError: a rename failed; `out` is as it was.
    """
    tmp, out = Path(tmp), _real(out)
    with signals_deferred():
        backup = None
        if out.exists():
            # an empty folder reserves a unique name; POSIX rename() replaces an empty folder
            backup = _fresh_dir(out.parent, f".{out.name}{BACKUP_INFIX}")
            os.replace(out, backup)
        try:
            os.replace(tmp, out)
        except BaseException:
            if backup is not None:
                os.replace(backup, out)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


class Stage:
    """The temporary folder an output is built in, next to it, and what becomes of it.

    `create` makes it (and any missing parent folder of the output), `install` renames it into the
    output's place (`install_dir`), `discard` removes it with the parents it made; after `install`,
    `discard` does nothing. So the pattern is::

        stage = Stage(out)
        try:
            stage.create()
            ... write into stage.path ...
            stage.install()
        finally:
            stage.discard()
    """

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = _real(out)
        self.path: Path | None = None
        self.created: list[Path] = []  # parent folders made for it, deepest first

    def create(self) -> Path:
        """Make the temporary folder; Ctrl-C / SIGTERM are held until it is recorded here."""
        with signals_deferred():
            parent = self.out.parent
            while not parent.exists():
                self.created.append(parent)
                parent = parent.parent
            for folder in reversed(self.created):
                folder.mkdir(exist_ok=True)
            self.path = _fresh_dir(self.out.parent, f".{self.out.name}{TEMP_INFIX}")
        return self.path

    def install(self) -> None:
        """Rename the finished folder into the output's place (`install_dir`)."""
        if self.path is None:
            raise RuntimeError("Stage.install before Stage.create")
        install_dir(self.path, self.out)
        self.path, self.created = None, []

    def install_files(self, names: Sequence[str]) -> None:
        """For an output of single files beside other people's (``export --out FILE.gguf``): rename
        each named file of the finished folder into the output's folder, one after the other with
        Ctrl-C and SIGTERM held until the last is in place; `discard` then removes the empty stage."""
        if self.path is None:
            raise RuntimeError("Stage.install_files before Stage.create")
        with signals_deferred():
            for name in names:
                os.replace(self.path / name, self.out.parent / name)
            self.created = []  # they hold the output now

    def discard(self) -> None:
        """Remove the temporary folder (not installed) and the parent folders made for it."""
        with signals_deferred():
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
                self.path = None
            for folder in self.created:
                try:
                    folder.rmdir()
                except OSError:  # something else was put there meanwhile: not ours to remove
                    break
            self.created = []


@contextmanager
def staged_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder next to `out`, installed as `out` (`install_dir`) when the block ends; when
    it raises (an error, Ctrl-C, SIGTERM under `sigterm_interrupts`) it is removed and `out` is left
    as it was."""
    stage = Stage(out)
    try:
        yield stage.create()
        stage.install()
    finally:
        stage.discard()


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def link_into(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Recreate the file or folder `src` at `dst` from hard links to its files: no data is copied
    and `src` stays whole (copies where the file system has no hard links)."""
    src, dst = Path(src), Path(dst)
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        _link_or_copy(str(src), str(dst))
