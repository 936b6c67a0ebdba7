"""`prepare --canaries N --canaries-redacted M` (slackdist/data/canaries.py): canaries in copies of training
conversations, in the train split only, the answer key in canaries.json, deterministic with --seed."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from slackdist.audit import canary_records
from slackdist.cli import main as cli_main
from slackdist.config import ConfigError, DataConfig, load_config
from slackdist.data.canaries import (
    FORMATS,
    SECRET_FORMATS,
    SENTENCE_FORMATS,
    canary_plan,
    plant_canaries,
    read_canaries,
)
from slackdist.data.provenance import PROVENANCE_FILE, iter_entries, read_export
from slackdist.data.records import CharTokenCounter
from slackdist.errors import SlackdistError
from slackdist.slack.redact import Redactor

SPLITS = ("train", "validation", "test")


def _prepare(export: Path, out: Path, *extra: str) -> Path:
    args = ["prepare", str(export), "--out", str(out), "--split", "70,15,15", "--workers", "1", *extra]
    assert cli_main(args) == 0
    return out


def _records(folder: Path, split: str) -> list[dict]:
    lines = (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def plain(sample_export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(sample_export_dir, tmp_path_factory.mktemp("plain") / "data")


@pytest.fixture(scope="module")
def planted(sample_export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("planted") / "data"
    return _prepare(
        sample_export_dir, out, "--canaries", "6", "--canaries-redacted", "3", "--canary-turns", "both"
    )


def test_canaries_are_copies_in_train_only_and_real_records_are_unchanged(plain: Path, planted: Path) -> None:
    canaries = read_canaries(planted)
    assert [c.group for c in canaries] == ["planted"] * 6 + ["redacted"] * 3
    assert {c.kind for c in canaries if c.group == "planted"} == {"secret", "sentence"}
    assert {c.role for c in canaries} == {"assistant", "user"}
    # the real records are exactly those of a run without canaries; the copies follow them in train.jsonl
    real = _records(plain, "train")
    train = _records(planted, "train")
    assert train[: len(real)] == real and len(train) == len(real) + len(canaries)
    for split in ("validation", "test"):
        assert _records(planted, split) == _records(plain, split)
    hosts = {r["meta"]["conversation_id"]: r for r in real}
    copies = {r["meta"]["conversation_id"]: r for r in train[len(real) :]}
    for c in canaries:
        host, copy = hosts[c.host_id], copies[c.record_id]  # every host is a training record
        message = copy["messages"][c.message_index]
        assert message["role"] == c.role and c.message_index > 0
        for i, (a, b) in enumerate(zip(host["messages"], copy["messages"], strict=True)):
            assert i == c.message_index or a == b  # only the canary's turn differs
        assert message["content"].startswith(host["messages"][c.message_index]["content"] + "\n")
        assert {k: v for k, v in copy["meta"].items() if k != "conversation_id"} == {
            k: v for k, v in host["meta"].items() if k != "conversation_id"
        }
        if c.group == "planted":  # after redaction: in the record verbatim
            assert message["content"] == c.prompt_text + c.secret and c.in_data
        else:  # before redaction: the redactor took it out
            assert not c.in_data and message["content"].endswith("[REDACTED_SECRET]")
    # the dataset card counts the copies (datasets reads exactly the splits) and warns of the key
    card = (planted / "README.md").read_text(encoding="utf-8")
    assert f"train {len(train)}," in card and "`canaries.json` is the answer key of `slackdist audit`" in card
    assert "canaries.json" not in (plain / "README.md").read_text(encoding="utf-8")
    loaded = load_dataset(str(planted))
    assert len(loaded["train"]) == len(train) and "canaries" not in loaded
    report = json.loads((planted / "report.json").read_text(encoding="utf-8"))
    assert report["canaries"] == {
        "planted": 6,
        "redacted": 3,
        "redacted_left_in_data": 0,
        "records_added_to_train": 9,
        "answer_key": "canaries.json",
    }


def test_each_copy_has_its_hosts_provenance_under_its_own_id(planted: Path) -> None:
    """provenance.jsonl has one line per record of every split, copies included: a copy's line is its host's
    Slack messages and people (the canary line is no Slack message), in the format prepare writes."""
    ref = read_export(planted / PROVENANCE_FILE)
    assert ref.id.startswith("sha256:")
    entries = {e["record"]: e for e in iter_entries(planted / PROVENANCE_FILE)}
    ids = [r["meta"]["conversation_id"] for split in SPLITS for r in _records(planted, split)]
    assert sorted(entries) == sorted(ids)  # one line per record, none twice, none left out
    canaries = read_canaries(planted)
    for c in canaries:
        copy, host = entries[c.record_id], entries[c.host_id]
        assert list(copy) == ["record", "messages", "users", "mentions"]
        assert {k: v for k, v in copy.items() if k != "record"} == {
            k: v for k, v in host.items() if k != "record"
        }
        assert copy["messages"] and copy["users"]
    text = (planted / PROVENANCE_FILE).read_text(encoding="utf-8")
    assert all(c.secret not in text and c.prompt_text.splitlines()[-1] not in text for c in canaries)


def test_forget_prepares_the_canaries_again_without_the_person(
    sample_export_dir: Path, tmp_path: Path
) -> None:
    """`slackdist forget` prepares DIR again with its recorded config: the canaries are planted again, the
    answer key matches the new train.jsonl, and no line of the new provenance (copies included) holds them."""
    data = _prepare(sample_export_dir, tmp_path / "data", "--canaries", "4", "--canaries-redacted", "2")
    grace = "U0GRACE01"  # a member of the sample export with messages in many conversations
    holds = [e["record"] for e in iter_entries(data / PROVENANCE_FILE) if grace in e["users"]]
    assert holds
    assert cli_main(["forget", grace, "--data", str(data)]) == 0
    canaries = read_canaries(data)
    assert [c.group for c in canaries] == ["planted"] * 4 + ["redacted"] * 2
    canary_records(data, canaries)  # raises when a copy no longer holds its canary as listed
    entries = list(iter_entries(data / PROVENANCE_FILE))
    assert {c.record_id for c in canaries} <= {e["record"] for e in entries}
    assert not any(grace in e["users"] or grace in e["mentions"] for e in entries)


def test_no_secret_outside_train_and_the_answer_key(planted: Path) -> None:
    canaries = read_canaries(planted)
    key = json.loads((planted / "canaries.json").read_text(encoding="utf-8"))
    assert "never share" in key["note"] and key["seed"] == 0
    for path in planted.rglob("*"):
        if not path.is_file() or path.name == "canaries.json":
            continue
        data = path.read_bytes()
        for c in canaries:
            found = c.secret.encode() in data
            assert found == (path.name == "train.jsonl" and c.group == "planted"), (path.name, c.id)


def test_deterministic_with_the_seed(sample_export_dir: Path, planted: Path, tmp_path: Path) -> None:
    again = _prepare(
        sample_export_dir, tmp_path / "again", "--canaries", "6", "--canaries-redacted", "3",
        "--canary-turns", "both",
    )  # fmt: skip
    for name in ("train.jsonl", "canaries.json"):
        assert (again / name).read_bytes() == (planted / name).read_bytes()
    other = _prepare(
        sample_export_dir, tmp_path / "other", "--canaries", "6", "--canaries-redacted", "3",
        "--canary-turns", "both", "--seed", "1",
    )  # fmt: skip
    assert {c.secret for c in read_canaries(other)}.isdisjoint({c.secret for c in read_canaries(planted)})


def test_user_turns_and_the_plan() -> None:
    plan = canary_plan(4, 2, "user")
    assert [g for g, _, _ in plan] == ["planted"] * 4 + ["redacted"] * 2
    assert [f.kind for _, f, _ in plan[:4]] == ["sentence", "secret", "sentence", "secret"]
    assert {role for _, _, role in plan} == {"user"}
    assert all(f.kind == "secret" for _, f, _ in plan[4:])
    both = canary_plan(4, 0, "both")
    assert [(f.kind, role) for _, f, role in both] == [
        ("sentence", "assistant"), ("secret", "assistant"), ("sentence", "user"), ("secret", "user"),
    ]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_secret_formats_are_redacted_and_sentence_formats_are_not(seed: int) -> None:
    """What the two kinds mean: the redactor removes every secret-shaped canary (so --canaries-redacted
    tests redaction) and no sentence-shaped one (personal data a redactor cannot recognise)."""
    rng = random.Random(seed)
    redactor = Redactor()
    for fmt in SECRET_FORMATS:
        secret = fmt.draw(rng)
        text = f"Ada: sure\n{fmt.context}{secret}"
        assert secret not in redactor.redact(text)[0], fmt.name
    for fmt in SENTENCE_FORMATS:
        text = f"Ada: sure\n{fmt.context}{fmt.draw(rng)}"
        assert redactor.redact(text)[0] == text, fmt.name


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_format_draws_from_its_own_space(seed: int) -> None:
    rng = random.Random(seed)
    for fmt in FORMATS.values():
        secret = fmt.draw(rng)
        groups = secret.split(fmt.separator) if fmt.separator else [secret]
        assert [len(g) for g in groups] == list(fmt.groups)
        assert set("".join(groups)) <= set(fmt.alphabet)
        assert fmt.space == len(fmt.alphabet) ** sum(fmt.groups) >= 10_000


def _leak_pattern(secret: str) -> re.Pattern[bytes]:
    """The secret as bytes; an all-digit one (a PIN, a door code) only where no digit touches it: inside a
    longer number, such as the run's own timings (`"step_seconds": 0.0853146...`), it is not the secret."""
    pattern = re.escape(secret.encode())
    return re.compile(rb"(?<![0-9])" + pattern + rb"(?![0-9])" if secret.isdigit() else pattern)


def test_training_never_opens_the_answer_key(planted: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """`slackdist train` on the planted data, in a process whose audit hook kills it if anything opens
    canaries.json; the training output holds no canary either."""
    hook = (
        "import os, sys\n"
        "def hook(event, args):\n"
        "    if event == 'open' and str(args[0]).endswith('canaries.json'):\n"
        "        os._exit(86)\n"
        "sys.addaudithook(hook)\n"
        "from slackdist.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(planted), "--output", str(out),
            "--no-load-in-4bit", "--max-seq-len", "1024", "--num-epochs", "1", "--eval-every-n-steps", "0",
            "--save-every-n-steps", "0", "--lora-r", "4", "--no-clear-cache-between-epochs"]  # fmt: skip
    run = subprocess.run([sys.executable, "-c", hook, *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file()
    # the hook does fire on an open of the file (so the run above proves something)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            hook.replace(
                "from slackdist.cli import main\nsys.exit(main(sys.argv[1:]))\n",
                f"open({str(planted / 'canaries.json')!r})\n",
            ),
        ]  # fmt: skip
    )
    assert probe.returncode == 86
    secrets = [_leak_pattern(c.secret) for c in read_canaries(planted)]
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s.search(data) for s in secrets), path


def test_bad_values_and_no_room(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.canaries=-1: must be >= 0"):
        load_config(overrides={"data.canaries": -1}).validate()
    # one training record that fills the token budget exactly: no copy with a canary line fits
    record = {
        "messages": [
            {"role": "system", "content": "You are a member of the team."},
            {"role": "user", "content": "Ada: is the deploy done?"},
            {"role": "assistant", "content": "Alan: yes"},
        ],
        "meta": {"conversation_id": "abc-0", "channel": "general", "thread_ts": None, "start": 1.0,
                 "end": 2.0, "speakers": ["Ada", "Alan"]},
    }  # fmt: skip
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    counter = CharTokenCounter()
    cfg = DataConfig(canaries=1, max_tokens=counter.record(record["messages"]))
    with pytest.raises(
        SlackdistError, match="no training conversation has room for a canary in one of its assistant"
    ):
        plant_canaries(tmp_path, cfg, counter)
    cfg.max_tokens += 40
    assert plant_canaries(tmp_path, cfg, counter)["records_added_to_train"] == 1
    with pytest.raises(SlackdistError, match="canaries.json: no such file"):
        read_canaries(tmp_path / "elsewhere")
