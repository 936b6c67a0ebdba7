"""Grouping: threads across day files, time windows, turns, overlapping windows."""

from __future__ import annotations

from collections import Counter

from data_helpers import grouped
from hypothesis import given, settings
from hypothesis import strategies as st

from slackdist.config import DataConfig
from slackdist.data.conversations import (
    TRUNCATION_MARK,
    ChannelGrouper,
    conversation_id,
    merge_turns,
    pair_caps,
    split_group,
    split_windows,
    truncate_turn,
    window_bounds,
)
from slackdist.slack.clean import Cleaner
from slackdist.slack.markup import MarkupContext
from slackdist.slack.messages import Message
from slackdist.slack.metadata import Channel
from slackdist.slack.post import Post

GENERAL = Channel(id="C1", name="general", kind="public", folder="general")
RANDOM = Channel(id="C2", name="random", kind="public", folder="random")
HOUR = 3600.0


def post(
    t: float, who: str, text: str = "", *, thread: float | None = None, day: str = "d1", ch: str = "C1"
) -> Post:
    ts = f"{t:.6f}"
    return Post(
        ts=ts,
        thread_ts=None if thread is None else f"{thread:.6f}",
        speaker=who,
        speaker_id="U" + who,
        text=text or f"{who} at {t}",
        source=day,
        channel_id=ch,
    )


def test_thread_with_late_replies_in_later_day_files_is_one_conversation():
    posts = [
        post(1000, "ann", "question?", thread=1000, day="2020-01-01"),
        post(1100, "bob", "unrelated", day="2020-01-01"),
        post(1200, "cat", "answer", thread=1000, day="2020-01-01"),
        post(90000, "dan", "chatter", day="2020-01-02"),
        post(5_000_000, "bob", "late answer", thread=1000, day="2020-03-01"),
    ]
    convs = list(grouped(GENERAL, posts))
    threads = [c for c in convs if c.thread_ts is not None]
    assert len(threads) == 1
    thread = threads[0]
    assert [t.text for t in thread.turns] == ["question?", "answer", "late answer"]
    assert thread.parent_present and thread.n_replies == 2
    flows = [c for c in convs if c.thread_ts is None]
    # the two non-thread messages are a day apart: two single-message windows
    assert sorted(t.text for c in flows for t in c.turns) == ["chatter", "unrelated"]
    assert all(len(c.turns) == 1 for c in flows)


def test_thread_without_parent_is_a_conversation_of_its_replies():
    posts = [post(2000, "ann", "re 1", thread=1000), post(2100, "bob", "re 2", thread=1000)]
    (conv,) = grouped(GENERAL, posts)
    assert conv.thread_ts == f"{1000:.6f}" and not conv.parent_present
    assert [t.speaker for t in conv.turns] == ["ann", "bob"]


def test_thread_broadcast_copy_is_counted_once():
    reply = post(1200, "bob", "also to channel", thread=1000)
    posts = [post(1000, "ann", "q", thread=1000), reply, reply]
    (conv,) = grouped(GENERAL, posts)
    assert conv.n_messages == 2 and conv.n_replies == 1


def test_gap_splits_time_windows_and_same_speaker_joins_one_turn():
    posts = [
        post(0, "ann", "a1"),
        post(60, "ann", "a2"),
        post(120, "bob", "b1"),
        post(120 + 2 * HOUR - 1, "ann", "a3"),  # just under the gap: same conversation
        post(120 + 4 * HOUR, "bob", "b2"),  # gap >= 2 h: new conversation
    ]
    first, second = grouped(GENERAL, posts)
    assert [(t.speaker, t.text, t.n_messages) for t in first.turns] == [
        ("ann", "a1\na2", 2),
        ("bob", "b1", 1),
        ("ann", "a3", 1),
    ]
    assert [t.text for t in second.turns] == ["b2"]
    assert first.id == conversation_id("C1", posts[0].ts) and first.id != second.id


def test_messages_out_of_order_inside_a_day_file_are_sorted():
    posts = [post(300, "bob", "second", day="d"), post(100, "ann", "first", day="d")]
    (conv,) = grouped(GENERAL, posts)
    assert [t.text for t in conv.turns] == ["first", "second"]


def test_same_ts_in_two_channels_never_mixes():
    a = [post(1000, "ann", "in general", thread=1000, ch="C1"), post(1001, "bob", "re", thread=1000, ch="C1")]
    b = [post(1000, "cat", "in random", thread=1000, ch="C2"), post(1001, "dan", "re", thread=1000, ch="C2")]
    convs = grouped(GENERAL, a) + grouped(RANDOM, b)
    assert len(convs) == 2
    for conv in convs:
        assert {cid for t in conv.turns for cid in t.channel_ids} == {conv.channel.id}
    assert convs[0].id != convs[1].id


def test_cleaned_messages_group_and_a_window_of_one_speaker_is_too_short():
    def msg(ts: str, user: str) -> Message:
        return Message(GENERAL, ts, None, "U" + user, user, f"hi from <#C2|{user}>", source_file="d1")

    clean = Cleaner(DataConfig(), MarkupContext(), Counter())
    posts = [
        clean(msg("1.0", "ann")),
        clean(msg("2.0", "bob")),
        clean(msg("99999.0", "ann")),
        clean(msg("99999.5", "ann")),
    ]
    windows = [w for c in grouped(GENERAL, posts) for w in split_windows(c).windows]
    # second window is one speaker only -> not a conversation
    assert len(windows) == 1 and windows[0].speakers == ["ann", "bob"]
    assert [t.text for t in windows[0].turns] == ["hi from #ann", "hi from #bob"]


def _alternating(n: int) -> list[Post]:
    return [post(i * 10, "ann" if i % 2 == 0 else "bob", f"message {i}\nline two") for i in range(n)]


def test_long_conversation_is_split_into_overlapping_windows_between_messages():
    (conv,) = grouped(GENERAL, _alternating(100))
    plan = split_windows(conv, max_turns=40, overlap=4)
    spans = [(w.turns[0].index, w.turns[-1].index + 1) for w in plan.windows]
    assert spans == [(0, 40), (36, 76), (72, 100)]
    assert [w.window for w in plan.windows] == [0, 1, 2]
    assert len({w.id for w in plan.windows}) == 3 and len({split_group(w.id) for w in plan.windows}) == 1
    # never cut inside a message: every window's turns are whole original messages
    for w in plan.windows:
        assert all(t.text.endswith("\nline two") for t in w.turns)


def test_token_budget_windows_and_turns_over_budget():
    costs = [10, 10, 10, 100, 10, 10]
    windows, skipped = window_bounds(costs, max_turns=40, overlap=1, budget=25)
    assert skipped == [3]
    assert windows == [(0, 2), (1, 3), (4, 6)]
    for a, b in windows:
        assert sum(costs[a:b]) <= 25 and not (a <= 3 < b)


def test_split_windows_respects_token_budget():
    (conv,) = grouped(GENERAL, _alternating(30))
    plan = split_windows(conv, max_turns=40, overlap=2, max_tokens=60, turn_cost=lambda t: 10, base_cost=20)
    assert len(plan.windows) > 1
    assert all(len(w.turns) * 10 + 20 <= 60 for w in plan.windows)
    covered = {t.index for w in plan.windows for t in w.turns}
    assert covered == set(range(30))


def test_merge_turns_keeps_code_and_channel():
    p1 = post(0, "ann", "a")
    p1.code = ("x = 1",)
    p2 = post(1, "ann", "b")
    p2.code = ("y = 2",)
    (turn,) = merge_turns([p1, p2])
    assert turn.code == ("x = 1", "y = 2") and turn.channel_ids == {"C1"} and turn.n_messages == 2


# ---------------------------------------------------------------- properties

_events = st.lists(
    st.tuples(
        st.integers(0, 1),  # channel
        st.integers(0, 5),  # speaker
        st.integers(1, 20_000),  # seconds since previous message
        st.sampled_from(["flow", "parent", "bare", "reply"]),  # bare: a parent without thread fields
        st.integers(0, 3),  # which open thread a reply goes to
    ),
    max_size=60,
)


def _build(events):
    channels = [GENERAL, RANDOM]
    t = [1_000_000.0, 1_000_000.0]
    parents: list[list[float]] = [[], []]
    per_channel: list[list[Post]] = [[], []]
    for ch, who, dt, kind, which in events:
        t[ch] += dt
        thread = None
        if kind in ("parent", "bare"):
            thread = t[ch] if kind == "parent" else None
            parents[ch].append(t[ch])
        elif kind == "reply":
            # a reply to a known parent, or to one outside the export (missing parent)
            thread = parents[ch][which % len(parents[ch])] if parents[ch] else 1.0 + which
        day = f"day{int(t[ch] // 86400)}"
        per_channel[ch].append(post(t[ch], f"s{who}", thread=thread, day=day, ch=channels[ch].id))
    return list(zip(channels, per_channel, strict=True))


@settings(max_examples=150, deadline=None)
@given(_events)
def test_every_post_lands_in_exactly_one_whole_conversation(events):
    data = _build(events)
    for channel, posts in data:
        convs = list(grouped(channel, posts))
        seen = [p for c in convs for t in c.turns for p in range(t.n_messages)]
        assert len(seen) == len(posts)
        for c in convs:
            assert {cid for t in c.turns for cid in t.channel_ids} <= {channel.id}
            starts = [t.start for t in c.turns]
            assert starts == sorted(starts)
            # consecutive turns are by different speakers
            assert all(a.speaker != b.speaker for a, b in zip(c.turns, c.turns[1:], strict=False))
        threads = {c.thread_ts: c for c in convs if c.thread_ts is not None}
        for p in posts:  # (a bare parent claimed by its replies has its thread_ts now)
            if p.thread_ts is not None:
                assert any(p.text in t.text for t in threads[p.thread_ts].turns)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=120), st.integers(2, 12), st.integers(0, 11))
def test_windows_cover_every_turn_and_stay_within_max_turns(speakers, max_turns, overlap):
    overlap = min(overlap, max_turns - 1)
    posts = [post(i * 10, f"s{s}") for i, s in enumerate(speakers)]
    (conv,) = grouped(GENERAL, posts)
    plan = split_windows(conv, min_turns=1, max_turns=max_turns, overlap=overlap)
    windows = plan.windows + plan.too_short
    assert all(1 <= len(w.turns) <= max_turns for w in windows)
    covered = sorted({t.index for w in windows for t in w.turns})
    assert covered == list(range(len(conv.turns)))
    firsts = [w.turns[0].index for w in sorted(windows, key=lambda w: w.window)]
    assert firsts == sorted(set(firsts))  # every window moves forward


def test_thread_closes_once_all_announced_replies_are_read_and_late_extras_keep_the_split_key():
    grouper = ChannelGrouper(GENERAL, gap_hours=2)
    parent = post(1000, "ann", "q", thread=1000, day="d1")
    parent.reply_count = 2
    out = list(grouper.add(parent))
    out += grouper.add(post(1100, "bob", "a1", thread=1000, day="d1"))
    grouper.note_dropped(f"{1200:.6f}", f"{1000:.6f}")  # a bot reply counts towards reply_count
    out += grouper.add(post(90000, "cat", "other", day="d2"))  # next day file: the thread is complete
    assert [c.thread_ts for c in out] == [f"{1000:.6f}"] and out[0].n_messages == 2
    assert grouper.open_posts == 1
    out += grouper.add(post(200000, "dan", "stale count reply", thread=1000, day="d3"))
    out += grouper.finish()
    assert grouper.threads_reopened == 1
    extra = [c for c in out if c.thread_ts and c.part == 1]
    assert len(extra) == 1 and not extra[0].parent_present
    assert split_group(extra[0].id) == split_group(out[0].id) and extra[0].id != out[0].id


# ---------------------------------------------------------------- parents without thread fields


def test_a_parent_without_thread_fields_is_joined_to_its_replies():
    posts = [
        post(1000, "ann", "chatter before", day="d1"),
        post(1100, "bob", "how do I deploy?", day="d1"),  # the parent, exported without thread_ts
        post(1200, "cat", "more chatter", day="d1"),
        post(1300, "dan", "with make deploy", thread=1100, day="d1"),
        post(40_000, "bob", "thanks, worked", thread=1100, day="d2"),  # a later day file
    ]
    grouper = ChannelGrouper(GENERAL, gap_hours=2)
    convs = [c for p in posts for c in grouper.add(p)] + list(grouper.finish())
    (thread,) = [c for c in convs if c.thread_ts is not None]
    assert [t.text for t in thread.turns] == ["how do I deploy?", "with make deploy", "thanks, worked"]
    assert thread.parent_present and thread.thread_ts == f"{1100:.6f}" and thread.n_replies == 2
    (window,) = [c for c in convs if c.thread_ts is None]
    assert [t.text for t in window.turns] == ["chatter before", "more chatter"]
    assert grouper.parents_joined == 1


def test_a_parent_whose_replies_come_after_the_join_horizon_stays_in_its_window():
    posts = [
        post(1000, "ann", "question", day="d1"),
        post(1100, "bob", "answer", day="d1"),
        post(1000 + 3 * 86400, "cat", "late reply", thread=1000, day="d4"),
        post(1000 + 3 * 86400 + 60, "dan", "later reply", thread=1000, day="d4"),
    ]
    grouper = ChannelGrouper(GENERAL, gap_hours=2, join_hours=24)
    convs = [c for p in posts for c in grouper.add(p)] + list(grouper.finish())
    (thread,) = [c for c in convs if c.thread_ts is not None]
    assert not thread.parent_present and [t.text for t in thread.turns] == ["late reply", "later reply"]
    (window,) = [c for c in convs if c.thread_ts is None]
    assert [t.text for t in window.turns] == ["question", "answer"] and grouper.parents_joined == 0


def test_replies_read_before_their_bare_parent_still_get_it():
    posts = [post(1200, "cat", "re", thread=1000, day="d"), post(1000, "ann", "q", day="d")]
    posts[0].time, posts[1].time = 900.0, 1000.0  # a reply sorted first (clock skew)
    grouper = ChannelGrouper(GENERAL, gap_hours=2)
    convs = [c for p in posts for c in grouper.add(p)] + list(grouper.finish())
    assert len(convs) == 1 and convs[0].parent_present and convs[0].n_messages == 2


# ---------------------------------------------------------------- turns too long for the budget


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=30), st.integers(2, 4000))
def test_pair_caps_let_every_two_neighbours_share_a_window(costs, budget):
    caps = pair_caps(costs, budget)
    assert all(0 <= c <= o for c, o in zip(caps, costs, strict=True))
    assert all(a + b <= budget for a, b in zip(caps, caps[1:], strict=False))
    for i, (c, o) in enumerate(zip(caps, costs, strict=True)):
        if c < o:  # only a turn that could not share a window with a neighbour is cut
            assert any(o + costs[j] > budget for j in (i - 1, i + 1) if 0 <= j < len(costs))
            assert c >= min(budget // 2, o) or any(
                c + caps[j] == budget for j in (i - 1, i + 1) if 0 <= j < len(caps)
            )


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=3000), st.integers(5, 400), st.booleans())
def test_truncate_turn_fits_keeps_the_head_and_closes_fences(text, max_cost, fenced):
    if fenced:
        text = "see:\n```\n" + text
    turn = merge_turns([post(0, "ann", text or "x")])[0]
    cost = lambda t: len(t.text) // 4 + 1  # noqa: E731
    cut = truncate_turn(turn, max_cost, cost)
    assert cut.truncated and cut.text.endswith(TRUNCATION_MARK) and cut.posts == turn.posts
    head = cut.text[: -len(TRUNCATION_MARK)]
    if cost(cut) <= max_cost:
        assert head.count("```") % 2 == 0
    closed = head[:-4] if head.endswith("\n```") and turn.text.count("```") % 2 else head
    assert turn.text.startswith(closed.rstrip()) or turn.text.startswith(head)
    assert len(TRUNCATION_MARK) // 4 + 1 > max_cost or cost(cut) <= max_cost


def test_split_windows_truncates_a_turn_too_long_to_share_a_window():
    posts = [post(0, "ann", "x" * 40_000), post(10, "bob", "short"), post(20, "ann", "ok")]
    (conv,) = grouped(GENERAL, posts)
    cost = lambda t: len(t.text) // 4 + 1  # noqa: E731
    plan = split_windows(conv, max_tokens=2048, turn_cost=cost, base_cost=48)
    assert plan.truncated == [0] and plan.over_budget == []
    # the cut turn fills what its neighbour leaves: two overlapping windows, the first opening with it
    assert [[t.index for t in w.turns] for w in plan.windows] == [[0, 1], [1, 2]]
    assert all(sum(map(cost, w.turns)) <= 2000 for w in plan.windows)
    assert (
        plan.windows[0].turns[0].truncated and conv.turns[0].text == "x" * 40_000
    )  # the source is untouched
