"""Slack export (folder or .zip) -> a stream of Message, one day file at a time.

INTERFACE (owned by the ingest work; the fields below are fixed, the reader is to be written).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ChannelKind = Literal["public", "private", "dm", "mpim"]


@dataclass(frozen=True)
class Channel:
    id: str
    name: str  # channel name, or the DM/mpim folder name
    kind: ChannelKind
    folder: str  # folder name inside the export


@dataclass
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

    @property
    def time(self) -> float:
        return float(self.ts)

    @property
    def key(self) -> tuple[str, str]:
        return (self.channel.id, self.ts)

    @property
    def is_reply(self) -> bool:
        return self.thread_ts is not None and self.thread_ts != self.ts
