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
"""

from __future__ import annotations

import json
import os
import re
import zipfile
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


def drop_reason(message: Message) -> str | None:
    """Why a message does not become part of a turn, or None for a human message with content.

    Returns:
        ``"system:<subtype>"`` (Slack's own notices), ``"bot"``, ``"subtype:<subtype>"`` (other
        non-human subtypes such as ``file_comment``), ``"empty"`` (no text and no files), or None.
    """
    subtype = message.subtype
    if subtype in SYSTEM_SUBTYPES:  # before bots: a deletion notice by USLACKBOT is a system message
        return f"system:{subtype}"
    if message.is_bot or subtype in BOT_SUBTYPES:
        return "bot"
    if subtype not in HUMAN_SUBTYPES:
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


class ExportSource:
    """Files of one export: root-level files and, per folder, its sorted day files.

    Use :func:`open_export` to get one. Paths are relative POSIX paths (``general/2020-01-01.json``).
    """

    def __init__(self, path: Path, files: Iterable[str]) -> None:
        self.path = path
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

    def read_bytes(self, rel: str) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def where(self, rel: str) -> str:
        """How a member is named in messages: the full path, or ``export.zip:member``."""
        return str(self.path / rel)

    def close(self) -> None:
        pass


class _FolderSource(ExportSource):
    def __init__(self, path: Path, base: Path) -> None:
        self.base = base
        # str(base / rel) as a plain string prefix: pathlib costs more than reading a small day file.
        self._prefix = "" if str(base) == "." else os.path.join(str(base), "")
        super().__init__(path, _walk_two_levels(base))

    def read_bytes(self, rel: str) -> bytes:
        with open(self._prefix + rel, "rb") as f:
            return f.read()

    def where(self, rel: str) -> str:
        return self._prefix + rel


class _ZipSource(ExportSource):
    def __init__(self, path: Path, zf: zipfile.ZipFile, prefix: str) -> None:
        self.zf = zf
        self.prefix = prefix
        names = [n[len(prefix) :] for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
        super().__init__(path, names)

    def read_bytes(self, rel: str) -> bytes:
        return self.zf.read(self.prefix + rel)

    def where(self, rel: str) -> str:
        return f"{self.path}:{self.prefix}{rel}"

    def close(self) -> None:
        self.zf.close()


def _walk_two_levels(base: Path) -> list[str]:
    """Root files and files one folder down (an export has nothing deeper that we read)."""
    found: list[str] = []
    with os.scandir(base) as top:
        for entry in top:
            if entry.is_file():
                found.append(entry.name)
            elif entry.is_dir():
                with os.scandir(entry.path) as sub:
                    found.extend(f"{entry.name}/{e.name}" for e in sub if e.is_file())
    return found


def _looks_like_export(src: ExportSource) -> bool:
    return any(src.has(f) for f in METADATA_FILES) or bool(src.day_files)


@contextmanager
def open_export(path: str | os.PathLike[str]) -> Iterator[ExportSource]:
    """Open an export folder or .zip (also one whose content sits under one top folder).

    Raises:
        SlackdistError: the path is missing, not a folder or zip, a zip with unsafe member paths,
            not a Slack export, or an export without any day file.
    """
    src = _open_source(Path(path))
    try:
        yield src
    finally:
        src.close()


def _open_source(path: Path) -> ExportSource:
    if not path.exists():
        raise SlackdistError(f"{path}: no such file or folder")
    if path.is_dir():
        src: ExportSource = _FolderSource(path, path)
        if not _looks_like_export(src):
            subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
            if len(subdirs) == 1 and not [p for p in path.iterdir() if p.is_file() and p.suffix == ".json"]:
                src = _FolderSource(path, subdirs[0])
    elif zipfile.is_zipfile(path):
        src = _open_zip(path)
    else:
        raise SlackdistError(f"{path}: not a folder or a .zip file")
    _check_export(src)
    return src


def _open_zip(path: Path) -> _ZipSource:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise SlackdistError(f"{path}: cannot read the zip ({e})") from e
    names = zf.namelist()
    for name in names:
        if _unsafe_member(name):
            zf.close()
            raise SlackdistError(f"{path}: refusing unsafe member path {name!r} (absolute or '..')")
    prefix = ""
    names = [n for n in names if not n.startswith("__MACOSX/")]
    top = {n.split("/", 1)[0] for n in names if n.strip("/")}
    root_json = [n for n in names if "/" not in n.rstrip("/") and n.endswith(".json")]
    if len(top) == 1 and not root_json:
        only = next(iter(top))
        if any(n.startswith(only + "/") for n in names):
            prefix = only + "/"
    return _ZipSource(path, zf, prefix)


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
    except (ValueError, UnicodeDecodeError) as e:
        if warnings is not None:
            warnings.add("bad_metadata", src.where(rel), f"unreadable JSON ({_reason(e)}); ignored")
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


def list_channels(
    src: ExportSource,
    *,
    include_dms: bool = False,
    include_private: bool = False,
    channels: Iterable[str] = (),
    exclude_channels: Iterable[str] = (),
    warnings: Warnings | None = None,
) -> list[Channel]:
    """The conversations to read, after the privacy switches and allow/deny lists.

    Args:
        src: the open export.
        include_dms: keep DMs and group DMs (off by default: they are private).
        include_private: keep private channels (groups.json).
        channels: only these (names, ids or folder names; a leading ``#`` is ignored). Empty: all.
        exclude_channels: never these.
        warnings: collector for unreadable metadata files.

    Raises:
        SlackdistError: a name in ``channels`` matches no conversation of the export.
    """
    allow = {c.strip().lstrip("#") for c in channels if c and c.strip()}
    deny = {c.strip().lstrip("#") for c in exclude_channels if c and c.strip()}
    every = _all_channels(src, warnings)
    missing = sorted(n for n in allow if not any(_matches(c, {n}) for c in every))
    if missing:
        known = ", ".join(sorted(c.name for c in every if c.kind in ("public", "private"))[:20])
        raise SlackdistError(
            f"{src.path}: no channel named {', '.join(missing)} in this export (have: {known})"
        )
    kept = []
    for channel in every:
        if channel.kind in ("dm", "mpim") and not include_dms:
            continue
        if channel.kind == "private" and not include_private:
            continue
        if allow and not _matches(channel, allow):
            continue
        if deny and _matches(channel, deny):
            continue
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


def load_day_file(src: ExportSource, rel: str, warnings: Warnings) -> list[dict[str, Any]]:
    """One day file's messages; a truncated, non-JSON or non-UTF-8 file is a counted warning and []."""
    where = src.where(rel)
    try:
        data = json.loads(src.read_bytes(rel))
    except UnicodeDecodeError as e:
        warnings.add("bad_day_file", where, f"not UTF-8 ({_reason(e)}); file skipped")
        return []
    except ValueError as e:
        warnings.add("bad_day_file", where, f"invalid or truncated JSON ({_reason(e)}); file skipped")
        return []
    except OSError as e:
        warnings.add("bad_day_file", where, f"cannot read ({_reason(e)}); file skipped")
        return []
    if not isinstance(data, list):
        warnings.add("bad_day_file", where, f"expected a JSON list of messages, got {type(data).__name__}")
        return []
    return data


def iter_messages(
    src: ExportSource,
    channel: Channel,
    users: dict[str, UserInfo],
    warnings: Warnings,
) -> Iterator[Message]:
    """Every message of a channel, day file by day file in date order, ts order within a file.

    Holds one day file in memory. Users missing from ``users`` but described by a message's
    ``user_profile`` are added to ``users`` (so later mentions of them resolve too).
    """
    parser = _DayParser(channel, users, warnings)
    if src.other_files.get(channel.folder):
        warnings.note("non_day_files_skipped", src.other_files[channel.folder])
    for rel in day_files(src, channel):
        items = load_day_file(src, rel, warnings)
        parser.where = src.where(rel)
        messages = [m for m in map(parser.parse, items) if m is not None]
        messages.sort(key=_ts_key)
        yield from messages


def _ts_key(message: Message) -> float:
    return float(message.ts)  # validated by _ts_string


class _DayParser:
    """Raw JSON message -> Message, for one channel; ``where`` names the day file being read."""

    __slots__ = ("channel", "users", "warnings", "where", "unknown_seen")

    def __init__(self, channel: Channel, users: dict[str, UserInfo], warnings: Warnings) -> None:
        self.channel = channel
        self.users = users
        self.warnings = warnings
        self.where = ""
        self.unknown_seen: set[str] = set()

    def parse(self, item: Any) -> Message | None:
        if not isinstance(item, dict):
            detail = f"a message that is not a JSON object: {str(item)[:40]!r}; skipped"
            self.warnings.add("bad_message", self.where, detail)
            return None
        get = item.get
        kind = get("type", "message")
        if kind != "message":
            self.warnings.note(f"not_a_message:{kind}")
            return None
        ts = _ts_string(get("ts"))
        if ts is None:
            self.warnings.add("bad_message", self.where, "a message without a valid ts; skipped")
            return None
        subtype = get("subtype") or None
        if subtype is not None and not isinstance(subtype, str):
            subtype = str(subtype)
        user_id, user_name, user_is_bot = self._speaker(item, subtype)
        text = get("text")
        if not isinstance(text, str) or not text or text.isspace():
            text = _message_text(item)
        # This runs once per message of the export: the common message has none of the keys tested below,
        # so the helpers are skipped, and Message is built positionally (keywords cost measurably more).
        plain = subtype is None and "bot_id" not in item and "bot_profile" not in item
        threaded = "thread_ts" in item or "replies" in item or "root" in item or "reply_count" in item
        return Message(
            self.channel,
            ts,
            _thread_ts(item, ts) if threaded else None,
            user_id,
            user_name,
            text,
            subtype,
            user_is_bot or (not plain and _is_bot_message(item, subtype)) or user_id == SLACKBOT_ID,
            _file_names(item) if "file" in item or "files" in item else [],
            _reactions(item) if "reactions" in item else [],
            bool(get("edited")),
            self.where,
            _reply_count(item) if "reply_count" in item or "replies" in item else 0,
        )

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
            detail = f"user {user_id} is not in users.json and has no user_profile"
            self.warnings.add("unknown_user", self.where, detail)
        return None


def _ts_string(value: Any) -> str | None:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return None
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.6f}"
    return None


def _thread_ts(item: dict[str, Any], ts: str) -> str | None:
    thread_ts = item.get("thread_ts")
    if thread_ts is not None:
        thread_ts = _ts_string(thread_ts)
        if thread_ts is not None:
            return thread_ts
    if item.get("replies") or item.get("reply_count"):  # old format: replies listed on the parent only
        return ts
    root = item.get("root")
    if isinstance(root, dict):  # a thread_broadcast copy that only carries its root
        return _ts_string(root.get("ts")) or _ts_string(root.get("thread_ts"))
    return None


def _reply_count(item: dict[str, Any]) -> int:
    count = item.get("reply_count")
    if isinstance(count, int):
        return count
    replies = item.get("replies")
    return len(replies) if isinstance(replies, list) else 0


def _is_bot_message(item: dict[str, Any], subtype: str | None) -> bool:
    if subtype in BOT_SUBTYPES:
        return True
    if subtype in _BOT_ID_IS_OBJECT:
        return False
    return bool(item.get("bot_id") or item.get("bot_profile")) or item.get("user") == SLACKBOT_ID


def _message_text(item: dict[str, Any]) -> str:
    text = item.get("text")
    if isinstance(text, str) and text.strip():
        return text
    attachments = item.get("attachments")
    if isinstance(attachments, list) and attachments:
        from_attachments = _attachments_text(attachments)
        if from_attachments:
            return from_attachments
    blocks = item.get("blocks")
    if isinstance(blocks, list) and blocks:
        return _blocks_text(blocks)
    return text if isinstance(text, str) else ""


def _attachments_text(attachments: list[Any]) -> str:
    out: list[str] = []
    for att in attachments:
        if not isinstance(att, dict):
            continue
        parts = [_clean_str(att.get(k)) for k in ("pretext", "title", "text")]
        for f in att.get("fields") or []:
            if isinstance(f, dict):
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


def _blocks_text(blocks: list[Any]) -> str:
    out: list[str] = []
    for block in blocks:
        if not isinstance(block, dict):
            continue
        btype = block.get("type")
        if btype == "rich_text":
            out.append("".join(_rich_element(e) for e in block.get("elements") or [] if isinstance(e, dict)))
        elif btype in ("section", "header", "context"):
            texts = [block.get("text")] + list(block.get("fields") or []) + list(block.get("elements") or [])
            for t in texts:
                if isinstance(t, dict) and isinstance(t.get("text"), str):
                    # mrkdwn text objects are escaped like message text; plain_text ones are raw
                    out.append(t["text"] if t.get("type") == "mrkdwn" else _escape(t["text"]))
    return "\n".join(p for p in out if p)


def _rich_element(element: dict[str, Any]) -> str:
    etype = element.get("type")
    children = [e for e in element.get("elements") or [] if isinstance(e, dict)]
    if etype == "rich_text_section":
        return "".join(_inline(e) for e in children)
    if etype == "rich_text_preformatted":
        return "```" + "".join(_inline(e, in_code=True) for e in children) + "```\n"
    if etype == "rich_text_quote":
        body = "".join(_inline(e) for e in children)
        return "\n".join("> " + line for line in body.split("\n")) + "\n"
    if etype == "rich_text_list":
        bullet = "1." if element.get("style") == "ordered" else "-"
        return "".join(f"{bullet} {_rich_element(e).strip()}\n" for e in children)
    return "".join(_inline(e) for e in children)


def _inline(element: dict[str, Any], in_code: bool = False) -> str:
    etype = element.get("type")
    if etype == "text":
        text = _escape(str(element.get("text", "")))
        style = element.get("style") if isinstance(element.get("style"), dict) else {}
        if style.get("code") and not in_code and text.strip() and "`" not in text:
            return f"`{text}`"
        return text
    if etype == "link":
        url = str(element.get("url", ""))
        label = element.get("text")
        if in_code:
            return _escape(str(label or url))
        return f"<{url}|{_escape(str(label))}>" if label else f"<{url}>"
    if in_code:
        return _escape(str(element.get("text") or element.get("name") or ""))
    if etype == "user":
        return f"<@{element.get('user_id', '')}>"
    if etype == "channel":
        return f"<#{element.get('channel_id', '')}>"
    if etype == "usergroup":
        return f"<!subteam^{element.get('usergroup_id', '')}>"
    if etype == "broadcast":
        return f"<!{element.get('range', 'here')}>"
    if etype == "emoji":
        return f":{element.get('name', '')}:"
    if etype == "date":
        return _escape(str(element.get("fallback", "")))
    return _escape(str(element.get("text", "")))


def _file_names(item: dict[str, Any]) -> list[str]:
    files = []
    if isinstance(item.get("file"), dict):
        files.append(item["file"])
    if isinstance(item.get("files"), list):
        files.extend(f for f in item["files"] if isinstance(f, dict))
    names = []
    for f in files:
        if f.get("mode") in ("hidden_by_limit", "tombstone"):
            continue
        name = _clean_str(f.get("name")) or _clean_str(f.get("title"))
        if name:
            names.append(name)
    return names


def _reactions(item: dict[str, Any]) -> list[tuple[str, int]]:
    reactions = item.get("reactions")
    if not isinstance(reactions, list):
        return []
    out = []
    for r in reactions:
        if not isinstance(r, dict) or not _clean_str(r.get("name")):
            continue
        count = r.get("count")
        if not isinstance(count, int):
            users = r.get("users")
            count = len(users) if isinstance(users, list) else 1
        out.append((r["name"].strip(), count))
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
