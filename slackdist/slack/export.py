"""Slack export (folder or .zip) -> a stream of Message, one day file at a time.

Entry points, in the order a caller uses them::

    warnings = Warnings()
    with open_export(path) as src:
        users = load_users(src, warnings)
        channels = list_channels(src, include_dms=False, warnings=warnings)
        for channel in channels:
            for message in iter_messages(src, channel, users, warnings):
                reason = drop_reason(message)  # None for a human message worth keeping

Zips are read member by member (never extracted), so memory holds one day file at a time.
Hostile input is bounded by :class:`ExportLimits` (file sizes, zip ratio and total, nesting depth):
what breaks a limit is a counted warning (one file or one item skipped) or, for a zip that cannot be
read safely at all, a one-line :class:`SlackdistError`.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from slackdist.errors import SlackdistError, first_line

ChannelKind = Literal["public", "private", "dm", "mpim"]


@dataclass(frozen=True)
class Channel:
    id: str
    name: str  # channel name, or the DM/mpim folder name
    kind: ChannelKind
    folder: str  # folder name inside the export


@dataclass(slots=True)
class Message:
    """One raw message as the export holds it, with its speaker resolved.

    `text` is the raw mrkdwn (HTML-escaped, with <@U..> markup); cleaning happens later.
    """

    channel: Channel
    ts: str  # message id, unique within its channel only
    thread_ts: str | None  # == ts on a thread parent, != ts on a reply, None outside threads
    user_id: str | None
    user_name: str  # display name resolved from users.json / user_profile, or "unknown-user"
    text: str  # raw text (mrkdwn), incl. attachment/blocks fallback when text is empty
    subtype: str | None = None
    is_bot: bool = False
    files: list[str] = field(default_factory=list)  # file names shared with the message
    reactions: list[tuple[str, int]] = field(default_factory=list)  # (emoji name, count)
    edited: bool = False
    source_file: str = ""  # the day file it came from (for errors and reports)
    reply_count: int = 0  # replies the export says a thread parent has (0 when unknown)
    is_feed: bool = False  # a bot post that is an integration's card, not a turn (see drop_reason)

    @property
    def time(self) -> float:
        return float(self.ts)

    @property
    def key(self) -> tuple[str, str]:
        return (self.channel.id, self.ts)

    @property
    def is_reply(self) -> bool:
        return self.thread_ts is not None and self.thread_ts != self.ts


# --------------------------------------------------------------------------------------------------
# Subtypes and the keep/drop decision

UNKNOWN_USER = "unknown-user"
SLACKBOT_ID = "USLACKBOT"

#: Subtypes of messages people wrote. ``reply_broadcast`` is the 2017-era name of ``thread_broadcast``.
HUMAN_SUBTYPES: frozenset[str | None] = frozenset(
    {None, "thread_broadcast", "reply_broadcast", "me_message", "file_share"}
)
#: Subtypes that are bots by definition.
BOT_SUBTYPES: frozenset[str] = frozenset({"bot_message", "slackbot_response"})
#: Notices Slack writes itself (joins, topic changes, pins, deletions, huddles ...).
SYSTEM_SUBTYPES: frozenset[str] = frozenset(
    {
        "channel_join",
        "channel_leave",
        "channel_topic",
        "channel_purpose",
        "channel_name",
        "channel_archive",
        "channel_unarchive",
        "channel_convert_to_private",
        "channel_convert_to_public",
        "channel_posting_permissions",
        "channel_canvas_updated",
        "channel_tab_added",
        "channel_tab_removed",
        "group_join",
        "group_leave",
        "group_topic",
        "group_purpose",
        "group_name",
        "group_archive",
        "group_unarchive",
        "pinned_item",
        "unpinned_item",
        "reminder_add",
        "reminder_delete",
        "bot_add",
        "bot_remove",
        "bot_enable",
        "bot_disable",
        "app_conversation_join",
        "tombstone",
        "joiner_notification",
        "joiner_notification_for_inviter",
        "huddle_thread",
        "huddle_room_created",
        "sh_room_created",
        "sh_room_shared",
        "message_deleted",
        "message_changed",
        "message_replied",
        "ekm_access_denied",
        "assistant_app_thread",
    }
)
# Bot detection must not read the ``bot_id`` of these: it names the bot being added, not the speaker.
_BOT_ID_IS_OBJECT = frozenset({"bot_add", "bot_remove", "bot_enable", "bot_disable"})


def drop_reason(message: Message, *, include_bots: bool = False, include_feeds: bool = False) -> str | None:
    """Why a message does not become part of a turn, or None for a message with content worth a turn.

    Bots, apps and agents (``bot_message``, a ``bot_id``/``bot_profile``, ``is_bot``/``is_app_user``
    users, Slackbot) are dropped unless ``include_bots``; then they speak under their bot name, except
    integration feed posts (``Message.is_feed``: Slackbot, and bot posts with no text of their own, only
    ``attachments`` or layout blocks, as CI, GitHub and monitoring integrations post), which also need
    ``include_feeds`` (the caller sets it for channels named explicitly with ``--channels``).

    Returns:
        ``"system:<subtype>"`` (Slack's own notices), ``"bot"``, ``"bot_feed"`` (a feed post left out
        although bots are included), ``"subtype:<subtype>"`` (other non-human subtypes such as
        ``file_comment``), ``"empty"`` (no text and no files), or None.
    """
    subtype = message.subtype
    if subtype in SYSTEM_SUBTYPES:  # before bots: a deletion notice by USLACKBOT is a system message
        return f"system:{subtype}"
    if message.is_bot or subtype in BOT_SUBTYPES:
        if not include_bots:
            return "bot"
        if message.is_feed and not include_feeds:
            return "bot_feed"
        if subtype not in HUMAN_SUBTYPES and subtype not in BOT_SUBTYPES:
            return f"subtype:{subtype}"
    elif subtype not in HUMAN_SUBTYPES:
        return f"subtype:{subtype}"
    if not message.files and (not message.text or message.text.isspace()):
        return "empty"
    return None


def is_human(message: Message) -> bool:
    """A message a person wrote (no bot, a human subtype) with non-empty content."""
    return drop_reason(message) is None


# --------------------------------------------------------------------------------------------------
# Warnings


@dataclass(frozen=True)
class ExportWarning:
    kind: str  # e.g. "bad_day_file", "missing_users", "unknown_user", "bad_metadata"
    where: str  # the file it concerns (export path + member)
    detail: str  # what is wrong, one line

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"


class Warnings:
    """Counts problems that were safe to skip, per kind, with the first few examples.

    ``--strict`` turns any of them into an error (:meth:`raise_if_any`). Notes (``note``) are informational
    (e.g. a non-day file skipped) and never fail a strict run.
    """

    def __init__(self, max_examples: int = 5) -> None:
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[ExportWarning]] = {}
        self.notes: Counter[str] = Counter()

    def add(self, kind: str, where: str, detail: str) -> None:
        """Count one warning; keep it as an example while fewer than ``max_examples`` of its kind are kept."""
        self.counts[kind] += 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < self.max_examples:
            examples.append(ExportWarning(kind, where, detail))

    def note(self, kind: str, count: int = 1) -> None:
        """Count something informational (never an error, not even with ``--strict``)."""
        self.notes[kind] += count

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __len__(self) -> int:
        return self.total

    def __bool__(self) -> bool:
        return self.total > 0

    def first(self) -> ExportWarning | None:
        for examples in self.examples.values():
            if examples:
                return examples[0]
        return None

    def raise_if_any(self) -> None:
        """For ``--strict``.

        Raises:
            SlackdistError: naming the first warning's file and problem, and how many there were.
        """
        first = self.first()
        if first is not None:
            more = f" (and {self.total - 1} more warnings)" if self.total > 1 else ""
            raise SlackdistError(f"{first}{more}; --strict turns warnings into errors")

    def summary(self) -> dict[str, Any]:
        """Counts and examples as plain data for report.json."""
        return {
            "counts": dict(self.counts),
            "examples": {k: [str(w) for w in v] for k, v in self.examples.items()},
            "notes": dict(self.notes),
        }


# --------------------------------------------------------------------------------------------------
# The export as a set of files: a folder or a zip


METADATA_FILES = ("channels.json", "groups.json", "dms.json", "mpims.json")
_DAY_FILE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}\.json$")
_DM_FOLDER_RE = re.compile(r"^D[A-Z0-9]{8,}$")


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
                f"{self.where(rel)}: damaged zip member ({_reason(e)}); download or create the zip again"
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
        raise SlackdistError(f"{path}: cannot read the zip ({_reason(e)})") from e
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


# --------------------------------------------------------------------------------------------------
# Metadata: users and channels


@dataclass
class UserInfo:
    """One person (or bot) as users.json / org_users.json / a message's user_profile describe them.

    ``name`` is the name shown for them: display name, else real name, else user name.
    """

    id: str
    name: str
    real_name: str = ""
    display_name: str = ""
    username: str = ""
    is_bot: bool = False
    deleted: bool = False


def _read_json_list(src: ExportSource, rel: str, warnings: Warnings | None) -> list[dict[str, Any]]:
    """A root metadata file as a list of dicts; odd content (``[""]``, ``[]``, blanks, bad JSON) -> []."""
    if not src.has(rel):
        return []
    try:
        raw = src.read_bytes(rel)
        if not raw.strip():
            return []
        data = json.loads(raw)
    except (ValueError, RecursionError, FileTooLarge, OSError) as e:
        if warnings is not None:
            warnings.add("bad_metadata", src.where(rel), f"unreadable JSON ({_json_problem(e)}); ignored")
        return []
    if isinstance(data, dict):  # some tools write {"channels": [...]} or one object
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        return []
    return [item for item in data if isinstance(item, dict)]


def _clean_str(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _user_from_dict(user: dict[str, Any]) -> UserInfo | None:
    uid = _clean_str(user.get("id"))
    if not uid:
        return None
    profile = user.get("profile") if isinstance(user.get("profile"), dict) else {}
    display = _clean_str(profile.get("display_name")) or _clean_str(user.get("display_name"))
    real = _clean_str(profile.get("real_name")) or _clean_str(user.get("real_name"))
    username = _clean_str(user.get("name"))
    return UserInfo(
        id=uid,
        name=display or real or username or UNKNOWN_USER,
        real_name=real,
        display_name=display,
        username=username,
        is_bot=bool(user.get("is_bot") or user.get("is_app_user")) or uid == SLACKBOT_ID,
        deleted=bool(user.get("deleted")),
    )


def load_users(src: ExportSource, warnings: Warnings | None = None) -> dict[str, UserInfo]:
    """Users of the export: users.json, plus org_users.json (Enterprise Grid) where present.

    A missing users file is a counted warning (``missing_users``); speakers then come from each message's
    ``user_profile``, else ``unknown-user``.
    """
    users: dict[str, UserInfo] = {}
    sources = [f for f in ("org_users.json", "users.json") if src.has(f)]
    if not sources:
        if warnings is not None:
            warnings.add(
                "missing_users", src.where("users.json"), "no users.json; names come from user_profile"
            )
        return users
    for rel in sources:
        for item in _read_json_list(src, rel, warnings):
            info = _user_from_dict(item)
            if info is not None:
                users[info.id] = info
    return users


_METADATA_KINDS: tuple[tuple[str, ChannelKind], ...] = (
    ("channels.json", "public"),
    ("groups.json", "private"),
    ("dms.json", "dm"),
    ("mpims.json", "mpim"),
    ("file_conversations.json", "public"),
)


def _channel_from_dict(item: dict[str, Any], kind: ChannelKind, folders: set[str]) -> Channel | None:
    cid = _clean_str(item.get("id"))
    name = _clean_str(item.get("name"))
    if kind == "public" and item.get("is_private"):
        kind = "private"
    if not cid and not name:
        return None
    candidates = [name, cid] if kind != "dm" else [cid, name]
    folder = next((c for c in candidates if c and c in folders), None)
    if folder is None:
        return None  # no messages in the export
    return Channel(id=cid or folder, name=name or folder, kind=kind, folder=folder)


def _all_channels(src: ExportSource, warnings: Warnings | None) -> list[Channel]:
    folders = set(src.day_files)
    found: list[Channel] = []
    claimed: set[str] = set()
    for rel, kind in _METADATA_KINDS:
        for item in _read_json_list(src, rel, warnings):
            channel = _channel_from_dict(item, kind, folders)
            if channel is not None and channel.folder not in claimed:
                claimed.add(channel.folder)
                found.append(channel)
    for folder in sorted(folders - claimed):
        # Folders without a metadata entry (FC:... file conversations, partial exports). A DM id as the
        # folder name means a DM: treat it as private data, not as a public channel.
        kind: ChannelKind = "dm" if _DM_FOLDER_RE.match(folder) else "public"
        found.append(Channel(id=folder, name=folder, kind=kind, folder=folder))
    return found


def _matches(channel: Channel, names: set[str]) -> bool:
    return channel.name in names or channel.id in names or channel.folder in names


def _names(channels: Iterable[str]) -> set[str]:
    return {c.strip().lstrip("#") for c in channels if c and c.strip()}


def channel_named(channel: Channel, names: Iterable[str]) -> bool:
    """Whether ``names`` (as given to ``--channels``: names, ids or folders, ``#`` optional) names it."""
    return _matches(channel, _names(names))


def list_channels(
    src: ExportSource,
    *,
    include_dms: bool = False,
    include_private: bool = False,
    channels: Iterable[str] = (),
    exclude_channels: Iterable[str] = (),
    warnings: Warnings | None = None,
    left_out_private: list[Channel] | None = None,
) -> list[Channel]:
    """The conversations to read, after the privacy switches and allow/deny lists.

    Args:
        src: the open export.
        include_dms: keep DMs and group DMs (off by default: they are private).
        include_private: keep private channels (groups.json).
        channels: only these (names, ids or folder names; a leading ``#`` is ignored). Empty: all.
        exclude_channels: never these.
        warnings: collector for unreadable metadata files.
        left_out_private: if given, receives the conversations the allow/deny lists keep but the privacy
            switches leave out (private channels, DMs, group DMs), for a "nothing left" message.

    Raises:
        SlackdistError: a name in ``channels`` matches no conversation of the export.
    """
    allow, deny = _names(channels), _names(exclude_channels)
    every = _all_channels(src, warnings)
    missing = sorted(n for n in allow if not any(_matches(c, {n}) for c in every))
    if missing:
        known = ", ".join(sorted(c.name for c in every if c.kind in ("public", "private"))[:20])
        raise SlackdistError(
            f"{src.path}: no channel named {', '.join(missing)} in this export (have: {known})"
        )
    kept: list[Channel] = []
    for channel in every:
        if (allow and not _matches(channel, allow)) or (deny and _matches(channel, deny)):
            continue
        dm = channel.kind in ("dm", "mpim")
        if (dm and not include_dms) or (channel.kind == "private" and not include_private):
            if left_out_private is not None:
                left_out_private.append(channel)
        else:
            kept.append(channel)
    return kept


# --------------------------------------------------------------------------------------------------
# Messages


def day_files(src: ExportSource, channel: Channel) -> list[str]:
    """The channel's day files (relative paths) in date order."""
    return [f"{channel.folder}/{name}" for name in src.day_files.get(channel.folder, [])]


def count_day_files(src: ExportSource, channels: Iterable[Channel]) -> int:
    """How many day files the channels hold (for a progress bar's total)."""
    return sum(len(src.day_files.get(c.folder, [])) for c in channels)


def count_messages(src: ExportSource, channels: Iterable[Channel]) -> int:
    """How many items the channels' day files hold (unreadable files count 0); reads every day file."""
    ignored = Warnings()
    return sum(len(load_day_file(src, rel, ignored)) for c in channels for rel in day_files(src, c))


def load_day_file(src: ExportSource, rel: str, warnings: Warnings) -> list[Any]:
    """One day file's items; a file that cannot be read or parsed is a counted warning and [].

    Warning kinds: ``bad_day_file`` (not UTF-8, invalid or truncated JSON, nested too deep, not a list,
    unreadable) and ``file_too_large`` (over ``ExportLimits.max_file_bytes``).
    """
    where = src.where(rel)
    try:
        data = json.loads(src.read_bytes(rel))
    except FileTooLarge as e:
        warnings.add("file_too_large", where, f"{e}; file skipped")
        return []
    except UnicodeDecodeError as e:
        warnings.add("bad_day_file", where, f"not UTF-8 ({_reason(e)}); file skipped")
        return []
    except ValueError as e:
        warnings.add("bad_day_file", where, f"invalid or truncated JSON ({_reason(e)}); file skipped")
        return []
    except RecursionError:
        warnings.add("bad_day_file", where, f"{_TOO_DEEP}; file skipped")
        return []
    except OSError as e:
        warnings.add("bad_day_file", where, f"cannot read ({_reason(e)}); file skipped")
        return []
    if not isinstance(data, list):
        warnings.add("bad_day_file", where, f"expected a JSON list of messages, got {_kind(data)}")
        return []
    return data


_TOO_DEEP = "JSON nested deeper than the parser's limit (about 1,000 levels)"


def _json_problem(e: BaseException) -> str:
    return _TOO_DEEP if isinstance(e, RecursionError) else _reason(e)


def iter_messages(
    src: ExportSource,
    channel: Channel,
    users: dict[str, UserInfo],
    warnings: Warnings,
) -> Iterator[Message]:
    """Every message of a channel, day file by day file in date order, ts order within a file.

    Holds one day file in memory. Users missing from ``users`` but described by a message's
    ``user_profile`` are added to ``users`` (so later mentions of them resolve too). Items that are not
    messages, or have an invalid ``ts``, are skipped with a counted warning (``bad_message``, ``bad_ts``);
    parts of a message of the wrong JSON type (``attachments``, ``fields``, ``blocks``, ``elements``,
    ``files``, ``reactions`` ...) are skipped with a counted ``malformed_item`` warning that describes
    the part (its key and JSON type), never quotes it.
    """
    parser = _DayParser(channel, users, warnings, src.limits.max_depth)
    if src.other_files.get(channel.folder):
        warnings.note("non_day_files_skipped", src.other_files[channel.folder])
    for rel in day_files(src, channel):
        items = load_day_file(src, rel, warnings)
        parser.where = src.where(rel)
        messages = [m for m in map(parser.parse, items, range(len(items))) if m is not None]
        messages.sort(key=_ts_key)
        yield from messages


def _ts_key(message: Message) -> float:
    return float(message.ts)  # validated by _ts_string


class _DayParser:
    """Raw JSON message -> Message, for one channel; ``where`` names the day file being read."""

    __slots__ = ("channel", "users", "warnings", "where", "unknown_seen", "problems", "max_depth")

    def __init__(
        self, channel: Channel, users: dict[str, UserInfo], warnings: Warnings, max_depth: int = 32
    ) -> None:
        self.channel = channel
        self.users = users
        self.warnings = warnings
        self.where = ""
        self.unknown_seen: set[str] = set()
        self.problems: list[str] = []  # malformed parts of the message being parsed (see _flush)
        self.max_depth = max_depth

    def parse(self, item: Any, index: int = 0) -> Message | None:
        if type(item) is not dict:
            detail = f"item {index} is {_kind(item)}, not a message object; skipped"
            self.warnings.add("bad_message", self.where, detail)
            return None
        get = item.get
        kind = get("type", "message")
        if kind != "message":
            self.warnings.note(f"not_a_message:{_label(kind) or 'malformed'}")
            return None
        ts = _ts_string(get("ts"))
        if ts is None:
            detail = (
                f"item {index}: ts is {_kind(get('ts'))}, not a Slack timestamp (seconds since 1970); skipped"
            )
            self.warnings.add("bad_ts", self.where, detail)
            return None
        problems = self.problems
        subtype = get("subtype") or None
        if subtype is not None and _label(subtype) is None:
            problems.append(f"subtype is {_kind(subtype)}, not a Slack subtype name; message dropped")
            subtype = "malformed"
        user_id, user_name, user_is_bot = self._speaker(item, subtype)
        text = get("text")
        typed = True  # the poster wrote text (message text or rich_text blocks), not only attachments
        if type(text) is not str or not text or text.isspace():
            if text is not None and type(text) is not str:
                problems.append(f"text is {_kind(text)}, expected a string; ignored")
                text = ""
            text, typed = _message_text(item, text, problems, self.max_depth)
        # This runs once per message of the export: the common message has none of the keys tested below,
        # so the helpers are skipped, and Message is built positionally (keywords cost measurably more).
        plain = subtype is None and "bot_id" not in item and "bot_profile" not in item
        threaded = "thread_ts" in item or "replies" in item or "root" in item or "reply_count" in item
        is_bot = user_is_bot or (not plain and _is_bot_message(item, subtype)) or user_id == SLACKBOT_ID
        message = Message(
            self.channel,
            ts,
            _thread_ts(item, ts, problems) if threaded else None,
            user_id,
            user_name,
            text,
            subtype,
            is_bot,
            _file_names(item, text, problems) if "file" in item or "files" in item else [],
            _reactions(item, problems) if "reactions" in item else [],
            bool(get("edited")),
            self.where,
            _reply_count(item) if "reply_count" in item or "replies" in item else 0,
            is_bot and (not typed or user_id == SLACKBOT_ID),
        )
        if problems:
            self._flush(ts)
        return message

    def _flush(self, ts: str) -> None:
        for problem in self.problems:
            self.warnings.add("malformed_item", self.where, f"message {ts}: {problem}")
        self.problems.clear()

    def _speaker(self, item: dict[str, Any], subtype: str | None) -> tuple[str | None, str, bool]:
        """(user id, shown name, is_bot from the user record)."""
        user_id = item.get("user")
        info = self.users.get(user_id) if type(user_id) is str else None
        if info is not None and user_id.strip():  # the common case: a known user
            return user_id, info.name, info.is_bot
        if not isinstance(user_id, str) or not user_id.strip():
            user_id = ""
            if isinstance(item.get("comment"), dict):  # file_comment (2015-18)
                user_id = _clean_str(item["comment"].get("user"))
        if not user_id:
            bot_profile = item.get("bot_profile") if isinstance(item.get("bot_profile"), dict) else {}
            name = _clean_str(item.get("username")) or _clean_str(bot_profile.get("name"))
            fallback = "bot" if item.get("bot_id") or subtype in BOT_SUBTYPES else UNKNOWN_USER
            return None, name or fallback, False
        info = self.users.get(user_id)
        if info is None:
            info = self._learn(user_id, item.get("user_profile"))
        if info is None:
            return user_id, _clean_str(item.get("username")) or UNKNOWN_USER, user_id == SLACKBOT_ID
        return user_id, info.name, info.is_bot

    def _learn(self, user_id: str, profile: Any) -> UserInfo | None:
        """A user missing from users.json: take their ``user_profile`` (and remember it), or warn once."""
        if isinstance(profile, dict):
            info = _user_from_dict({"id": user_id, "profile": profile, "name": profile.get("name")})
            if info is not None and info.name != UNKNOWN_USER:
                self.users[user_id] = info  # later messages and mentions of this id resolve too
                return info
        if user_id not in self.unknown_seen:
            self.unknown_seen.add(user_id)
            shown = user_id if _SLACK_ID_RE.fullmatch(user_id) else f"with an id that is {_kind(user_id)}"
            detail = f"user {shown} is not in users.json and has no user_profile"
            self.warnings.add("unknown_user", self.where, detail)
        return None


# A Slack ts: seconds since 1970 (10 digits reach the year 2286), optionally with a fraction. Anything
# else ("inf", "nan", "-1", "1e400", " 12") would become a non-finite or nonsense time downstream.
_TS_RE = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,9})?")
_MAX_TS = 1e10
# What a subtype or item type must look like to be used as a label (a report key): Slack's names.
_LABEL_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SLACK_ID_RE = re.compile(r"[A-Z][A-Z0-9]{2,31}")


def _ts_string(value: Any) -> str | None:
    if type(value) is str:
        return value if _TS_RE.fullmatch(value) else None
    if type(value) in (int, float) and 0 <= value < _MAX_TS:  # NaN fails the comparison
        return f"{value:.6f}"
    return None


def _label(value: Any) -> str | None:
    return value if type(value) is str and _LABEL_RE.fullmatch(value) else None


def _kind(value: Any) -> str:
    """A JSON value described by its type and size, for warnings that must not quote data."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return "a non-finite number"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    return type(value).__name__


def _thread_ts(item: dict[str, Any], ts: str, problems: list[str]) -> str | None:
    thread_ts = item.get("thread_ts")
    if thread_ts is not None:
        valid = _ts_string(thread_ts)
        if valid is not None:
            return valid
        problems.append(f"thread_ts is {_kind(thread_ts)}, not a Slack timestamp; read outside a thread")
    if item.get("replies") or item.get("reply_count"):  # old format: replies listed on the parent only
        return ts
    root = item.get("root")
    if isinstance(root, dict):  # a thread_broadcast copy that only carries its root
        return _ts_string(root.get("ts")) or _ts_string(root.get("thread_ts"))
    return None


def _reply_count(item: dict[str, Any]) -> int:
    count = item.get("reply_count")
    if type(count) is int and count >= 0:
        return count
    replies = item.get("replies")
    return len(replies) if isinstance(replies, list) else 0


def _is_bot_message(item: dict[str, Any], subtype: str | None) -> bool:
    if subtype in BOT_SUBTYPES:
        return True
    if subtype in _BOT_ID_IS_OBJECT:
        return False
    return bool(item.get("bot_id") or item.get("bot_profile")) or item.get("user") == SLACKBOT_ID


def _items(value: Any, key: str, problems: list[str]) -> list[Any]:
    """``value`` when it is a list, [] when absent; anything else is noted as a problem and read as []."""
    if type(value) is list:
        return value
    if value is not None:
        problems.append(f"{key} is {_kind(value)}, expected a list; skipped")
    return []


def _objects(value: Any, key: str, problems: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of the list ``value``; every other entry is noted as a problem and skipped."""
    found = []
    for i, entry in enumerate(_items(value, key, problems)):
        if type(entry) is dict:
            found.append(entry)
        else:
            problems.append(f"{key}[{i}] is {_kind(entry)}, expected an object; skipped")
    return found


def _message_text(item: dict[str, Any], text: str, problems: list[str], max_depth: int) -> tuple[str, bool]:
    """Text for a message whose ``text`` is empty: attachments, else blocks; and whether it was typed.

    Typed text is a rich_text block (what the composer writes); attachments and layout blocks are cards
    an integration built (see ``Message.is_feed``).
    """
    attachments = _objects(item.get("attachments"), "attachments", problems)
    if attachments:
        from_attachments = _attachments_text(attachments, problems)
        if from_attachments:
            return from_attachments, False
    blocks = _objects(item.get("blocks"), "blocks", problems)
    if blocks:
        return _BlockText(problems, max_depth).blocks(blocks)
    return text, False


def _attachments_text(attachments: list[dict[str, Any]], problems: list[str]) -> str:
    out: list[str] = []
    for i, att in enumerate(attachments):
        parts = [_clean_str(att.get(k)) for k in ("pretext", "title", "text")]
        for f in _objects(att.get("fields"), f"attachments[{i}].fields", problems):
            title, value = _clean_str(f.get("title")), _clean_str(f.get("value"))
            parts.append(f"{title}: {value}" if title and value else title or value)
        parts = [p for p in parts if p]
        if not parts and _clean_str(att.get("fallback")):
            parts = [_clean_str(att.get("fallback"))]
        out.extend(parts)
    return "\n".join(out)


# ---- rich_text blocks -> mrkdwn. Block text is raw (not HTML-escaped), so it is escaped here and the
# cleaner treats it exactly like a message's `text`.


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class _BlockText:
    """Blocks -> mrkdwn, walking nested rich-text lists at most ``max_depth`` deep.

    Values of the wrong JSON type are noted in ``problems`` and skipped, never converted with ``str()``
    (which would quote them, and recurse without bound into a nested list).
    """

    def __init__(self, problems: list[str], max_depth: int) -> None:
        self.problems = problems
        self.max_depth = max_depth

    def blocks(self, blocks: list[dict[str, Any]]) -> tuple[str, bool]:
        """(mrkdwn, whether a rich_text block gave text)."""
        out: list[str] = []
        typed = False
        for i, block in enumerate(blocks):
            btype = block.get("type")
            if btype == "rich_text":
                elements = _objects(block.get("elements"), f"blocks[{i}].elements", self.problems)
                text = "".join(self._rich(e, 1) for e in elements)
                typed = typed or bool(text.strip())
                out.append(text)
            elif btype in ("section", "header", "context"):
                texts = _objects(block.get("fields"), f"blocks[{i}].fields", self.problems)
                texts += _objects(block.get("elements"), f"blocks[{i}].elements", self.problems)
                head = block.get("text")
                if type(head) is dict:
                    texts.insert(0, head)
                for t in texts:
                    if type(t.get("text")) is str:
                        # mrkdwn text objects are escaped like message text; plain_text ones are raw
                        out.append(t["text"] if t.get("type") == "mrkdwn" else _escape(t["text"]))
        return "\n".join(p for p in out if p), typed

    def _rich(self, element: dict[str, Any], depth: int) -> str:
        etype = element.get("type")
        children = _objects(element.get("elements"), "a rich text element's elements", self.problems)
        if etype == "rich_text_section":
            return "".join(self._inline(e) for e in children)
        if etype == "rich_text_preformatted":
            return "```" + "".join(self._inline(e, in_code=True) for e in children) + "```\n"
        if etype == "rich_text_quote":
            body = "".join(self._inline(e) for e in children)
            return "\n".join("> " + line for line in body.split("\n")) + "\n"
        if etype == "rich_text_list":
            if depth >= self.max_depth:
                self.problems.append(
                    f"rich text lists nested over {self.max_depth} levels; the deeper part skipped"
                )
                return ""
            bullet = "1." if element.get("style") == "ordered" else "-"
            return "".join(f"{bullet} {self._rich(e, depth + 1).strip()}\n" for e in children)
        return "".join(self._inline(e) for e in children)

    def _scalar(self, element: dict[str, Any], key: str, default: str = "") -> str:
        """``element[key]`` as text: strings as they are, numbers written out; other types noted, ''."""
        value = element.get(key)
        if type(value) is str:
            return value
        if type(value) in (int, float):
            return str(value)
        if value is not None:
            self.problems.append(f"a block element's {key} is {_kind(value)}, expected a string; skipped")
        return default

    def _inline(self, element: dict[str, Any], in_code: bool = False) -> str:
        etype = element.get("type")
        if etype == "text":
            text = _escape(self._scalar(element, "text"))
            style = element.get("style") if type(element.get("style")) is dict else {}
            if style.get("code") and not in_code and text.strip() and "`" not in text:
                return f"`{text}`"
            return text
        if etype == "link":
            url = self._scalar(element, "url")
            label = self._scalar(element, "text")
            if in_code:
                return _escape(label or url)
            return f"<{url}|{_escape(label)}>" if label else f"<{url}>"
        if in_code:
            return _escape(self._scalar(element, "text") or self._scalar(element, "name"))
        if etype == "user":
            return f"<@{self._scalar(element, 'user_id')}>"
        if etype == "channel":
            return f"<#{self._scalar(element, 'channel_id')}>"
        if etype == "usergroup":
            return f"<!subteam^{self._scalar(element, 'usergroup_id')}>"
        if etype == "broadcast":
            return f"<!{self._scalar(element, 'range', 'here')}>"
        if etype == "emoji":
            return f":{self._scalar(element, 'name')}:"
        if etype == "date":
            return _escape(self._scalar(element, "fallback"))
        return _escape(self._scalar(element, "text"))


def _file_names(item: dict[str, Any], text: str, problems: list[str]) -> list[str]:
    """Names of the files shared with a message, each once, leaving out files its text already links.

    The same file can sit in both the legacy ``file`` and ``files[]`` (or twice in ``files[]``), and a
    legacy upload notice's text links the file already ("uploaded a file: <permalink|title>"): adding
    ``[file: name]`` for those would show one file twice in a turn.
    """
    found = []
    legacy = item.get("file")
    if type(legacy) is dict:
        found.append(legacy)
    elif legacy is not None:
        problems.append(f"file is {_kind(legacy)}, expected an object; skipped")
    found += _objects(item.get("files"), "files", problems)
    names: list[str] = []
    seen: set[str] = set()
    for f in found:
        if f.get("mode") in ("hidden_by_limit", "tombstone"):
            continue
        name = _clean_str(f.get("name")) or _clean_str(f.get("title"))
        if not name:
            continue
        file_id = _clean_str(f.get("id"))
        key = file_id or name
        if key in seen:
            continue
        seen.add(key)
        permalink = _clean_str(f.get("permalink"))
        if (permalink and permalink in text) or (file_id and f"/{file_id}/" in text):
            continue
        names.append(name)
    return names


def _reactions(item: dict[str, Any], problems: list[str]) -> list[tuple[str, int]]:
    out = []
    for r in _objects(item.get("reactions"), "reactions", problems):
        name = _clean_str(r.get("name"))
        if not name:
            continue
        count = r.get("count")
        if type(count) is not int or count < 0:
            users = r.get("users")
            count = len(users) if type(users) is list else 1
        out.append((name, count))
    return out


def _reason(e: Exception) -> str:
    return first_line(e)[:160]


def iter_export(
    src: ExportSource,
    channels: Iterable[Channel],
    users: dict[str, UserInfo],
    warnings: Warnings,
) -> Iterator[Message]:
    """All messages of the given channels, channel by channel.

    Raises:
        SlackdistError: (after the last one) when the channels held no message at all.
    """
    count = 0
    for channel in channels:
        for message in iter_messages(src, channel, users, warnings):
            count += 1
            yield message
    if count == 0:
        raise SlackdistError(f"{src.path}: no messages in the selected conversations (empty export)")
