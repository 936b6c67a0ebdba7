"""One channel through the whole pipeline: messages -> posts -> conversations -> records -> part files.

:func:`run_channel` is what `prepare` runs for each channel, in-process or in a worker process
(``workers.py``). It reads the channel day file by day file (``slack/messages.py``), keeps the
messages worth a turn (:func:`drop_reason`) and cleans them (``slack/clean.py``), groups them into
whole conversations (``conversations.py``), windows each one and builds its records
(``records.py``), writes them into the channel's part files (``output.py``) and counts what
happened to every message on the way (``report.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from slackdist.config import DataConfig
from slackdist.data.conversations import ChannelGrouper, Conversation, Turn
from slackdist.data.output import PartWriter, SplitCounts
from slackdist.data.provenance import entry_line
from slackdist.data.records import RecordBuilder, Split
from slackdist.data.report import ReportBuilder
from slackdist.slack.clean import Cleaner
from slackdist.slack.consent import Consent
from slackdist.slack.export import ExportSource
from slackdist.slack.markup import MarkupContext
from slackdist.slack.messages import drop_reason, iter_messages
from slackdist.slack.metadata import Channel, UserInfo, channel_named
from slackdist.slack.warnings import Warnings


@dataclass
class Job:
    """What processing a channel needs; shared with worker processes by fork."""

    export: Path
    cfg: DataConfig
    users: dict[str, UserInfo]
    channels: list[Channel]
    builder: RecordBuilder
    workspace: str
    parts: Path | None
    split: Split
    consent: Consent | None = None  # --exclude-users / --only-users


@dataclass
class ChannelResult:
    """One channel's report, warnings and split counts (its records are in its part files)."""

    index: int
    report: ReportBuilder
    warnings: Warnings
    counts: SplitCounts


def run_channel(job: Job, src: ExportSource, index: int) -> ChannelResult:
    """Read, clean, group and write one channel.

    Every channel starts from the export's users (names learnt from ``user_profile`` stay within the
    channel), so the output does not depend on channel order or on the number of workers.
    """
    cfg = job.cfg
    channel = job.channels[index]
    users = dict(job.users)
    ctx = MarkupContext.from_users(users, job.channels, emoji_unicode=cfg.emoji_unicode)
    if job.consent is not None:
        ctx.users = job.consent.names(ctx.users)
    report = ReportBuilder(
        export=src.name, workspace=job.workspace, persona_mode=job.builder.persona_mode, preview=cfg.preview
    )
    warnings = Warnings()
    cleaner = Cleaner(cfg, ctx, report.redactions, job.consent)
    writer = PartWriter(job.parts, index, job.split)
    keep = _Keep(cfg.include_bots, cfg.include_bots and channel_named(channel, cfg.channels))
    try:
        for conv in _channel_conversations(src, channel, users, warnings, cleaner, report, keep, job.consent):
            _emit(conv, job.builder, report, writer)
    finally:
        writer.close()
    return ChannelResult(index, report, warnings, writer.counts)


FEED_NOTE = "bot_messages_that_are_feed_posts"


@dataclass(frozen=True)
class _Keep:
    """Which non-human messages one channel keeps (see ``drop_reason``)."""

    bots: bool  # --include-bots
    feeds: bool  # also integration feed posts: --include-bots and the channel named with --channels


def _channel_conversations(
    src: ExportSource,
    channel: Channel,
    users: dict[str, UserInfo],
    warnings: Warnings,
    cleaner: Cleaner,
    report: ReportBuilder,
    keep: _Keep,
    consent: Consent | None = None,
) -> Iterator[Conversation]:
    """Whole conversations of one channel, counting every message's fate on the way."""
    stats = report.channel(channel.name, channel.kind)
    grouper = ChannelGrouper(channel, gap_hours=cleaner.cfg.gap_hours)
    source = None
    for msg in iter_messages(src, channel, users, warnings, consent):
        if msg.source_file != source:
            source = msg.source_file
            report.day_files += 1
        if msg.excluded:
            reason: str | None = "excluded_user"
        else:
            reason = drop_reason(msg, include_bots=keep.bots, include_feeds=keep.feeds)
        if reason == "bot" and msg.is_feed:  # for the nothing-left hint: --include-bots would not keep it
            warnings.note(FEED_NOTE)
        post = cleaner(msg) if reason is None else None
        if reason is None and post is None:
            reason = "empty_after_cleaning"
        report.message(stats, reason)
        if post is None:
            grouper.note_dropped(msg.ts, msg.thread_ts)
            continue
        done = grouper.add(post)
        if done:
            yield from done
    yield from grouper.finish()
    report.quality.threads_reopened += grouper.threads_reopened
    report.quality.thread_parents_joined += grouper.parents_joined
    report.end_channel(channel)


def provenance_line(record_id: str, turns: list[Turn]) -> bytes:
    """The provenance of one record: the messages of the turns it holds, their writers, who they mention."""
    posts = [post for turn in turns for post in turn.posts]
    return entry_line(
        record_id,
        ((post.channel_id, post.ts, post.speaker_id) for post in posts),
        (uid for post in posts for uid in post.mentions),
    )


def _emit(conv: Conversation, builder: RecordBuilder, report: ReportBuilder, writer: PartWriter) -> None:
    """Window one whole conversation, build and write its records, account for it in the report."""
    plan, built = builder.build_conversation(conv)
    report.conversation(conv, plan, built)
    for window, b in built:
        if b.record is not None:
            report.record(window, b)
            writer.add(b.record, provenance_line(b.record["meta"]["conversation_id"], b.turns))
