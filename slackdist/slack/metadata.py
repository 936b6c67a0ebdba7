"""The export's metadata: who the users are (users.json) and which conversations to read.

Users come from ``users.json`` and Enterprise Grid's ``org_users.json``; conversations from
``channels.json``, ``groups.json`` (private), ``dms.json``, ``mpims.json``,
``file_conversations.json``, and from folders with no metadata entry. Odd metadata (``[""]``,
``[]``, blanks, bad JSON) never crashes anything: it reads as empty, with a counted warning.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from slackdist.errors import SlackdistError
from slackdist.slack.export import ExportSource, FileTooLarge
from slackdist.slack.warnings import Warnings, json_problem

ChannelKind = Literal["public", "private", "dm", "mpim"]


@dataclass(frozen=True)
class Channel:
    id: str
    name: str  # channel name, or the DM/mpim folder name
    kind: ChannelKind
    folder: str  # folder name inside the export


UNKNOWN_USER = "unknown-user"
SLACKBOT_ID = "USLACKBOT"
_DM_FOLDER_RE = re.compile(r"^D[A-Z0-9]{8,}$")


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
    email: str = ""


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
            warnings.add("bad_metadata", src.where(rel), f"unreadable JSON ({json_problem(e)}); ignored")
        return []
    if isinstance(data, dict):  # some tools write {"channels": [...]} or one object
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        return []
    return [item for item in data if isinstance(item, dict)]


def clean_str(value: Any) -> str:
    """A JSON value as text: a string without surrounding whitespace; any other value ``""``."""
    return value.strip() if isinstance(value, str) else ""


def user_from_dict(user: dict[str, Any]) -> UserInfo | None:
    """A users.json entry (or one built from a message's ``user_profile``); None without an id."""
    uid = clean_str(user.get("id"))
    if not uid:
        return None
    profile = user.get("profile") if isinstance(user.get("profile"), dict) else {}
    display = clean_str(profile.get("display_name")) or clean_str(user.get("display_name"))
    real = clean_str(profile.get("real_name")) or clean_str(user.get("real_name"))
    username = clean_str(user.get("name"))
    return UserInfo(
        id=uid,
        name=display or real or username or UNKNOWN_USER,
        real_name=real,
        display_name=display,
        username=username,
        is_bot=bool(user.get("is_bot") or user.get("is_app_user")) or uid == SLACKBOT_ID,
        deleted=bool(user.get("deleted")),
        email=clean_str(profile.get("email")),
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
            info = user_from_dict(item)
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
    cid = clean_str(item.get("id"))
    name = clean_str(item.get("name"))
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
