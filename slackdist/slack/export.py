"""An export folder or .zip as a set of files: listing, bounded reads, symlinks, the zip-bomb guard.

:func:`open_export` gives an :class:`ExportSource`: the root files and, per conversation folder,
its day files in date order. Zips are read member by member (never extracted), so memory holds
one file at a time. Hostile input is bounded by :class:`ExportLimits` (file sizes, zip ratio and
total, nesting depth): what breaks a limit is a counted warning (one file skipped) or, for a zip
that cannot be read safely at all, a one-line :class:`SlackdistError`.

The reading stage, in the order a caller uses it (each step its own module of ``slackdist.slack``)::

    warnings = Warnings()                                              # warnings.py
    with open_export(path, warnings) as src:                           # export.py (this module)
        users = load_users(src, warnings)                              # metadata.py
        channels = list_channels(src, include_dms=False, warnings=warnings)
        for channel in channels:
            for message in iter_messages(src, channel, users, warnings):   # messages.py, days.py
                reason = drop_reason(message)  # None for a human message worth keeping
                post = cleaner(message)        # clean.py: cleaned, redacted text
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from slackdist.errors import SlackdistError
from slackdist.slack.warnings import Warnings, error_reason

METADATA_FILES = ("channels.json", "groups.json", "dms.json", "mpims.json")
_DAY_FILE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}\.json$")


@dataclass(frozen=True)
class ExportLimits:
    """Bounds on what the reader accepts, so a hostile export cannot exhaust memory, time or the stack.

    Attributes:
        max_file_bytes: largest JSON file read (day file or metadata). One day file is in memory at a
            time, so this bounds memory; a larger file is a counted warning (``file_too_large``), skipped.
        max_zip_total_bytes: most bytes a zip may expand to, summed over the members that are read;
            a zip over it is refused (unzip it and pass the folder if it really is that big).
        max_zip_ratio: largest expansion (uncompressed / compressed size) of a zip member of at least
            ``ratio_floor_bytes``; over it the zip is refused as a likely zip bomb. Deflate's own limit is
            about 1032:1; Slack's day files compress 7-14:1, a day of identical bot posts about 100:1.
        ratio_floor_bytes: members smaller than this are not ratio-checked (tiny files compress oddly).
        max_depth: deepest nesting of rich-text elements walked; deeper parts are skipped with a warning.
            JSON nested deeper than Python's parser allows (~1,000 levels) is a bad day file.
    """

    max_file_bytes: int = 256 << 20
    max_zip_total_bytes: int = 64 << 30
    max_zip_ratio: int = 200
    ratio_floor_bytes: int = 1 << 20
    max_depth: int = 32


DEFAULT_LIMITS = ExportLimits()


class FileTooLarge(Exception):
    """A file over ``ExportLimits.max_file_bytes``; the caller counts a warning and skips it."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{_mib(size)}, over the {_mib(limit)} limit for one JSON file")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class ExportSource:
    """Files of one export: root-level files and, per folder, its sorted day files.

    Use :func:`open_export` to get one. Paths are relative POSIX paths (``general/2020-01-01.json``).
    ``refused`` lists the symlinks that were not followed because they point outside the export.
    """

    def __init__(self, path: Path, files: Iterable[str], limits: ExportLimits = DEFAULT_LIMITS) -> None:
        self.path = path
        self.limits = limits
        self.refused: list[str] = []
        self.root_files: set[str] = set()
        self.day_files: dict[str, list[str]] = {}
        self.other_files: dict[str, int] = {}  # folder -> count of non-day files (canvases ...)
        for rel in files:
            parts = rel.split("/")
            if len(parts) == 1:
                self.root_files.add(rel)
            elif len(parts) == 2:
                folder, name = parts
                if _DAY_FILE_RE.match(name):
                    self.day_files.setdefault(folder, []).append(name)
                else:
                    self.other_files[folder] = self.other_files.get(folder, 0) + 1
        for names in self.day_files.values():
            names.sort()

    @property
    def name(self) -> str:
        """The export's name (folder or zip name without suffix), a default workspace name."""
        return self.path.stem if self.path.suffix.lower() == ".zip" else self.path.name

    def has(self, rel: str) -> bool:
        return rel in self.root_files

    def readable(self) -> list[str]:
        """Every file the reader may read: the root JSON files and the day files."""
        root = sorted(rel for rel in self.root_files if rel.endswith(".json"))
        return root + [f"{folder}/{name}" for folder, names in self.day_files.items() for name in names]

    def read_bytes(self, rel: str) -> bytes | bytearray:  # pragma: no cover - overridden
        """A file's bytes.

        Raises:
            FileTooLarge: over ``limits.max_file_bytes``.
            OSError: it cannot be read.
            SlackdistError: a zip member is damaged (the whole zip is then unusable).
        """
        raise NotImplementedError

    def where(self, rel: str) -> str:
        """How a member is named in messages: the full path, or ``export.zip:member``."""
        return str(self.path / rel)

    def close(self) -> None:
        pass


_READ_CHUNK = 1 << 20  # bytes per read after the first: what one read of a zip member may inflate to


class _FolderSource(ExportSource):
    def __init__(self, path: Path, base: Path, limits: ExportLimits) -> None:
        self.base = base
        # str(base / rel) as a plain string prefix: pathlib costs more than reading a small day file.
        self._prefix = "" if str(base) == "." else os.path.join(str(base), "")
        refused: list[str] = []
        super().__init__(path, _walk_two_levels(base, os.path.realpath(path), refused), limits)
        self.refused = refused

    def read_bytes(self, rel: str) -> bytes | bytearray:
        # os.open/fstat/read: fewer system calls than open().read(), which more than pays for the size check.
        limit = self.limits.max_file_bytes
        fd = os.open(self._prefix + rel, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise FileTooLarge(size, limit)
            data = os.read(fd, size + 1)
            if len(data) == size:  # the common case: one read, and it reached the end
                return data
            more = bytearray(data)  # a short read, or a file that grew since fstat: read on, within the limit
            while len(more) <= limit and (chunk := os.read(fd, _READ_CHUNK)):
                more += chunk
            if len(more) > limit:
                raise FileTooLarge(len(more), limit)
            return more
        finally:
            os.close(fd)

    def where(self, rel: str) -> str:
        return self._prefix + rel


# Compression methods read with a bounded output per read: zipfile decompresses bzip2 and LZMA members
# without a limit on what one read expands to, so a small member could fill memory before any check.
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
# What zipfile and zlib raise on a damaged member (bad CRC, corrupt stream, truncated data ...).
_ZIP_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError)


class _ZipSource(ExportSource):
    def __init__(self, path: Path, zf: zipfile.ZipFile, prefix: str, limits: ExportLimits) -> None:
        self.zf = zf
        self.prefix = prefix
        self._infos = {
            info.filename[len(prefix) :]: info
            for info in zf.infolist()
            if info.filename.startswith(prefix) and not info.is_dir()
        }
        super().__init__(path, list(self._infos), limits)
        _check_zip_members(path, [self._infos[rel] for rel in self.readable()], limits)

    def read_bytes(self, rel: str) -> bytes | bytearray:
        info = self._infos[rel]
        if info.file_size > self.limits.max_file_bytes:
            raise FileTooLarge(info.file_size, self.limits.max_file_bytes)
        # Read in bounded chunks: one unbounded read would decompress a member that lies about its size
        # in one go (zipfile cuts the output to the declared size only afterwards). Into one buffer:
        # joining chunks would hold the member twice.
        data = bytearray()
        try:
            with self.zf.open(info) as f:
                while chunk := f.read(_READ_CHUNK):
                    data += chunk
        except _ZIP_DAMAGE as e:
            raise SlackdistError(
                f"{self.where(rel)}: damaged zip member ({error_reason(e)}); download or create the zip again"
            ) from e
        return data

    def where(self, rel: str) -> str:
        return f"{self.path}:{self.prefix}{rel}"

    def close(self) -> None:
        self.zf.close()


def _check_zip_members(path: Path, infos: list[zipfile.ZipInfo], limits: ExportLimits) -> None:
    """Refuse, before reading anything, a zip whose members cannot be read safely.

    Raises:
        SlackdistError: an encrypted member, an unsupported compression method, a member that expands
            more than ``max_zip_ratio`` times, or more than ``max_zip_total_bytes`` in all.
    """
    total = 0
    for info in infos:
        name = info.filename
        if info.flag_bits & 0x1:
            raise SlackdistError(
                f"{path}: {name} is encrypted; password-protected zips are not supported (unzip it and pass "
                "the folder)"
            )
        if info.compress_type not in _ZIP_METHODS:
            method = zipfile.compressor_names.get(info.compress_type, f"method {info.compress_type}")
            raise SlackdistError(
                f"{path}: {name} uses {method} compression; only stored and deflate are read (unzip it and "
                "pass the folder, or zip it again with deflate)"
            )
        size = info.file_size
        if size >= limits.ratio_floor_bytes and size > limits.max_zip_ratio * max(info.compress_size, 1):
            ratio = size / max(info.compress_size, 1)
            raise SlackdistError(
                f"{path}: {name} expands {info.compress_size} bytes to {_mib(size)} ({ratio:.0f}:1, over "
                f"the {limits.max_zip_ratio}:1 limit); refusing a likely zip bomb"
            )
        total += size
    if total > limits.max_zip_total_bytes:
        raise SlackdistError(
            f"{path}: the zip expands to {total / 2**30:.1f} GiB, over the "
            f"{limits.max_zip_total_bytes / 2**30:.0f} GiB limit; unzip it and pass the folder if it is real"
        )


def _walk_two_levels(base: Path, root: str, refused: list[str]) -> list[str]:
    """Root files and files one folder down (an export has nothing deeper that we read).

    A symlink is followed only when it resolves inside ``root`` (the export, resolved); the others are
    listed in ``refused`` and never read, so a crafted export cannot pull in files from elsewhere.
    """
    found: list[str] = []
    with os.scandir(base) as top:
        for entry in top:
            if entry.is_symlink() and not _inside(entry.path, root):
                refused.append(entry.name)
            elif entry.is_file():
                found.append(entry.name)
            elif entry.is_dir():
                with os.scandir(entry.path) as sub:
                    for e in sub:
                        rel = f"{entry.name}/{e.name}"
                        if e.is_symlink() and not _inside(e.path, root):
                            refused.append(rel)
                        elif e.is_file():
                            found.append(rel)
    return found


def _inside(path: str, root: str) -> bool:
    target = os.path.realpath(path)
    return target == root or target.startswith(os.path.join(root, ""))


def _looks_like_export(src: ExportSource) -> bool:
    return any(src.has(f) for f in METADATA_FILES) or bool(src.day_files)


@contextmanager
def open_export(
    path: str | os.PathLike[str], warnings: Warnings | None = None, limits: ExportLimits = DEFAULT_LIMITS
) -> Iterator[ExportSource]:
    """Open an export folder or .zip (also one whose content sits under one top folder).

    Args:
        path: the export folder or zip.
        warnings: where refused symlinks (pointing outside the export) are counted, if given.
        limits: the bounds on sizes, zip expansion and nesting.

    Raises:
        SlackdistError: the path is missing, not a folder or zip, a zip with unsafe member paths,
            encrypted or unsupported members, or past the zip limits (a likely zip bomb), not a Slack
            export, or an export without any day file.
    """
    src = _open_source(Path(path), limits)
    try:
        if warnings is not None:
            for rel in src.refused:
                detail = "a symlink to a path outside the export; not followed"
                warnings.add("symlink_outside_export", src.where(rel), detail)
        yield src
    finally:
        src.close()


def _open_source(path: Path, limits: ExportLimits) -> ExportSource:
    if not path.exists():
        raise SlackdistError(f"{path}: no such file or folder")
    if path.is_dir():
        src: ExportSource = _FolderSource(path, path, limits)
        if not _looks_like_export(src):
            subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
            if len(subdirs) == 1 and not [p for p in path.iterdir() if p.is_file() and p.suffix == ".json"]:
                src = _FolderSource(path, subdirs[0], limits)
    elif zipfile.is_zipfile(path):
        src = _open_zip(path, limits)
    else:
        raise SlackdistError(f"{path}: not a folder or a .zip file")
    _check_export(src)
    return src


def _open_zip(path: Path, limits: ExportLimits) -> _ZipSource:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as e:
        raise SlackdistError(f"{path}: cannot read the zip ({error_reason(e)})") from e
    try:
        names = zf.namelist()
        for name in names:
            if _unsafe_member(name):
                raise SlackdistError(f"{path}: refusing unsafe member path {name!r} (absolute or '..')")
        prefix = ""
        names = [n for n in names if not n.startswith("__MACOSX/")]
        top = {n.split("/", 1)[0] for n in names if n.strip("/")}
        root_json = [n for n in names if "/" not in n.rstrip("/") and n.endswith(".json")]
        if len(top) == 1 and not root_json:
            only = next(iter(top))
            if any(n.startswith(only + "/") for n in names):
                prefix = only + "/"
        return _ZipSource(path, zf, prefix, limits)
    except BaseException:
        zf.close()
        raise


def _unsafe_member(name: str) -> bool:
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        return True
    return ".." in PurePosixPath(normalized).parts


def _check_export(src: ExportSource) -> None:
    if not _looks_like_export(src):
        raise SlackdistError(
            f"{src.path}: not a Slack export (no channels.json, groups.json, dms.json or mpims.json, "
            "and no channel folders with YYYY-MM-DD.json day files)"
        )
    if not src.day_files:
        raise SlackdistError(f"{src.path}: empty export (metadata but no YYYY-MM-DD.json day files)")
