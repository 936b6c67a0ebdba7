"""bench/profile_train.py runs end to end on the CPU with the tiny model (a smoke test: no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import write_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_profile_train_smoke(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", n_train=40, n_val=4)
    out = tmp_path / "profile.json"
    cmd = [sys.executable, "bench/profile_train.py", "--model-dir", str(tiny_model_dir), "--data-dir", str(data),
           "--out", str(tmp_path / "run"), "--warm", "1", "--steps", "2", "--json", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "category" in done.stdout and "memory plan:" in done.stdout
    result = json.loads(out.read_text())
    assert result["tokens_per_s"] > 0 and result["step_ms"] > 0
    assert result["categories_ms_per_step"]["attention"] > 0
    assert result["categories_ms_per_step"]["matmul"] > 0
