"""Helpers for the data-stage tests: posts grouped the way `prepare` groups them."""

from __future__ import annotations

from collections.abc import Iterable

from slackdist.data.conversations import ChannelGrouper, Conversation
from slackdist.slack.metadata import Channel
from slackdist.slack.post import Post


def grouped(channel: Channel, posts: Iterable[Post], *, gap_hours: float = 2.0) -> list[Conversation]:
    """Every whole conversation of one channel's posts (day files in order), through the real grouper."""
    grouper = ChannelGrouper(channel, gap_hours=gap_hours)
    conversations = [c for post in posts for c in grouper.add(post)]
    return conversations + list(grouper.finish())
