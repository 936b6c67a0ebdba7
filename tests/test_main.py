"""`python main.py --train`: prepare data/ and train into llama3_slack_finetuned/ (the original entry point)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_main_train_prepares_and_trains_into_the_default_folder(tmp_path, tiny_model_dir, sample_export_dir):
    shutil.copytree(sample_export_dir, tmp_path / "data")  # the original layout: the export in data/
    config = {
        "model": {"base_model": str(tiny_model_dir)},
        "data": {"split": "70,15,15"},
        "train": {"max_steps": 3, "max_seq_len": 1024, "save_every_n_steps": 0, "eval_every_n_steps": 0},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--train", "--config", "c.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "data" / "prepared" / "train.jsonl").is_file()
    out = tmp_path / "llama3_slack_finetuned"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3


def test_main_needs_a_mode():
    proc = subprocess.run([sys.executable, str(REPO / "main.py")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--train" in proc.stderr
