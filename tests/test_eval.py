"""`slackdist eval` (slackdist/eval.py): held-out loss base vs tuned, sample replies, eval.json / eval.md."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from inference_helpers import write_tiny_adapter
from train_helpers import chat_record, tiny_config, write_dataset

from slackdist.cli import main as cli_main
from slackdist.data.examples import make_example
from slackdist.generate import GenerationSettings
from slackdist.model.load import load_for_inference


def _write_test_split(data_dir: Path, n: int = 6, seed: int = 1) -> Path:
    rng = random.Random(seed)
    lines = [json.dumps(chat_record(20_000 + i, rng)) for i in range(n)]
    (data_dir / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_test_split(write_dataset(tmp_path_factory.mktemp("evaldata") / "data", n_train=16, n_val=4))


def _read(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text(encoding="utf-8"))


def test_training_lowers_heldout_loss(tiny_model_dir, data_dir, tmp_path, capsys):
    from slackdist.train.recipe import train

    out = tmp_path / "run"
    train(tiny_config(tiny_model_dir, data_dir, out, **{"train.learning_rate": 2e-2}))
    code = cli_main(
        ["eval", "--model-dir", str(out), "--num-samples", "2", "--temperature", "0", "--max-new-tokens", "8"]
    )
    assert code == 0
    result = _read(out / "eval")  # --out defaulted to MODEL_DIR/eval, --data to the training data folder
    assert result["data"] == str(data_dir / "test.jsonl")
    assert result["conversations"] == 6 and result["label_tokens"] > 0
    assert result["tuned"]["loss"] < result["base"]["loss"] - 0.5, result
    assert result["tuned"]["perplexity"] == pytest.approx(math.exp(result["tuned"]["loss"]))
    assert len(result["samples"]) == 2
    for s in result["samples"]:
        assert s["reference"] and s["prompt"][0]["role"] == "system" and s["prompt"][-1]["role"] == "user"
        assert isinstance(s["base"], str) and isinstance(s["tuned"], str)
    md = (out / "eval" / "eval.md").read_text(encoding="utf-8")
    assert "| tuned |" in md and "## Sample 2" in md and "**Reference:**" in md
    assert "tuned: loss" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["eval.json", "eval.md"]
    assert not [p for p in out.iterdir() if p.name.startswith(".eval")]  # no temp folder left behind


def test_loss_matches_a_plain_forward_and_base_is_the_base_model(tiny_model_dir, data_dir, tmp_path):
    from slackdist.eval import evaluate

    adapter = write_tiny_adapter(tiny_model_dir, tmp_path / "adapter")
    im = load_for_inference(str(adapter), device="cpu")
    result = evaluate(
        im, data_dir, GenerationSettings(temperature=0, max_new_tokens=4), num_samples=1, max_batches=4
    )
    assert result["conversations"] == 4

    # The same numbers from the plain base model (no PEFT) and full logits.
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    records = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()[:4]]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for r in records:
            ex = make_example(im.tokenizer, r["messages"], train_on="assistant")
            logits = plain(torch.tensor([ex.input_ids])).logits[0, :-1]
            labels = torch.tensor(ex.labels[1:])
            total += float(
                torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            )
            tokens += int((labels != -100).sum())
    assert result["label_tokens"] == tokens
    assert result["base"]["loss"] == pytest.approx(total / tokens, rel=1e-4)
    assert abs(result["tuned"]["loss"] - result["base"]["loss"]) > 1e-3  # the adapter is on for "tuned"


def test_merged_model_has_no_base_column(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "eval"
    code = cli_main(
        [
            "eval",
            "--model-dir",
            str(tiny_model_dir),
            "--data",
            str(data_dir),
            "--out",
            str(out),
            "--num-samples",
            "1",
            "--max-batches",
            "2",
            "--max-new-tokens",
            "4",
        ]
    )
    assert code == 0
    result = _read(out)
    assert result["kind"] == "merged" and result["base"] is None and result["samples"][0]["base"] is None
    assert "| n/a |" in (out / "eval.md").read_text()


def test_bad_data_is_a_one_line_error(tiny_model_dir, data_dir, tmp_path, capsys):
    empty = tmp_path / "nodata"
    empty.mkdir()
    out = tmp_path / "eval"
    code = cli_main(["eval", "--model-dir", str(tiny_model_dir), "--data", str(empty), "--out", str(out)])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and f"{empty}: no train.jsonl" in errors[0]
    # a model without a training config needs --data
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    assert cli_main(["eval", "--model-dir", str(copy), "--out", str(out)]) == 2
    assert "--data" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "nodata"]  # no eval folder, no temp folder
