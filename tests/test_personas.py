"""Several personas: `prepare --as "A,B"` trains the model to answer as either; `chat --as A` picks one.

Each persona's turns are the assistant's, with the speaker's name kept (the model learns who says
what); each record's system prompt names the personas that answer in it, so a record where only A
answers has exactly the prompt `chat --as A` gives; conversations where none of them answers are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slackdist.config import Config, DataConfig
from slackdist.data.prepare import prepare
from slackdist.data.records import PersonaMatcher, RecordBuilder, persona_label, persona_names
from slackdist.model.info import ModelInfo
from slackdist.slack.metadata import Channel
from slackdist.slack.post import Post

SAMPLE = Path(__file__).parent / "fixtures" / "sample_export"
INFRA = Channel(id="C1", name="infra", kind="public", folder="infra")


def conversation(speakers: list[str]):
    from data_helpers import grouped

    posts = [
        Post(
            ts=f"{1_600_000_000 + 60 * i}.000000",
            thread_ts=None,
            speaker=who.title(),
            speaker_id="U" + who.upper(),
            text=f"{who} says {i}",
            source="d",
            channel_id=INFRA.id,
        )  # fmt: skip
        for i, who in enumerate(speakers)
    ]
    (conv,) = grouped(INFRA, posts)
    return conv


def builder(spec: str) -> RecordBuilder:
    return RecordBuilder(DataConfig(persona=spec), workspace="acme")


def test_names_and_labels() -> None:
    assert persona_names(" Ann, @Bob ,,Ann") == ["Ann", "Bob"]
    assert persona_names(None) == []
    assert persona_label(["Ann"]) == "Ann" and persona_label(["Ann", "Bob", "Cat"]) == "Ann, Bob or Cat"


def test_each_persona_answers_with_its_name_and_the_prompt_names_who_answers() -> None:
    conv = conversation(["ann", "grace", "bob", "ada", "grace", "cat"])
    record = builder("Grace, Ada").build(conv).record
    assert record is not None
    roles = [m["role"] for m in record["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]  # trailing Cat: no answer after it
    assert record["messages"][2]["content"] == "Grace: grace says 1"
    assert record["messages"][4]["content"] == "Ada: ada says 3\nGrace: grace says 4"  # one run, both named
    assert record["messages"][3]["content"] == "Bob: bob says 2"
    assert record["messages"][0]["content"].startswith("You are Grace or Ada, a member of the acme")
    # Only Grace answers: exactly the prompt of a Grace-only run, which `chat --as Grace` gives.
    only_grace = builder("Grace, Ada").build(conversation(["ann", "grace"])).record
    assert (
        only_grace["messages"][0]
        == builder("Grace").build(conversation(["ann", "grace"])).record["messages"][0]
    )
    # One persona keeps today's form: no name on its own turns.
    assert (
        builder("Grace").build(conversation(["ann", "grace"])).record["messages"][2]["content"]
        == "grace says 1"
    )


def test_two_personas_talking_give_a_record_opened_by_the_first() -> None:
    record = builder("Grace, Ada").build(conversation(["grace", "ada", "grace"])).record
    assert [m["content"] for m in record["messages"][1:]] == [
        "Grace: grace says 0",
        "Ada: ada says 1\nGrace: grace says 2",
    ]
    assert record["messages"][0]["content"].startswith("You are Grace or Ada,")
    # one persona: its opening turn has nobody to answer, as before
    assert builder("Grace").build(conversation(["grace", "ada"])).reason == "persona_never_answers"


def test_a_conversation_none_of_them_answers_is_skipped() -> None:
    built = builder("Grace, Ada").build(conversation(["ann", "bob", "cat"]))
    assert built.record is None and built.reason == "persona_never_answers"
    # matchers by user id (what prepare resolves from users.json)
    ids = [PersonaMatcher("G", frozenset({"UGRACE"})), PersonaMatcher("A", frozenset({"UADA"}))]
    b = RecordBuilder(DataConfig(persona="G, A"), workspace="acme", persona=ids)
    assert b.build(conversation(["ann", "ada"])).record["messages"][2]["content"] == "Ada: ada says 1"


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for split in ("train", "validation", "test")
            for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]  # fmt: skip


def test_prepare_with_two_personas(tmp_path: Path) -> None:
    personas = ("Grace Hopper", "Ada Lovelace")
    report = prepare(SAMPLE, tmp_path / "two", DataConfig(persona=", ".join(personas), workers=1))
    single = {p: prepare(SAMPLE, tmp_path / p, DataConfig(persona=p, workers=1)) for p in personas}
    records = _records(tmp_path / "two")
    assert records and report.data["dropped"]["persona_never_answers"] > 0
    prompts = {
        p: {r["meta"]["channel"]: r["messages"][0]["content"] for r in _records(tmp_path / p)}
        for p in personas
    }
    both_seen = False
    for r in records:
        answering = set()
        for i, m in enumerate(r["messages"][1:], 1):
            lines = m["content"].split("\n")
            if m["role"] == "assistant":  # every turn of theirs is named
                assert m["content"].startswith(personas)
                answering |= {p for p in personas if any(line.startswith(p + ":") for line in lines)}
            else:  # only the opening turn, the context the record answers, may be theirs
                assert not any(line.startswith(personas) for line in (lines[1:] if i == 1 else lines))
        system = r["messages"][0]["content"]
        if len(answering) == 1:
            (who,) = answering
            channel_prompt = prompts[who].get(r["meta"]["channel"])
            assert channel_prompt is None or system == channel_prompt
            assert system.startswith(f"You are {who},")
        else:
            both_seen = True
            assert system.startswith("You are Grace Hopper or Ada Lovelace,")
    assert both_seen
    # every record of either one-persona run is in the two-persona run's records' messages (by conversation)
    two_ids = {r["meta"]["conversation_id"] for r in records}
    for p in personas:
        assert {r["meta"]["conversation_id"] for r in _records(tmp_path / p)} <= two_ids
        assert single[p].totals["records"] <= report.totals["records"]


def test_chat_as_one_persona_prompts_as_training_did(tmp_path: Path, tiny_model_dir: Path) -> None:
    from slackdist.model.load import load_tokenizer
    from slackdist.train.checkpoint import model_info

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prepare(SAMPLE, tmp_path / "data", DataConfig(persona="Grace Hopper, Ada Lovelace", workers=1))
    cfg = Config()
    cfg.train.data_dir = str(tmp_path / "data")  # the persona comes from the prepared data's report
    info = model_info(cfg, tokenizer)
    assert (
        info.personas == ["Grace Hopper", "Ada Lovelace"] and info.persona == "Grace Hopper or Ada Lovelace"
    )
    one = RecordBuilder(DataConfig(persona="Ada Lovelace"), workspace="sample_export").system("general")[0]
    assert info.system_prompt_for("ada lovelace") == one  # spelled as training spelled it
    both = RecordBuilder(DataConfig(persona="Grace Hopper, Ada Lovelace"), workspace="sample_export")
    assert info.system_prompt_for() == both.system("general")[0]
    # a folder written before personas existed still reads
    old = {
        "workspace": "w",
        "system_prompt": "s",
        "persona_system_prompt": "You are {persona}.",
        "persona": "Ada",
    }
    assert ModelInfo(**old).system_prompt_for() == "You are Ada."


@pytest.mark.parametrize("spec", ["Grace Hopper", "Grace Hopper, Ada Lovelace"])
def test_report_counts_in_persona_mode(tmp_path: Path, spec: str) -> None:
    report = prepare(SAMPLE, tmp_path / "p", DataConfig(persona=spec, workers=1))
    assert report.quality["records_ending_on_assistant"] == report.quality["records"] > 0
    assert report.quality["records_invalid"] == 0
