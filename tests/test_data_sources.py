"""`--data` through Hugging Face `datasets` (slackdist/data/sources.py, examples.py, card.py).

Every kind of source gives the examples `make_example` gives for its records; a prepared folder is a
`datasets` dataset as it is; tokenization is cached by fingerprint; a tokenized split packs into the
same rows as the same examples held in a list (the batches training sees); bad data is one line.
"""

from __future__ import annotations

import copy
import json
import random
import re
import socket
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, load_dataset
from train_helpers import chat_record, tiny_config, write_dataset

from slackdist.cli import main as cli_main
from slackdist.data.examples import TokenizedSplit, load_examples, make_example, tokenizer_fingerprint
from slackdist.data.sources import check_data_source, open_data
from slackdist.errors import SlackdistError
from slackdist.train.batches import Epoch, hold_out, validation_rows
from slackdist.train.packing import pack

SOURCES = ("prepared", "jsonl", "json", "parquet", "save_to_disk", "save_to_disk_dict", "folder")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from slackdist.model.load import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [chat_record(i, rng) for i in range(n)]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_source(kind: str, folder: Path, records: list[dict]) -> Path:
    """`records` as the split "train" of one kind of `--data`."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "prepared":  # as `slackdist prepare` writes it: an empty split is an empty file
        _jsonl(folder / "train.jsonl", records)
        (folder / "validation.jsonl").write_text("")
        return folder
    if kind == "jsonl":
        return _jsonl(folder / "chats.jsonl", records)
    if kind == "json":
        (folder / "chats.json").write_text(json.dumps(records), encoding="utf-8")
        return folder / "chats.json"
    ds = Dataset.from_list(records)
    if kind == "parquet":
        ds.to_parquet(folder / "chats.parquet")
        return folder / "chats.parquet"
    if kind == "save_to_disk":
        ds.save_to_disk(folder / "saved")
        return folder / "saved"
    if kind == "save_to_disk_dict":
        DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(folder / "saved")
        return folder / "saved"
    assert kind == "folder"  # a folder of data files, as a downloaded hub dataset repository holds
    (folder / "repo").mkdir()
    ds.to_parquet(folder / "repo" / "train.parquet")
    ds.select(range(2)).to_parquet(folder / "repo" / "test.parquet")
    return folder / "repo"


@pytest.mark.parametrize("kind", SOURCES)
def test_every_source_gives_the_examples_of_its_records(tmp_path: Path, tokenizer, kind: str) -> None:
    records = _records(12)
    spec = write_source(kind, tmp_path, records)
    examples = load_examples(spec, tokenizer, train_on="assistant", max_seq_len=4096)
    expected = [make_example(tokenizer, r["messages"], train_on="assistant") for r in records]
    assert list(examples) == expected
    assert examples.lengths == [len(e) for e in expected]
    assert examples.num_records == 12 and examples.num_too_long == 0


def test_too_long_conversations_are_left_out_and_counted(tmp_path: Path, tokenizer) -> None:
    records = _records(10)
    lengths = [len(make_example(tokenizer, r["messages"], train_on="all")) for r in records]
    limit = sorted(lengths)[5]
    examples = load_examples(
        _jsonl(tmp_path / "c.jsonl", records), tokenizer, train_on="all", max_seq_len=limit
    )
    assert examples.lengths == [n for n in lengths if n <= limit]
    assert examples.num_too_long == sum(n > limit for n in lengths) > 0
    assert examples.describe_dropped().startswith(f"{tmp_path / 'c.jsonl'}: {examples.num_too_long} of 10 ")


def test_a_prepared_folder_is_a_datasets_dataset(tmp_path: Path, sample_export_dir: Path) -> None:
    out = tmp_path / "prepared"
    assert cli_main(["prepare", str(sample_export_dir), "--out", str(out)]) == 0
    lines = {
        split: len((out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines())
        for split in ("train", "validation", "test")
    }
    loaded = load_dataset(str(out))  # the README.md card says which files are which split
    assert {split: len(ds) for split, ds in loaded.items()} == {s: n for s, n in lines.items() if n}
    assert "messages" in loaded["train"].column_names
    assert (out / "provenance.jsonl").is_file()  # beside the splits, and not read as one


def test_tokenization_is_cached_by_fingerprint(tmp_path: Path, tokenizer, datasets_cache: Path) -> None:
    path = _jsonl(tmp_path / "c.jsonl", _records(8))

    def cache_file(train_on: str = "assistant") -> Path:
        examples = load_examples(path, tokenizer, train_on=train_on, max_seq_len=4096)
        (file,) = examples.tokenized.cache_files
        return Path(file["filename"])

    first = cache_file()
    assert first.parent == datasets_cache / "slackdist-tokenized"
    written = first.stat().st_mtime_ns
    assert cache_file() == first and first.stat().st_mtime_ns == written  # read back, not tokenized again
    assert cache_file("all") != first  # other labels
    _jsonl(path, _records(8, seed=1))  # the file changed
    assert cache_file() != first
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_tokenized_split_packs_into_the_rows_of_its_list(tmp_path: Path, tokenizer, seed: int) -> None:
    """What training feeds is unchanged: the same rows, in the same order, as packing a list of examples."""
    records = _records(40, seed=seed)
    examples = load_examples(
        _jsonl(tmp_path / "c.jsonl", records), tokenizer, train_on="assistant", max_seq_len=256
    )
    as_list = list(examples)
    cfg = tiny_config(tmp_path, tmp_path, tmp_path / "out", **{"train.seed": seed})
    for index in range(2):
        assert list(Epoch(examples, index=index, t=cfg.train)) == list(
            Epoch(as_list, index=index, t=cfg.train)
        )
        assert list(Epoch(examples, index=index, t=cfg.train)) == pack(
            as_list, 256, seed=seed, epoch=index, packing=cfg.train.packing
        )
    assert validation_rows(examples, cfg.train) == validation_rows(as_list, cfg.train)


def test_a_source_without_validation_holds_out_a_seeded_share(tmp_path: Path, tokenizer) -> None:
    examples = load_examples(
        _jsonl(tmp_path / "c.jsonl", _records(20)), tokenizer, train_on="assistant", max_seq_len=4096
    )
    cfg = tiny_config(tmp_path, tmp_path, tmp_path / "out", **{"train.validation_fraction": 0.1})
    train, val, note = hold_out(examples, cfg.train)
    assert isinstance(val, TokenizedSplit) and len(val) == 2 and len(train) == 18
    assert sorted(map(tuple, (e.input_ids for e in [*train, *val]))) == sorted(
        map(tuple, (e.input_ids for e in examples))
    )
    assert "held out 2 of its 20 conversations" in note
    again = hold_out(examples, cfg.train)
    assert list(again[1]) == list(val)  # the same seed holds out the same conversations
    none = tiny_config(tmp_path, tmp_path, tmp_path / "out", **{"train.validation_fraction": 0.0})
    assert hold_out(examples, none.train) == (examples, [], "")


def test_train_on_a_parquet_file(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    data = write_source("parquet", tmp_path, _records(24))
    out = tmp_path / "out"
    args = ["train", "--data", str(data), "--output", str(out), "--model", str(tiny_model_dir)]
    assert (
        cli_main([*args, "--no-load-in-4bit", "--max-seq-len", "256", "--max-steps", "1", "--lora-r", "4"])
        == 0
    )
    assert (out / "adapter_model.safetensors").is_file()
    err = capsys.readouterr().err
    assert f"slackdist: {data}: no 'validation' split; held out 1 of its 24 conversations" in err


# ---------------------------------------------------------------- bad data: one line


@pytest.mark.parametrize(
    ("kind", "content", "message"),
    [
        ("x.txt", "hello", "x.txt: expected a .jsonl, .json or .parquet file, or a folder"),
        ("x.jsonl", '{"messages": []}\n{not json\n', "x.jsonl:2: not valid JSON"),
        ("x.jsonl", '{"text": "a"}\n', "x.jsonl: no 'messages' column (columns: text)"),
        (
            "x.parquet",
            [{"messages": [{"role": "bot", "content": "x"}]}],
            "x.parquet, row 0: message 0 must be",
        ),
        ("x.json", "[1, 2", "x.json: cannot read"),
    ],
)
def test_bad_data_is_one_line_naming_the_file(
    tmp_path: Path, tokenizer, kind: str, content, message: str
) -> None:
    path = tmp_path / kind
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        Dataset.from_list(content).to_parquet(path)
    with pytest.raises(SlackdistError, match=re.escape(message)) as e:
        load_examples(path, tokenizer, train_on="assistant", max_seq_len=100)
    assert "\n" not in str(e.value)


def test_sources_that_are_not_chat_records(tmp_path: Path, sample_export_dir: Path, tokenizer) -> None:
    with pytest.raises(SlackdistError, match="a Slack export, not chat records; run `slackdist prepare"):
        check_data_source(str(sample_export_dir))
    with pytest.raises(SlackdistError, match=r"\./missing: no such file or folder"):
        check_data_source("./missing")
    data = write_dataset(tmp_path / "data", n_train=4, n_val=1)
    with pytest.raises(SlackdistError, match=r"no 'test' split \(its splits: train, validation\)"):
        load_examples(data, tokenizer, train_on="assistant", max_seq_len=100, split="test")
    assert open_data(str(data)).kind == "prepared folder"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_hub_dataset_that_cannot_load_is_one_line(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(SlackdistError) as e:
        check_data_source("someone/chats-unreachable")
    line = str(e.value)
    assert line.startswith(
        "someone/chats-unreachable: no such file or folder here, and as a hub id not in the local"
    )
    assert "cannot be reached" in line and "--data PATH" in line and "HF_HUB_OFFLINE=1" in line
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SlackdistError, match="HF_HUB_OFFLINE=1 forbids downloading it; pass --data PATH"):
        check_data_source("someone/chats-offline")
