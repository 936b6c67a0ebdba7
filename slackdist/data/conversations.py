"""Posts (cleaned messages, `slack/clean.py`) -> conversations: threads, time windows, turns, windows.

A thread (parent + replies in ts order) is one conversation, however many day files its replies
are spread over. Messages outside threads are grouped per channel while the gap to the previous
one stays under ``gap_hours``. Consecutive messages of one speaker form one turn. Conversations
longer than ``max_turns`` turns or the token budget are cut into overlapping windows, always
between messages; a message too long to share a window with its neighbour is truncated (with
:data:`TRUNCATION_MARK`), never dropped, so a record never starts mid-thread.

A thread parent exported without thread fields (no ``thread_ts``, ``reply_count`` or ``replies``)
looks like an ordinary message; the first reply that names its ts in ``thread_ts`` pulls it out of
its time window into the thread. For that, closed time windows are held back ``join_hours`` (24)
before they are yielded.

Memory: a time window is yielded ``join_hours`` after a gap closed it, so a channel holds the
windows of its last day or so. Slack threads take replies for ever (a reply can come months
later, in a later day file), so a thread stays open until its channel's last day file has been
read. Only compact cleaned posts are kept for it; the bound is therefore the cleaned text of the
threaded messages of ONE channel (plus a day of its other messages), never the whole export.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import operator
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from slackdist.slack.metadata import Channel
from slackdist.slack.post import Post

#: Appended to a message cut to fit the token budget (see :func:`truncate_turn`).
TRUNCATION_MARK = " […]"


@dataclass(slots=True)
class Turn:
    """Consecutive messages of one speaker, joined by newlines.

    ``posts`` are the messages it holds (the report checks each one against the written records);
    ``truncated`` is set when the text was cut to fit the token budget.
    """

    speaker: str
    speaker_id: str | None
    text: str
    start: float
    end: float
    n_messages: int = 1
    channel_ids: frozenset[str] = frozenset()
    code: tuple[str, ...] = ()
    index: int = 0  # position in the whole (unwindowed) conversation
    posts: list[Post] = field(default_factory=list)
    truncated: bool = False

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


def split_group(conversation_id: str) -> str:
    """The part of a conversation id that every window and part of the conversation share.

    The train/validation/test split keys on it, so no conversation is in two splits.
    """
    return conversation_id.rsplit("-", 1)[0]


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
            last.posts.append(post)
            if post.code:
                last.code = last.code + post.code
            if post.channel_id not in last.channel_ids:
                last.channel_ids = last.channel_ids | {post.channel_id}
            continue
        # speaker, speaker_id, text, start, end, n_messages, channel_ids, code, index, posts
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
            [post],
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
    parent_searched: bool = False  # looked for a parent without thread fields among the held windows

    @property
    def complete(self) -> bool:
        return self.parent_present and self.expected > 0 and len(self.reply_ts) >= self.expected


class ChannelGrouper:
    """Streams one channel's posts (day files in date order) and yields whole conversations.

    Time windows are closed when the gap passes and yielded ``join_hours`` later: until then a reply
    whose ``thread_ts`` names one of their posts (a parent exported without thread fields) moves
    that post into its thread. A thread is yielded as soon as every reply its parent announces
    (``reply_count``) has been read, else at :meth:`finish`, the end of the channel: a reply can
    come months later, and an export without reply counts (or with deleted replies) gives no other
    signal that a thread is over. Replies that still arrive for a thread closed early (a stale
    count) become a further part of it with the same split key.
    """

    def __init__(self, channel: Channel, *, gap_hours: float, join_hours: float = 24.0) -> None:
        self.channel = channel
        self.gap = gap_hours * 3600.0
        self.hold = max(join_hours, 0.0) * 3600.0
        self._expiry = max(self.gap, self.hold)  # the open window is closed for sure after this long
        self._window: list[Post] = []
        self._held: deque[list[Post]] = deque()  # closed windows, oldest first, not yet yielded
        self._threads: dict[str, _Thread] = {}
        self._closed: dict[str, int] = {}  # thread_ts -> parts yielded so far
        self._touched: set[str] = set()
        self._day: list[Post] = []
        self._day_source: str | None = None
        self._window_roots: set[str] = set()  # first ts of every window yielded (their ids' root)
        self.threads_reopened = 0
        self.parents_joined = 0  # parents without thread fields joined to their replies

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
        """End of the channel: yield the held and open windows and every open thread (in order of their root ts)."""
        yield from self._flush_day()
        if self._window:
            self._held.append(self._window)
            self._window = []
        while self._held:
            yield self._window_conversation(self._held.popleft())
        threads, self._threads = self._threads, {}
        for thread_ts in sorted(threads, key=float):
            thread = threads.pop(thread_ts)
            if thread.posts:
                yield self._thread_conversation(thread_ts, thread)

    @property
    def open_posts(self) -> int:
        """Posts held right now (for memory accounting)."""
        held = sum(len(w) for w in self._held)
        return len(self._window) + held + len(self._day) + sum(len(t.posts) for t in self._threads.values())

    def _flush_day(self) -> Iterator[Conversation]:
        # Day files are in date order, but messages inside one are not guaranteed to be sorted.
        day, self._day = self._day, []
        day.sort(key=_TIME)
        held = self._held
        for post in day:
            # A window is yielded once it is too old for a reply to claim one of its posts as parent.
            if self._window and post.time - self._window[-1].time >= self._expiry:
                held.append(self._window)
                self._window = []
            while held and post.time - held[0][-1].time >= self.hold:
                yield self._window_conversation(held.popleft())
            if post.thread_ts is None and post.ts in self._threads and self._threads[post.ts].posts:
                post.thread_ts = post.ts  # its (kept) replies came first: a parent without thread fields
                self.parents_joined += 1
            if post.thread_ts is not None:
                self._add_to_thread(post)
                continue
            if self._window and post.time - self._window[-1].time >= self.gap:
                held.append(self._window)
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
        if post.is_parent:
            thread.posts.setdefault(post.ts, post)
            thread.parent_present = True
            thread.expected = max(thread.expected, post.reply_count)
        else:
            if not thread.parent_present and not thread.parent_searched:
                thread.parent_searched = True
                parent = self._claim(thread_ts)
                if parent is not None:
                    parent.thread_ts = parent.ts
                    thread.posts[parent.ts] = parent
                    thread.parent_present = True
                    self.parents_joined += 1
            thread.posts.setdefault(post.ts, post)
            thread.reply_ts.add(post.ts)
        self._touched.add(thread_ts)

    def _claim(self, ts: str) -> Post | None:
        """Take the post with this ts out of the open or a held window (a parent without thread fields)."""
        t = float(ts)
        for window in (*self._held, self._window):
            if not window or not window[0].time <= t <= window[-1].time:
                continue
            i = bisect.bisect_left(window, t, key=_TIME)
            while i < len(window) and window[i].time == t:
                if window[i].ts == ts:
                    post = window.pop(i)
                    if not window and window is not self._window:
                        self._held.remove(window)
                    return post
                i += 1
        return None

    def _window_conversation(self, posts: list[Post]) -> Conversation:
        root = posts[0].ts
        self._window_roots.add(root)
        return Conversation(
            id=conversation_id(self.channel.id, root),
            channel=self.channel,
            thread_ts=None,
            turns=merge_turns(posts),
            root_ts=root,
        )

    def _thread_conversation(self, thread_ts: str, thread: _Thread) -> Conversation:
        part = self._closed.get(thread_ts, 0)
        if part == 0 and not thread.parent_present and thread_ts in self._window_roots:
            # Its parent (never joined) opened a time window, whose id has the same root: number the
            # replies as a further part, so ids stay unique and the split still keeps them together.
            part = 1
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


@dataclass
class WindowPlan:
    """How one conversation is cut: the kept windows and what was left out.

    Attributes:
        windows: eligible windows (each a Conversation with its own id).
        too_short: windows dropped for fewer than min_turns turns or fewer than 2 speakers.
        over_budget: indices of turns that alone exceed the token budget even after truncation
            (dropped; only a token counter that grows when text shrinks can cause it).
        truncated: indices of turns cut to fit the budget beside a neighbour.
    """

    windows: list[Conversation]
    too_short: list[Conversation]
    over_budget: list[int]
    truncated: list[int] = field(default_factory=list)


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


def pair_caps(costs: list[int], budget: int) -> list[int]:
    """The most each turn may cost so that every two neighbours fit the budget together.

    A window needs at least two turns, so a turn that cannot share a window with the next one (or
    the one before) would end up alone, and be lost. Only turns that are too long are lowered: of
    two neighbours over the budget, the longer gives way first, down to half the budget.
    """
    caps = list(costs)
    half = budget // 2
    for i in range(len(caps) - 1):
        a, b = caps[i], caps[i + 1]
        if a + b <= budget:
            continue
        if a >= b:
            caps[i] = max(budget - b, half)
            caps[i + 1] = min(b, budget - caps[i])
        else:
            caps[i + 1] = max(budget - a, half)
            caps[i] = min(a, budget - caps[i + 1])
    return caps


def truncate_turn(turn: Turn, max_cost: int, cost: Callable[[Turn], int]) -> Turn:
    """The turn with its text cut (at a word boundary when one is near) to cost at most ``max_cost``.

    The cut text ends with :data:`TRUNCATION_MARK`; an open code fence is closed first, so the rest
    of the record is not read as code. The longest prefix that fits is found by bisection, so a
    real tokenizer is asked about 17 times for a 100,000-character message.
    """
    text = turn.text

    def cut(k: int) -> Turn:
        head = text[:k].rstrip()
        if head.count("```") % 2:
            head += "\n```"
        return dataclasses.replace(turn, text=head + TRUNCATION_MARK, truncated=True)

    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(cut(mid)) <= max_cost:
            lo = mid
        else:
            hi = mid - 1
    space = max(text.rfind(" ", 0, lo), text.rfind("\n", 0, lo))
    if space > 0.8 * lo and cost(cut(space)) <= max_cost:
        lo = space
    return cut(lo)


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

    A turn too long to share a window with a neighbour is truncated first (:func:`pair_caps`), so
    an over-long thread parent still opens its thread's first window.

    Args:
        conv: a whole conversation from :class:`ChannelGrouper`.
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
    truncated: list[int] = []
    if budget is not None and len(costs) > 1 and sum(costs) > budget:
        caps = pair_caps(costs, budget)
        if caps != costs:
            turns = list(conv.turns)
            for i, (c, cap) in enumerate(zip(costs, caps, strict=True)):
                if c > cap:
                    turns[i] = truncate_turn(turns[i], cap, cost)
                    costs[i] = cost(turns[i])
                    truncated.append(i)
            conv = dataclasses.replace(conv, turns=turns)
    if costs and len(costs) <= max_turns and (budget is None or sum(costs) <= budget):
        bounds, skipped = [(0, len(costs))], []  # what window_bounds gives when it all fits (costs >= 0)
    else:
        bounds, skipped = window_bounds(costs, max_turns=max_turns, overlap=overlap, budget=budget)
    plan = WindowPlan(windows=[], too_short=[], over_budget=skipped, truncated=truncated)
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


__all__ = [
    "TRUNCATION_MARK",
    "ChannelGrouper",
    "Conversation",
    "Turn",
    "WindowPlan",
    "conversation_id",
    "merge_turns",
    "pair_caps",
    "split_group",
    "split_windows",
    "truncate_turn",
    "window_bounds",
]
