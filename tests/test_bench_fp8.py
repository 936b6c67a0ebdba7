"""bench/fp8_matmul.py runs on the CPU at shrunken shapes (a smoke test: no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fp8_matmul_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "fp8.json"
    cmd = [sys.executable, "bench/fp8_matmul.py", "--device", "cpu", "--tokens", "40", "--scale", "0.02",
           "--iters", "1", "--json", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["projection"] for r in rows] == ["q/o", "k/v", "gate/up", "down"]
    for r in rows:
        assert r["out"] % 16 == 0 and r["in"] % 16 == 0 and r["tokens"] == 40
        assert all(ms > 0 for ms in r["ms"].values())
        assert 0 < r["forward_rel_error"] < 0.06 and 0 < r["input_grad_rel_error"] < 0.06
    assert "gate/up" in done.stdout
