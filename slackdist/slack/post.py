"""The unit the conversation grouper works on: one kept human message, cleaned and redacted.

Its own module so that readers of conversations and records (`data/conversations.py`, training's
record reader) need not import the cleaner and its secret scanners (`slack/clean.py` builds posts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slackdist.slack.messages import Message


@dataclass(slots=True)
class Post:
    """One kept human message, already cleaned and redacted; the unit the grouper works on.

    Attributes:
        ts: the Slack ``ts`` string (unique within its channel).
        thread_ts: the thread it belongs to (== ts on a parent), or None.
        speaker: display name.
        speaker_id: Slack user id, when known.
        text: cleaned, redacted text.
        code: the fenced code blocks of the source, entities decoded, before any redaction: what the
            record must still hold byte for byte (the report checks it).
        code_redacted: for each block of ``code``, whether redaction changed it (the reason the report
            gives when the block is not intact).
        source: day file it came from (posts of one file are re-sorted by ts).
        channel_id: the channel it was read from (kept so mixing channels stays measurable).
        reply_count: on a thread parent, how many replies the export says it has (0: unknown).
        mentions: user ids its text mentions (``<@U123>``), left-out people's never (for provenance).
    """

    ts: str
    thread_ts: str | None
    speaker: str
    speaker_id: str | None
    text: str
    code: tuple[str, ...] = ()
    source: str = ""
    channel_id: str = ""
    reply_count: int = 0
    code_redacted: tuple[bool, ...] = ()
    mentions: tuple[str, ...] = ()
    time: float = field(init=False)

    def __post_init__(self) -> None:
        self.time = float(self.ts)

    @classmethod
    def from_message(
        cls,
        msg: Message,
        text: str,
        code: tuple[str, ...],
        speaker: str,
        code_redacted: tuple[bool, ...],
        mentions: tuple[str, ...] = (),
    ) -> Post:
        """The post of a message, with its cleaned, redacted ``text`` and ``speaker`` name."""
        ts, thread_ts = msg.ts, msg.thread_ts
        # Positional: this runs once per kept message, and keyword arguments cost measurably more here.
        return cls(
            ts,
            thread_ts,
            speaker,
            msg.user_id,
            text,
            code,
            msg.source_file,
            msg.channel.id,
            msg.reply_count if thread_ts == ts else 0,
            code_redacted,
            mentions,
        )

    @property
    def is_parent(self) -> bool:
        return self.thread_ts == self.ts
