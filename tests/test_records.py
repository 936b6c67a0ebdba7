"""Conversation -> chat record: roles, persona, system prompt, token budget, split."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slackdist.config import DEFAULT_SYSTEM_PROMPT, DataConfig
from slackdist.data.conversations import Post, group_channel, split_windows
from slackdist.data.records import (
    CharTokenCounter,
    PersonaMatcher,
    RecordBuilder,
    format_system_prompt,
    group_of,
    hash_split,
    load_token_counter,
    split_records,
    time_split,
    to_record,
    validate_record,
)
from slackdist.errors import SlackdistError
from slackdist.slack.export import Channel

INFRA = Channel(id="C9", name="infra", kind="public", folder="infra")


def conv_of(speakers: list[str], *, start: float = 1_600_000_000.0, thread: bool = False, texts=None):
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
                channel_id=INFRA.id,
            )
        )
    (conv,) = group_channel(INFRA, posts, gap_hours=2)
    return conv


def test_system_prompt_fills_workspace_channel_and_persona():
    s = format_system_prompt(DEFAULT_SYSTEM_PROMPT, workspace="acme", channel="#infra")
    assert "acme" in s and "#infra" in s and "##" not in s and "{" not in s
    p = format_system_prompt(DEFAULT_SYSTEM_PROMPT, workspace="acme", channel="infra", persona="Jane Doe")
    assert "Jane Doe" in p and "#infra" in p
    custom = format_system_prompt("{workspace}/{channel} {json: {x}}", workspace="w", channel="c")
    assert custom == "w/c {json: {x}}"


def test_alternate_roles_drop_the_trailing_user_turn_and_prefix_names():
    conv = conv_of(["ann", "bob", "ann", "cat", "bob"])
    rec = to_record(conv, DataConfig(), workspace="acme")
    roles = [m["role"] for m in rec["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert rec["messages"][1]["content"] == "Ann: ann says 0"
    assert rec["messages"][4]["content"] == "Cat: cat says 3"
    assert rec["meta"]["speakers"] == ["Ann", "Bob", "Cat"]  # Bob's trailing turn is not in the record
    assert rec["meta"]["channel"] == "infra" and rec["meta"]["thread_ts"] is None
    assert rec["meta"]["conversation_id"] == conv.id
    assert validate_record(rec) == []


def test_no_speaker_names():
    rec = to_record(conv_of(["ann", "bob"]), DataConfig(speaker_names=False), workspace="acme")
    assert rec["messages"][1]["content"] == "ann says 0"


def test_persona_turns_are_assistant_and_runs_merge():
    conv = conv_of(["jane", "ann", "bob", "jane", "cat", "jane", "bob"])
    cfg = DataConfig(persona="Jane", roles="persona")
    rec = to_record(conv, cfg, workspace="acme")
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    # leading persona turn dropped (a record opens with the user), Ann + Bob merged, trailing Bob dropped
    assert rec["messages"][1]["content"] == "Ann: ann says 1\nBob: bob says 2"
    assert rec["messages"][2]["content"] == "jane says 3"  # the persona's own words carry no name
    assert "Jane" in rec["messages"][0]["content"]


def test_persona_matches_user_id_and_skips_conversations_without_an_answer():
    cfg = DataConfig(persona="UJANE", roles="persona")
    assert to_record(conv_of(["ann", "jane"]), cfg) is not None
    built = RecordBuilder(cfg, workspace="w").build(conv_of(["ann", "bob", "ann"]))
    assert built.record is None and built.reason == "persona_never_answers"
    matcher = PersonaMatcher("jane doe", frozenset({"U7"}))
    builder = RecordBuilder(DataConfig(persona="jane doe"), workspace="w", persona=matcher)
    assert builder.persona_mode  # --as implies persona roles


def test_persona_mode_without_a_name_is_an_error():
    with pytest.raises(SlackdistError):
        RecordBuilder(DataConfig(roles="persona"), workspace="w")


def test_token_budget_trims_whole_pairs_or_drops():
    texts = ["x" * 400] * 6
    conv = conv_of(["ann", "bob"] * 3, texts=texts)
    counter = CharTokenCounter()
    system_cost = counter.base(format_system_prompt(DEFAULT_SYSTEM_PROMPT, workspace="w", channel="infra"))
    pair = 2 * counter.turn("Ann: " + "x" * 400)
    cfg = DataConfig(max_tokens=system_cost + pair + 5)
    built = RecordBuilder(cfg, workspace="w").build(conv)
    assert built.reason == "trimmed_to_token_budget" and len(built.record["messages"]) == 3
    assert built.tokens <= cfg.max_tokens and built.used_turns == [0, 1]
    tiny = RecordBuilder(DataConfig(max_tokens=50), workspace="w").build(conv)
    assert tiny.record is None and tiny.reason == "over_token_budget"


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


def _rec(group: str, window: int, start: float) -> dict:
    return {"messages": [], "meta": {"conversation_id": f"{group}-{window}", "start": start}}


def test_split_keeps_windows_together_and_is_stable():
    records = [_rec(f"g{i:03d}", w, float(i)) for i in range(300) for w in range(2)]
    train, val, test = split_records(records, (0.8, 0.1, 0.1), by="hash", seed=3)
    assert len(train) + len(val) + len(test) == 600
    groups = [{group_of(r) for r in part} for part in (train, val, test)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert all(len(g) > 0 for g in groups)
    assert split_records(records, (0.8, 0.1, 0.1), by="hash", seed=3) == (train, val, test)
    assert hash_split("g001", (0.8, 0.1, 0.1), 3) == hash_split("g001", (0.8, 0.1, 0.1), 3)
    assert split_records(records, (0.8, 0.1, 0.1), by="hash", seed=4) != (train, val, test)


def test_time_split_puts_the_newest_conversations_in_test():
    records = [_rec(f"g{i:02d}", 0, float(i)) for i in range(20)]
    train, val, test = split_records(records, (0.8, 0.1, 0.1), by="time")
    assert [r["meta"]["start"] for r in test] == [18.0, 19.0]
    assert [r["meta"]["start"] for r in val] == [16.0, 17.0]
    assert max(r["meta"]["start"] for r in train) < 16
    assert time_split({}, (0.9, 0.05, 0.05)) == {}


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
    rec = to_record(conv, DataConfig())
    assert rec["meta"]["thread_ts"] == conv.thread_ts
    assert rec["meta"]["start"] == conv.turns[0].start and rec["meta"]["end"] == conv.turns[1].end
