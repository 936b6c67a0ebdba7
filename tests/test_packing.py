"""Examples, packing and collation (slackdist/data/examples.py, slackdist/train/packing.py).

The key property: packing changes nothing a conversation sees. Its logits inside a
packed row equal its logits alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slackdist.data.examples import Example, load_examples, make_example
from slackdist.errors import SlackdistError
from slackdist.model.attention import cu_seqlens_from_position_ids
from slackdist.train.packing import collate, pack

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are on the acme team. This is #deploys."},
        {"role": "user", "content": "Jane: is the deploy done?"},
        {"role": "assistant", "content": "Bob: yes, 5 minutes ago 👍"},
    ],
    [
        {"role": "system", "content": "You are on the acme team. This is #random."},
        {"role": "user", "content": "Ann: lunch?"},
        {"role": "assistant", "content": "Bob: ramen!"},
        {"role": "user", "content": "Ann: the new place around the corner?"},
        {"role": "assistant", "content": "Bob: sure, at noon"},
    ],
    [
        {"role": "system", "content": "You are on the acme team. This is #dev."},
        {"role": "user", "content": "Eve: the build fails:\n```\nImportError: no module named foo\n```"},
        {"role": "assistant", "content": "Bob: pin the version, I opened an issue upstream."},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from slackdist.model.load import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=request.param
    )
    m.config.use_cache = False
    return m.eval()


def _examples(tokenizer, train_on="assistant"):
    return [make_example(tokenizer, c, train_on=train_on) for c in CONVERSATIONS]


def _alone(model, ex: Example) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]


def test_logits_in_a_packed_row_equal_logits_alone(model, tokenizer):
    examples = _examples(tokenizer)
    rows = pack(examples, max_seq_len=sum(len(e) for e in examples), seed=0, epoch=0)
    assert len(rows) == 1 and len(rows[0].seq_lens) == 3
    batch = collate(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits[0]
    by_ids = {tuple(e.input_ids): e for e in examples}
    start = 0
    for n in rows[0].seq_lens:
        ex = by_ids[tuple(rows[0].input_ids[start : start + n])]
        torch.testing.assert_close(packed[start : start + n], _alone(model, ex), rtol=1e-5, atol=1e-5)
        start += n

    # the test can fail: with positions that do not restart, later conversations see earlier ones
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    n0 = rows[0].seq_lens[0]
    assert (leaky[n0:] - packed[n0:]).abs().max() > 1e-3


def test_padded_batch_of_rows_matches_too(model, tokenizer):
    examples = _examples(tokenizer)
    longest = max(len(e) for e in examples)
    rows = pack(examples, max_seq_len=longest + 5, seed=1, epoch=0)
    assert len(rows) >= 2
    batch = collate(rows, tokenizer.pad_token_id, pad_to_multiple_of=8)
    assert batch["input_ids"].shape[1] % 8 == 0
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    by_ids = {tuple(e.input_ids): e for e in examples}
    for b, row in enumerate(rows):
        start = 0
        for n in row.seq_lens:
            ex = by_ids[tuple(row.input_ids[start : start + n])]
            torch.testing.assert_close(logits[b, start : start + n], _alone(model, ex), rtol=1e-5, atol=1e-5)
            start += n


def test_row_layout_positions_and_labels(tokenizer):
    examples = _examples(tokenizer, train_on="all")
    (row,) = pack(examples, max_seq_len=10_000, seed=0, epoch=0)
    assert sum(row.seq_lens) == len(row.input_ids) == len(row.labels) == len(row.position_ids)
    start = 0
    for n in row.seq_lens:
        assert row.position_ids[start : start + n] == list(range(n))  # restart at 0
        assert row.labels[start] == -100  # the shift never crosses a boundary
        assert row.labels[start + 1 : start + n] == row.input_ids[start + 1 : start + n]  # train_on=all
        start += n


def test_assistant_only_labels(tokenizer):
    ex = make_example(tokenizer, CONVERSATIONS[1], train_on="assistant")
    labelled = [t for t in ex.labels if t != -100]
    assert tokenizer.decode(labelled) == "Bob: ramen!<|eot_id|>Bob: sure, at noon<|eot_id|>"


def test_collate_padding_is_its_own_sequence(tokenizer):
    examples = _examples(tokenizer)
    rows = pack(examples, max_seq_len=max(len(e) for e in examples), seed=0, epoch=0, packing=False)
    assert [len(r.seq_lens) for r in rows] == [1, 1, 1]
    pad = tokenizer.pad_token_id
    batch = collate(rows, pad, varlen_kwargs=True)
    width = batch["input_ids"].shape[1]
    for b, row in enumerate(rows):
        n = len(row)
        assert (batch["input_ids"][b, n:] == pad).all() and (batch["labels"][b, n:] == -100).all()
        assert batch["position_ids"][b, n:].tolist() == list(range(width - n))
    # num_label_tokens counts labels after the one-token shift
    want = sum(sum(1 for t in r.labels[1:] if t != -100) for r in rows)
    assert batch["num_label_tokens"] == want == int((batch["labels"][:, 1:] != -100).sum())
    # label_positions: flat b * T + t of every position whose next label counts, counted on the CPU
    expected = [b * width + t for b, t in (batch["labels"][:, 1:] != -100).nonzero().tolist()]
    assert batch["label_positions"].tolist() == expected
    # the CPU-built varlen boundaries agree with the ones attention derives from position_ids
    cu, max_len = cu_seqlens_from_position_ids(batch["position_ids"])
    assert torch.equal(batch["cu_seq_lens_q"], cu) and batch["max_length_q"] == max_len


def test_pack_is_deterministic_per_seed_and_epoch(tokenizer):
    examples = [Example([i] * n, [i] * n) for i, n in enumerate([5, 3, 9, 2, 7, 4, 4, 6, 1, 8] * 3)]
    a = pack(examples, 16, seed=3, epoch=0)
    assert a == pack(examples, 16, seed=3, epoch=0)
    assert a != pack(examples, 16, seed=3, epoch=1)
    assert a != pack(examples, 16, seed=4, epoch=0)
    unpacked = [pack(examples, 16, seed=3, epoch=e, packing=False) for e in (0, 1)]
    assert unpacked[0] != unpacked[1]


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=60),
    max_seq_len=st.integers(40, 128),
    seed=st.integers(0, 5),
)
def test_pack_keeps_every_example_once_and_fills_rows(lengths, max_seq_len, seed):
    examples = [Example([i] * n, [i] * n) for i, n in enumerate(lengths)]
    rows = pack(examples, max_seq_len, seed=seed, epoch=0)
    assert all(len(r) <= max_seq_len for r in rows)
    seen = sorted(r.input_ids[sum(r.seq_lens[:k])] for r in rows for k in range(len(r.seq_lens)))
    assert seen == list(range(len(lengths)))
    # best-fit decreasing never leaves two rows that could have been one
    fills = sorted(len(r) for r in rows)
    assert len(fills) < 2 or fills[0] + fills[1] > max_seq_len


def test_pack_rejects_too_long_examples():
    with pytest.raises(ValueError, match="longer than max_seq_len=4"):
        pack([Example([1] * 5, [1] * 5)], 4, seed=0, epoch=0)


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8"
    )
    return path


def test_load_examples_drops_too_long_and_counts(tmp_path, tokenizer):
    long = [*CONVERSATIONS[0][:2], {"role": "assistant", "content": "word " * 400}]
    path = _write_jsonl(
        tmp_path / "train.jsonl", [{"messages": c, "meta": {}} for c in [*CONVERSATIONS, long]]
    )
    examples = load_examples(path, tokenizer, train_on="assistant", max_seq_len=200)
    assert len(examples) == 3 and examples.num_records == 4 and examples.num_too_long == 1
    assert examples[0] == make_example(tokenizer, CONVERSATIONS[0], train_on="assistant")
    everything = load_examples(path, tokenizer, train_on="all", max_seq_len=200)
    assert sum(t != -100 for t in everything[0].labels) > sum(t != -100 for t in examples[0].labels)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"train.jsonl:2: not valid JSON"),
        ('{"meta": {}}', r'train.jsonl:2: expected an object with a "messages" list'),
        ('{"messages": [{"role": "bot", "content": "x"}]}', r"train.jsonl:2: message 0 must be"),
    ],
)
def test_load_examples_bad_lines_name_file_and_line(tmp_path, tokenizer, line, message):
    path = _write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATIONS[0]}, line])
    with pytest.raises(SlackdistError, match=message):
        load_examples(path, tokenizer, train_on="assistant", max_seq_len=100)


def test_load_examples_missing_file(tmp_path, tokenizer):
    with pytest.raises(SlackdistError, match="nope.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl", tokenizer, train_on="assistant", max_seq_len=100)
