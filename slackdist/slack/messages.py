"""Raw day-file items -> :class:`Message`: speaker, thread, bots and feeds, subtypes, and the keep/drop rule.

:func:`iter_messages` streams one channel day file by day file; :func:`drop_reason` says which
messages become part of a turn (people's messages) and why every other one does not (system
notices, bots, integration feeds, empty messages). Text stays raw mrkdwn here: ``clean.py`` cleans it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from slackdist.slack.consent import Consent
from slackdist.slack.content import fallback_text, file_names, reactions
from slackdist.slack.days import day_files, load_day_file
from slackdist.slack.export import ExportSource
from slackdist.slack.metadata import SLACKBOT_ID, UNKNOWN_USER, Channel, UserInfo, clean_str, user_from_dict
from slackdist.slack.warnings import Warnings, describe


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
    excluded: bool = False  # by a person left out (--exclude-users / --only-users): never a turn


# --------------------------------------------------------------------------------------------------
# Subtypes and the keep/drop decision

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


# --------------------------------------------------------------------------------------------------
# Day-file items -> Message


def iter_messages(
    src: ExportSource,
    channel: Channel,
    users: dict[str, UserInfo],
    warnings: Warnings,
    consent: Consent | None = None,
) -> Iterator[Message]:
    """Every message of a channel, day file by day file in date order, ts order within a file.

    Holds one day file in memory. Users missing from ``users`` but described by a message's
    ``user_profile`` are added to ``users`` (so later mentions of them resolve too). Items that are not
    messages, or have an invalid ``ts``, are skipped with a counted warning (``bad_message``, ``bad_ts``);
    parts of a message of the wrong JSON type (``attachments``, ``fields``, ``blocks``, ``elements``,
    ``files``, ``reactions`` ...) are skipped with a counted ``malformed_item`` warning that describes
    the part (its key and JSON type), never quotes it.

    With a ``consent``, a left-out person's message comes with ``excluded`` set and nothing of its
    content; other messages lose what they hold of left-out people (``Consent.scrub_item``).
    """
    parser = _DayParser(channel, users, warnings, src.limits.max_depth, consent)
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

    __slots__ = ("channel", "users", "warnings", "where", "unknown_seen", "problems", "max_depth", "consent")

    def __init__(
        self,
        channel: Channel,
        users: dict[str, UserInfo],
        warnings: Warnings,
        max_depth: int = 32,
        consent: Consent | None = None,
    ) -> None:
        self.channel = channel
        self.users = users
        self.warnings = warnings
        self.where = ""
        self.unknown_seen: set[str] = set()
        self.problems: list[str] = []  # malformed parts of the message being parsed (see _flush)
        self.max_depth = max_depth
        self.consent = consent

    def parse(self, item: Any, index: int = 0) -> Message | None:
        if type(item) is not dict:
            detail = f"item {index} is {describe(item)}, not a message object; skipped"
            self.warnings.add("bad_message", self.where, detail)
            return None
        get = item.get
        kind = get("type", "message")
        if kind != "message":
            self.warnings.note(f"not_a_message:{_label(kind) or 'malformed'}")
            return None
        ts = _ts_string(get("ts"))
        if ts is None:
            detail = f"item {index}: ts is {describe(get('ts'))}, not a Slack timestamp (seconds since 1970); skipped"
            self.warnings.add("bad_ts", self.where, detail)
            return None
        problems = self.problems
        if self.consent is not None:
            if self.consent.excludes(get("user")):
                return self._excluded(item, ts)
            item = self.consent.scrub_item(item)
            get = item.get
        subtype = get("subtype") or None
        if subtype is not None and _label(subtype) is None:
            problems.append(f"subtype is {describe(subtype)}, not a Slack subtype name; message dropped")
            subtype = "malformed"
        user_id, user_name, user_is_bot = self._speaker(item, subtype)
        text = get("text")
        typed = True  # the poster wrote text (message text or rich_text blocks), not only attachments
        if type(text) is not str or not text or text.isspace():
            if text is not None and type(text) is not str:
                problems.append(f"text is {describe(text)}, expected a string; ignored")
                text = ""
            text, typed = fallback_text(item, text, problems, self.max_depth)
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
            file_names(item, text, problems) if "file" in item or "files" in item else [],
            reactions(item, problems) if "reactions" in item else [],
            bool(get("edited")),
            self.where,
            _reply_count(item) if "reply_count" in item or "replies" in item else 0,
            is_bot and (not typed or user_id == SLACKBOT_ID),
        )
        if problems:
            self._flush(ts)
        return message

    def _excluded(self, item: dict[str, Any], ts: str) -> Message:
        """A left-out person's message: only where it sits (a thread's reply count needs it), no content."""
        threaded = "thread_ts" in item or "replies" in item or "root" in item or "reply_count" in item
        thread_ts = _thread_ts(item, ts, []) if threaded else None
        return Message(self.channel, ts, thread_ts, None, "", "", source_file=self.where, excluded=True)

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
                user_id = clean_str(item["comment"].get("user"))
        if not user_id:
            bot_profile = item.get("bot_profile") if isinstance(item.get("bot_profile"), dict) else {}
            name = clean_str(item.get("username")) or clean_str(bot_profile.get("name"))
            fallback = "bot" if item.get("bot_id") or subtype in BOT_SUBTYPES else UNKNOWN_USER
            return None, name or fallback, False
        info = self.users.get(user_id)
        if info is None:
            info = self._learn(user_id, item.get("user_profile"))
        if info is None:
            return user_id, clean_str(item.get("username")) or UNKNOWN_USER, user_id == SLACKBOT_ID
        return user_id, info.name, info.is_bot

    def _learn(self, user_id: str, profile: Any) -> UserInfo | None:
        """A user missing from users.json: take their ``user_profile`` (and remember it), or warn once."""
        if isinstance(profile, dict):
            info = user_from_dict({"id": user_id, "profile": profile, "name": profile.get("name")})
            if info is not None and info.name != UNKNOWN_USER:
                self.users[user_id] = info  # later messages and mentions of this id resolve too
                return info
        if user_id not in self.unknown_seen:
            self.unknown_seen.add(user_id)
            shown = user_id if _SLACK_ID_RE.fullmatch(user_id) else f"with an id that is {describe(user_id)}"
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


def _thread_ts(item: dict[str, Any], ts: str, problems: list[str]) -> str | None:
    thread_ts = item.get("thread_ts")
    if thread_ts is not None:
        valid = _ts_string(thread_ts)
        if valid is not None:
            return valid
        problems.append(f"thread_ts is {describe(thread_ts)}, not a Slack timestamp; read outside a thread")
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
