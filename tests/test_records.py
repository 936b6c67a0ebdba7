"""Conversation -> chat record: roles, persona, system prompt, token budget, split."""

from __future__ import annotations

import dataclasses

import pytest
from data_helpers import grouped
from hypothesis import given, settings
from hypothesis import strategies as st

from slackdist.config import DEFAULT_SYSTEM_PROMPT, PERSONA_SYSTEM_PROMPT, DataConfig
from slackdist.data.conversations import TRUNCATION_MARK, split_windows
from slackdist.data.records import (
    _CHANNEL_SENTENCE,
    CharTokenCounter,
    PersonaMatcher,
    RecordBuilder,
    Split,
    alternate_roles,
    format_system_prompt,
    group_of,
    load_token_counter,
    validate_record,
)
from slackdist.errors import SlackdistError
from slackdist.slack.metadata import Channel
from slackdist.slack.post import Post

INFRA = Channel(id="C9", name="infra", kind="public", folder="infra")


def conv_of(
    speakers: list[str], *, start: float = 1_600_000_000.0, thread: bool = False, texts=None, channel=INFRA
):
    posts = []
    for i, who in enumerate(speakers):
        ts = f"{start + i * 60:.6f}"
        posts.append(
            Post(
                ts=ts,
                thread_ts=f"{start:.6f}" if thread else None,
                speaker=who.title(),
                speaker_id="U" + who.upper(),
                text=texts[i] if texts else f"{who} says {i}",
                source="d",
                channel_id=channel.id,
            )
        )
    (conv,) = grouped(channel, posts)
    return conv


def test_dm_system_prompt_names_the_participants_not_the_dm_id():
    dm = format_system_prompt(
        DEFAULT_SYSTEM_PROMPT, workspace="acme", channel="D0DMADAGR1", participants=["Ann", "Bob"]
    )
    assert dm.endswith("This conversation is a direct message between Ann and Bob.") and "D0DM" not in dm
    group = format_system_prompt(
        DEFAULT_SYSTEM_PROMPT, workspace="acme", channel="mpdm-a--b--c-1", participants=["Ann", "Bob", "Cat"]
    )
    assert "a group direct message between Ann, Bob and Cat." in group and "mpdm" not in group
    persona = format_system_prompt(
        DEFAULT_SYSTEM_PROMPT,
        workspace="acme",
        channel="D0DMADAGR1",
        persona="Ann",
        participants=["Ann", "Bob"],
    )
    assert persona.startswith("You are Ann") and "direct message between Ann and Bob" in persona
    custom = format_system_prompt(
        "{channel} | {participants}", workspace="w", channel="D0X", participants=["A", "B"]
    )
    assert custom == "A and B (direct message) | A and B"
    for template in (DEFAULT_SYSTEM_PROMPT, PERSONA_SYSTEM_PROMPT):
        assert _CHANNEL_SENTENCE in template  # the sentence a DM's prompt replaces


def test_dm_records_name_their_speakers_in_the_system_prompt():
    dm = Channel(id="D0DMADAGR1", name="D0DMADAGR1", kind="dm", folder="D0DMADAGR1")
    conv = conv_of(["ann", "bob"], channel=dm)
    builder = RecordBuilder(DataConfig(), workspace="acme")
    plan, built = builder.build_conversation(conv)
    system = built[0][1].record["messages"][0]["content"]
    assert "direct message between Ann and Bob" in system and "D0DM" not in system
    assert builder.system("general")[0].endswith("#general.")


def test_system_prompt_fills_workspace_channel_and_persona():
    s = format_system_prompt(DEFAULT_SYSTEM_PROMPT, workspace="acme", channel="#infra")
    assert "acme" in s and "#infra" in s and "##" not in s and "{" not in s
    p = format_system_prompt(DEFAULT_SYSTEM_PROMPT, workspace="acme", channel="infra", persona="Jane Doe")
    assert "Jane Doe" in p and "#infra" in p
    custom = format_system_prompt("{workspace}/{channel} {json: {x}}", workspace="w", channel="c")
    assert custom == "w/c {json: {x}}"


def test_alternate_roles_keep_the_closing_turn_of_an_odd_conversation_and_prefix_names():
    conv = conv_of(["ann", "bob", "ann", "cat", "bob"])
    rec = RecordBuilder(DataConfig(), workspace="acme").build(conv).record
    roles = [m["role"] for m in rec["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    # roles are counted back from the last turn; the opening two turns form one user message
    assert rec["messages"][1]["content"] == "Ann: ann says 0\nBob: bob says 1"
    assert rec["messages"][2]["content"] == "Ann: ann says 2"
    assert rec["messages"][4]["content"] == "Bob: bob says 4"  # the closing turn is the assistant's
    assert rec["meta"]["speakers"] == ["Ann", "Bob", "Cat"]
    assert rec["meta"]["end"] == conv.turns[-1].end
    assert rec["meta"]["channel"] == "infra" and rec["meta"]["thread_ts"] is None
    assert rec["meta"]["conversation_id"] == conv.id
    assert validate_record(rec) == []


def test_even_conversations_alternate_from_the_first_turn():
    rec = RecordBuilder(DataConfig(), workspace="acme").build(conv_of(["ann", "bob", "ann", "bob"])).record
    assert [m["content"] for m in rec["messages"][1:]] == [
        f"{w.title()}: {w} says {i}" for i, w in enumerate(["ann", "bob", "ann", "bob"])
    ]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200))
def test_alternate_roles_spans_cover_every_turn_once(n):
    spans = alternate_roles(n)
    if n < 2:
        assert spans == []
        return
    assert [i for _, a, b in spans for i in range(a, b)] == list(range(n))  # every turn, once, in order
    roles = [r for r, _, _ in spans]
    assert roles[0] == "user" and roles[-1] == "assistant" and len(roles) % 2 == 0
    assert all(a != b for a, b in zip(roles, roles[1:], strict=False))
    assert all(b - a == 1 for _, a, b in spans[1:])  # only the opening message may hold two turns


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["ann", "bob", "cat", "dan", "eve"]), min_size=0, max_size=45), st.booleans())
def test_alternate_records_lose_no_turn(speakers, names):
    """Any number of turns and speakers: every turn reaches the record, in order, roles alternating."""
    posts = [
        Post(
            ts=f"{1e9 + i:.6f}",
            thread_ts=None,
            speaker=w.title(),
            speaker_id="U" + w,
            text=f"{w} {i}",
            source="d",
        )
        for i, w in enumerate(speakers)
    ]
    convs = grouped(INFRA, posts)
    builder = RecordBuilder(
        DataConfig(speaker_names=names, max_turns=10_000, max_tokens=10**9), workspace="w"
    )
    for conv in convs:
        built = builder.build(conv)
        if len(conv.turns) < 2:
            assert built.record is None and built.reason == "too_short"
            continue
        msgs = built.record["messages"]
        assert validate_record(built.record) == []
        assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * ((len(msgs) - 1) // 2)
        assert built.used_turns == list(range(len(conv.turns)))
        body = "\n".join(m["content"] for m in msgs[1:])
        at = 0
        for turn in conv.turns:  # each turn's text, in order
            at = body.index(turn.text, at) + len(turn.text)
        assert [t for g in built.groups for t in g] == conv.turns


def test_no_speaker_names():
    rec = (
        RecordBuilder(DataConfig(speaker_names=False), workspace="acme").build(conv_of(["ann", "bob"])).record
    )
    assert rec["messages"][1]["content"] == "ann says 0"


def test_persona_turns_are_assistant_and_runs_merge():
    conv = conv_of(["jane", "ann", "bob", "jane", "cat", "jane", "bob"])
    cfg = DataConfig(persona="Jane", roles="persona")
    rec = RecordBuilder(cfg, workspace="acme").build(conv).record
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    # leading persona turn dropped (a record opens with the user), Ann + Bob merged, trailing Bob dropped
    assert rec["messages"][1]["content"] == "Ann: ann says 1\nBob: bob says 2"
    assert rec["messages"][2]["content"] == "jane says 3"  # the persona's own words carry no name
    assert "Jane" in rec["messages"][0]["content"]


def test_persona_matches_user_id_and_skips_conversations_without_an_answer():
    cfg = DataConfig(persona="UJANE", roles="persona")
    assert RecordBuilder(cfg, workspace="").build(conv_of(["ann", "jane"])).record is not None
    built = RecordBuilder(cfg, workspace="w").build(conv_of(["ann", "bob", "ann"]))
    assert built.record is None and built.reason == "persona_never_answers"
    matcher = PersonaMatcher("jane doe", frozenset({"U7"}))
    builder = RecordBuilder(DataConfig(persona="jane doe"), workspace="w", persona=matcher)
    assert builder.persona_mode  # --as implies persona roles


def test_persona_mode_without_a_name_is_an_error():
    with pytest.raises(SlackdistError):
        RecordBuilder(DataConfig(roles="persona"), workspace="w")


def test_a_record_over_the_budget_is_not_trimmed_but_reported():
    texts = ["x" * 400] * 6
    conv = conv_of(["ann", "bob"] * 3, texts=texts)
    counter = CharTokenCounter()
    system_cost = counter.base(format_system_prompt(DEFAULT_SYSTEM_PROMPT, workspace="w", channel="infra"))
    pair = 2 * counter.turn("Ann: " + "x" * 400)
    cfg = DataConfig(max_tokens=system_cost + pair + 5)
    built = RecordBuilder(cfg, workspace="w").build(conv)
    assert built.record is None and built.reason == "over_token_budget" and built.tokens > cfg.max_tokens


class UnderCounter(CharTokenCounter):
    """Says a turn costs half what it costs in the rendered record (as a real tokenizer can be off)."""

    def turn(self, content: str) -> int:
        return super().turn(content) // 2


def test_records_over_the_budget_after_rendering_are_windowed_again_without_losing_a_turn():
    conv = conv_of(["ann", "bob"] * 6, texts=["y" * 300] * 12)
    cfg = DataConfig(max_tokens=600, max_turns=40, window_overlap=1)
    builder = RecordBuilder(cfg, workspace="w", counter=UnderCounter())
    _, base = builder.system("infra")
    first_plan = split_windows(conv, max_tokens=600, overlap=1, turn_cost=builder.turn_cost, base_cost=base)
    assert builder.build(first_plan.windows[0]).reason == "over_token_budget"  # the estimate was too low
    plan, built = builder.build_conversation(conv)
    assert built and all(b.record is not None for _, b in built)
    assert all(b.tokens <= cfg.max_tokens for _, b in built)
    assert {i for _, b in built for i in b.used_turns} == set(range(12))
    assert [w.window for w, _ in built] == list(range(len(built)))  # ids stay in order


def test_an_over_budget_thread_parent_is_truncated_and_opens_the_thread():
    parent = "why does the deploy fail? " * 2000
    conv = conv_of(
        ["ann", "bob", "ann", "bob"], thread=True, texts=[parent, "check the logs", "which ones", "prod"]
    )
    cfg = DataConfig(max_tokens=2048)
    plan, built = RecordBuilder(cfg, workspace="w").build_conversation(conv)
    assert plan.truncated == [0] and plan.over_budget == []
    (window, b) = built[0]
    assert window.turns[0].index == 0 and window.turns[0].truncated
    first = b.record["messages"][1]["content"]
    assert first.startswith("Ann: why does the deploy fail?") and first.endswith(TRUNCATION_MARK)
    assert b.tokens <= cfg.max_tokens
    assert {i for _, b in built for i in b.used_turns} == {0, 1, 2, 3}


def test_real_tokenizer_counts_through_the_chat_template(tiny_model_dir):
    counter = load_token_counter(str(tiny_model_dir))
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"},
    ]
    n = counter.record(messages)
    tok = counter.tokenizer
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert n == len(ids) and tok.convert_ids_to_tokens(ids)[-1] == "<|eot_id|>"
    # per-turn estimate + base equals the rendered length for this simple record
    est = counter.base("sys") + counter.turn("hello there") + counter.turn("hi")
    assert abs(est - n) <= 2


def test_bad_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(SlackdistError, match=str(tmp_path)):
        load_token_counter(str(tmp_path / "nope"))


def test_split_by_hash_is_stable_and_keeps_windows_together():
    split = Split((0.8, 0.1, 0.1), "hash", seed=3)
    window_ids = [f"{i:016x}-{w}" for i in range(300) for w in range(2)] + [f"{7:016x}-1.0"]  # a late part
    groups = {group_of({"meta": {"conversation_id": cid}}) for cid in window_ids}
    assert len(groups) == 300  # every window and part of a conversation shares its group
    assign = split.assign({g: 0.0 for g in groups})
    assert sorted(set(assign.values())) == [0, 1, 2] and 200 < list(assign.values()).count(0) < 280
    assert all(split.now(g) == assign[g] for g in groups)  # streaming and at the end: the same answer
    assert Split((0.8, 0.1, 0.1), "hash", seed=3).assign({g: 0.0 for g in groups}) == assign
    assert Split((0.8, 0.1, 0.1), "hash", seed=4).assign({g: 0.0 for g in groups}) != assign
    assert all(Split((1.0, 0.0, 0.0), "hash").now(g) == 0 for g in groups)


def test_split_by_time_puts_the_newest_conversations_in_test():
    split = Split((0.8, 0.1, 0.1), "time")
    starts = {f"g{i:02d}": float(i) for i in range(20)}
    assign = split.assign(starts)
    assert sorted(g for g, s in assign.items() if s == 2) == ["g18", "g19"]
    assert sorted(g for g, s in assign.items() if s == 1) == ["g16", "g17"]
    assert all(s == 0 for g, s in assign.items() if starts[g] < 16)
    assert split.now("g00") is None  # by time, no conversation's split is known before all are
    assert split.assign({}) == {}


def test_split_follows_the_config():
    split = Split.from_config(DataConfig(split="70,20,10", split_by="time", seed=9))
    assert split == Split((0.7, 0.2, 0.1), "time", 9)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(["ann", "bob", "cat", "dan"]), min_size=2, max_size=60),
    st.sampled_from(["alternate", "persona"]),
    st.booleans(),
)
def test_records_alternate_and_end_on_the_assistant(speakers, roles, names):
    cfg = DataConfig(roles=roles, persona="Bob" if roles == "persona" else None, speaker_names=names)
    conv = conv_of(speakers)
    builder = RecordBuilder(cfg, workspace="w")
    plan = split_windows(
        conv,
        max_turns=cfg.max_turns,
        overlap=cfg.window_overlap,
        turn_cost=builder.turn_cost,
        max_tokens=None,
    )
    for window in plan.windows:
        built = builder.build(window)
        if built.record is None:
            assert built.reason in ("too_short", "persona_never_answers")
            continue
        assert validate_record(built.record) == []
        roles_seen = [m["role"] for m in built.record["messages"]]
        assert roles_seen[-1] == "assistant"
        if roles == "persona":
            by_index = {t.index: t for t in window.turns}
            # every assistant message holds Bob's words only, every user message nobody's but others'
            for m in built.record["messages"][1:]:
                assert ("bob says" in m["content"]) == (m["role"] == "assistant")
            assert all(by_index[i].speaker in ("Ann", "Bob", "Cat", "Dan") for i in built.used_turns)


def test_record_meta_is_exact():
    conv = dataclasses.replace(conv_of(["ann", "bob"], thread=True))
    rec = RecordBuilder(DataConfig(), workspace="").build(conv).record
    assert rec["meta"]["thread_ts"] == conv.thread_ts
    assert rec["meta"]["start"] == conv.turns[0].start and rec["meta"]["end"] == conv.turns[1].end
