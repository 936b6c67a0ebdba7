"""Cleaned messages -> conversations: threads, time windows, turns, overlapping windows.

A thread (parent + replies in ts order) is one conversation, however many day files its replies
are spread over. Messages outside threads are grouped per channel while the gap to the previous
one stays under ``gap_hours``. Consecutive messages of one speaker form one turn. Conversations
longer than ``max_turns`` turns or the token budget are cut into overlapping windows, always
between messages.

Memory: the time window of a channel is closed (and yielded) as soon as a gap passes, so at most
one window per channel is open. Slack threads take replies for ever (a reply can come months
later, in a later day file), so a thread stays open until its channel's last day file has been
read. Only compact cleaned posts are kept for it; the bound is therefore the cleaned text of the
threaded messages of ONE channel (plus one day file of that channel), never the whole export.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from slackdist.slack.export import Channel, Message


@dataclass(slots=True)
class Post:
    """One kept human message, already cleaned and redacted; the unit the grouper works on.

    Attributes:
        ts: the Slack ``ts`` string (unique within its channel).
        thread_ts: the thread it belongs to (== ts on a parent), or None.
        speaker: display name.
        speaker_id: Slack user id, when known.
        text: cleaned text.
        code: the fenced code blocks the text must still hold byte-for-byte (for the report).
        source: day file it came from (posts of one file are re-sorted by ts).
        channel_id: the channel it was read from (kept so mixing channels stays measurable).
        reply_count: on a thread parent, how many replies the export says it has (0: unknown).
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
    time: float = field(init=False)

    def __post_init__(self) -> None:
        self.time = float(self.ts)

    @classmethod
    def from_message(cls, msg: Message, text: str | None = None, code: tuple[str, ...] = ()) -> Post:
        """A post from a Message; ``text`` replaces the message text (the cleaned one)."""
        ts, thread_ts = msg.ts, msg.thread_ts
        # Positional: this runs once per kept message, and keyword arguments cost measurably more here.
        return cls(
            ts,
            thread_ts,
            msg.user_name,
            msg.user_id,
            msg.text if text is None else text,
            code,
            msg.source_file,
            msg.channel.id,
            msg.reply_count if thread_ts == ts else 0,
        )

    @property
    def in_thread(self) -> bool:
        return self.thread_ts is not None

    @property
    def is_parent(self) -> bool:
        return self.thread_ts == self.ts


@dataclass(slots=True)
class Turn:
    """Consecutive messages of one speaker, joined by newlines."""

    speaker: str
    speaker_id: str | None
    text: str
    start: float
    end: float
    n_messages: int = 1
    channel_ids: frozenset[str] = frozenset()
    code: tuple[str, ...] = ()
    index: int = 0  # position in the whole (unwindowed) conversation

    @property
    def speaker_key(self) -> str:
        return self.speaker_id or self.speaker


@dataclass
class Conversation:
    """A thread or a time window of one channel (or one window of a long one).

    Attributes:
        id: stable id: hash of channel id + root ts, then ``-<window index>``.
        channel: where it happened.
        thread_ts: the thread's ts, or None for a time window.
        turns: the turns in order.
        root_ts: thread_ts, or the ts of the first message of the whole conversation.
        window: index of this window (0 when not split).
        part: > 0 for replies that came after their thread was closed (see ChannelGrouper).
        parent_present: for threads, whether the parent message was in the export.
        n_replies: for threads, how many replies (human, kept) it holds.
    """

    id: str
    channel: Channel
    thread_ts: str | None
    turns: list[Turn]
    root_ts: str
    window: int = 0
    part: int = 0
    parent_present: bool = True
    n_replies: int = 0

    @property
    def start(self) -> float:
        return self.turns[0].start if self.turns else float(self.root_ts)

    @property
    def end(self) -> float:
        return self.turns[-1].end if self.turns else float(self.root_ts)

    @property
    def speakers(self) -> list[str]:
        """Speaker names in order of first appearance."""
        return list(dict.fromkeys(t.speaker for t in self.turns))

    @property
    def group_id(self) -> str:
        """The id shared by every window of one conversation (what the split keys on)."""
        return self.id.rsplit("-", 1)[0]

    @property
    def n_messages(self) -> int:
        return sum(t.n_messages for t in self.turns)


_TIME = operator.attrgetter("time")  # sort key for posts


def conversation_id(channel_id: str, root_ts: str, window: int = 0, part: int = 0) -> str:
    """Stable id of one window of a conversation: ``<16 hex of sha1(channel:root)>-<window>``.

    ``part`` > 0 numbers the pieces of a thread that got replies after it was closed
    (``<hex>-<part>.<window>``); every id of one thread shares the part before the last ``-``,
    which is what the split keys on.
    """
    digest = hashlib.sha1(f"{channel_id}:{root_ts}".encode()).hexdigest()[:16]
    return f"{digest}-{window}" if part == 0 else f"{digest}-{part}.{window}"


def merge_turns(posts: list[Post]) -> list[Turn]:
    """Join consecutive posts of one speaker into turns (posts must be in ts order)."""
    turns: list[Turn] = []
    last: Turn | None = None
    last_key = None
    for post in posts:
        key = post.speaker_id or post.speaker
        if last is not None and last_key == key:
            last.text = f"{last.text}\n{post.text}"
            last.end = post.time
            last.n_messages += 1
            last.code = last.code + post.code
            if post.channel_id not in last.channel_ids:
                last.channel_ids = last.channel_ids | {post.channel_id}
            continue
        # speaker, speaker_id, text, start, end, n_messages, channel_ids, code, index
        last = Turn(
            post.speaker,
            post.speaker_id,
            post.text,
            post.time,
            post.time,
            1,
            frozenset((post.channel_id,)),
            post.code,
            len(turns),
        )
        last_key = key
        turns.append(last)
    return turns


@dataclass
class _Thread:
    posts: dict[str, Post] = field(default_factory=dict)  # ts -> post (dedupes thread_broadcast copies)
    reply_ts: set[str] = field(default_factory=set)  # every reply seen, kept or dropped (bots ...)
    expected: int = 0  # the parent's reply_count (0: unknown)
    parent_present: bool = False

    @property
    def complete(self) -> bool:
        return self.parent_present and self.expected > 0 and len(self.reply_ts) >= self.expected


class ChannelGrouper:
    """Streams one channel's posts (day files in date order) and yields whole conversations.

    Time windows are yielded as soon as the gap passes. A thread is yielded as soon as every reply
    its parent announces (``reply_count``) has been read, else at :meth:`finish`, the end of the
    channel: a reply can come months later, and an export without reply counts (or with deleted
    replies) gives no other signal that a thread is over. Replies that still arrive for a thread
    closed early (a stale count) become a further part of it with the same split key.
    """

    def __init__(self, channel: Channel, *, gap_hours: float) -> None:
        self.channel = channel
        self.gap = gap_hours * 3600.0
        self._window: list[Post] = []
        self._threads: dict[str, _Thread] = {}
        self._closed: dict[str, int] = {}  # thread_ts -> parts yielded so far
        self._touched: set[str] = set()
        self._day: list[Post] = []
        self._day_source: str | None = None
        self.threads_reopened = 0

    def add(self, post: Post) -> list[Conversation]:
        """Add one post; returns the conversations that the previous day file completed (usually none).

        A list rather than a generator: this runs once per kept message, and almost every call
        returns nothing.
        """
        if post.source == self._day_source:
            self._day.append(post)
            return []
        done = list(self._flush_day())
        self._day_source = post.source
        self._day.append(post)
        return done

    def note_dropped(self, ts: str, thread_ts: str | None) -> None:
        """A message of this channel that is not a post (bot, system, empty): counts as a thread reply."""
        if thread_ts is not None and thread_ts != ts and thread_ts not in self._closed:
            self._threads.setdefault(thread_ts, _Thread()).reply_ts.add(ts)
            self._touched.add(thread_ts)

    def finish(self) -> Iterator[Conversation]:
        """End of the channel: yield the open window and every open thread (in order of their root ts)."""
        yield from self._flush_day()
        if self._window:
            yield self._window_conversation(self._window)
            self._window = []
        threads, self._threads = self._threads, {}
        for thread_ts in sorted(threads, key=float):
            thread = threads.pop(thread_ts)
            if thread.posts:
                yield self._thread_conversation(thread_ts, thread)

    @property
    def open_posts(self) -> int:
        """Posts held right now (for memory accounting)."""
        return len(self._window) + len(self._day) + sum(len(t.posts) for t in self._threads.values())

    def _flush_day(self) -> Iterator[Conversation]:
        # Day files are in date order, but messages inside one are not guaranteed to be sorted.
        day, self._day = self._day, []
        day.sort(key=_TIME)
        for post in day:
            if post.thread_ts is not None:
                self._add_to_thread(post)
                continue
            if self._window and post.time - self._window[-1].time >= self.gap:
                yield self._window_conversation(self._window)
                self._window = []
            self._window.append(post)
        touched, self._touched = self._touched, set()
        for thread_ts in sorted(touched, key=float):
            thread = self._threads.get(thread_ts)
            if thread is not None and thread.complete:
                del self._threads[thread_ts]
                yield self._thread_conversation(thread_ts, thread)

    def _add_to_thread(self, post: Post) -> None:
        thread_ts = post.thread_ts
        assert thread_ts is not None
        thread = self._threads.get(thread_ts)
        if thread is None:
            if thread_ts in self._closed:
                self.threads_reopened += 1
            thread = self._threads[thread_ts] = _Thread()
        thread.posts.setdefault(post.ts, post)
        if post.is_parent:
            thread.parent_present = True
            thread.expected = max(thread.expected, post.reply_count)
        else:
            thread.reply_ts.add(post.ts)
        self._touched.add(thread_ts)

    def _window_conversation(self, posts: list[Post]) -> Conversation:
        root = posts[0].ts
        return Conversation(
            id=conversation_id(self.channel.id, root),
            channel=self.channel,
            thread_ts=None,
            turns=merge_turns(posts),
            root_ts=root,
        )

    def _thread_conversation(self, thread_ts: str, thread: _Thread) -> Conversation:
        part = self._closed.get(thread_ts, 0)
        self._closed[thread_ts] = part + 1
        posts = sorted(thread.posts.values(), key=_TIME)
        return Conversation(
            id=conversation_id(self.channel.id, thread_ts, 0, part),
            channel=self.channel,
            thread_ts=thread_ts,
            turns=merge_turns(posts),
            root_ts=thread_ts,
            part=part,
            parent_present=thread.parent_present,
            n_replies=sum(1 for p in posts if not p.is_parent),
        )


def group_channel(
    channel: Channel, posts: Iterable[Post | Message], *, gap_hours: float
) -> Iterator[Conversation]:
    """All whole conversations of one channel (any length, not yet windowed or filtered)."""
    grouper = ChannelGrouper(channel, gap_hours=gap_hours)
    for item in posts:
        post = item if isinstance(item, Post) else Post.from_message(item)
        yield from grouper.add(post)
    yield from grouper.finish()


@dataclass
class WindowPlan:
    """How one conversation is cut: the kept windows and what was left out.

    Attributes:
        windows: eligible windows (each a Conversation with its own id).
        too_short: windows dropped for fewer than min_turns turns or fewer than 2 speakers.
        over_budget: indices of turns that alone exceed the token budget (dropped).
    """

    windows: list[Conversation]
    too_short: list[Conversation]
    over_budget: list[int]


def _eligible(turns: list[Turn], min_turns: int) -> bool:
    return len(turns) >= min_turns and len({t.speaker_key for t in turns}) >= 2


def window_bounds(
    costs: list[int], *, max_turns: int, overlap: int, budget: int | None
) -> tuple[list[tuple[int, int]], list[int]]:
    """Greedy [start, end) windows over turns with the given token costs.

    Each window holds at most ``max_turns`` turns and at most ``budget`` tokens; the next window
    starts ``overlap`` turns before the previous end (at most half the previous window, and always
    at least one turn further). A turn whose own cost exceeds the budget is left out and no window
    reaches across it.

    Returns:
        (windows, indices of turns over budget)
    """
    n = len(costs)
    windows: list[tuple[int, int]] = []
    skipped: list[int] = []
    i = 0
    while i < n:
        if budget is not None and costs[i] > budget:
            skipped.append(i)
            i += 1
            continue
        j, total = i, 0
        while j < n and j - i < max_turns and (budget is None or total + costs[j] <= budget):
            total += costs[j]
            j += 1
        windows.append((i, j))
        if j >= n:
            break
        if budget is not None and costs[j] > budget:
            i = j
            continue
        i = max(j - min(overlap, (j - i) // 2), i + 1)
    return windows, skipped


def split_windows(
    conv: Conversation,
    *,
    min_turns: int = 2,
    max_turns: int = 40,
    overlap: int = 4,
    max_tokens: int | None = None,
    turn_cost: Callable[[Turn], int] | None = None,
    base_cost: int = 0,
) -> WindowPlan:
    """Cut a whole conversation into windows that fit max_turns and the token budget.

    Args:
        conv: a whole conversation from :func:`group_channel`.
        min_turns: a window needs this many turns from at least 2 speakers.
        max_turns: most turns per window.
        overlap: turns shared by consecutive windows.
        max_tokens: token budget of one record (None: no budget).
        turn_cost: tokens one turn costs in a record (default: ~4 characters a token).
        base_cost: tokens every record costs anyway (system prompt, template).
    """
    cost = turn_cost or (lambda t: len(t.text) // 4 + 1)
    costs = [cost(t) for t in conv.turns]
    budget = None if max_tokens is None else max_tokens - base_cost
    if costs and len(costs) <= max_turns and (budget is None or sum(costs) <= budget):
        bounds, skipped = [(0, len(costs))], []  # what window_bounds gives when it all fits (costs >= 0)
    else:
        bounds, skipped = window_bounds(costs, max_turns=max_turns, overlap=overlap, budget=budget)
    plan = WindowPlan(windows=[], too_short=[], over_budget=skipped)
    if len(bounds) == 1 and bounds[0] == (0, len(conv.turns)):  # the common case: it fits as it is
        (plan.windows if _eligible(conv.turns, min_turns) else plan.too_short).append(conv)
        return plan
    windows_turns = [conv.turns[a:b] for a, b in bounds]
    for k, turns in enumerate(windows_turns):
        window = Conversation(
            id=conversation_id(conv.channel.id, conv.root_ts, k, conv.part),
            channel=conv.channel,
            thread_ts=conv.thread_ts,
            turns=turns,
            root_ts=conv.root_ts,
            window=k,
            part=conv.part,
            parent_present=conv.parent_present,
            n_replies=conv.n_replies,
        )
        (plan.windows if _eligible(turns, min_turns) else plan.too_short).append(window)
    return plan


def group_conversations(
    messages_by_channel: Iterable[tuple[Channel, Iterable[Post | Message]]],
    *,
    gap_hours: float = 2.0,
    min_turns: int = 2,
    max_turns: int = 40,
    window_overlap: int = 4,
    max_tokens: int | None = None,
    turn_cost: Callable[[Turn], int] | None = None,
    base_cost: int = 0,
) -> Iterator[Conversation]:
    """Every eligible conversation window of every channel, streamed.

    Args:
        messages_by_channel: (channel, its cleaned posts or messages in day-file order) pairs.
        gap_hours: a gap this long outside threads starts a new conversation.
        min_turns: fewest turns (from at least 2 speakers) a conversation needs.
        max_turns: longer conversations are split into overlapping windows.
        window_overlap: turns shared by consecutive windows.
        max_tokens: token budget of one window (None: none).
        turn_cost: tokens one turn costs (default ~4 characters a token).
        base_cost: tokens every record costs anyway.
    """
    for channel, posts in messages_by_channel:
        for conv in group_channel(channel, posts, gap_hours=gap_hours):
            plan = split_windows(
                conv,
                min_turns=min_turns,
                max_turns=max_turns,
                overlap=window_overlap,
                max_tokens=max_tokens,
                turn_cost=turn_cost,
                base_cost=base_cost,
            )
            yield from plan.windows


__all__ = [
    "ChannelGrouper",
    "Conversation",
    "Post",
    "Turn",
    "WindowPlan",
    "conversation_id",
    "group_channel",
    "group_conversations",
    "merge_turns",
    "split_windows",
    "window_bounds",
]
