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


def test_idle_gaps_merge_streams_and_name_the_kernel_after_each_gap() -> None:
    import torch
    from torch.autograd.profiler_util import FunctionEvent

    sys.path.insert(0, str(REPO / "bench"))
    from profile_train import idle_gaps, print_gaps

    def kernel(name: str, start: int, end: int) -> FunctionEvent:
        return FunctionEvent(0, name, 0, start, end, device_type=torch.autograd.DeviceType.CUDA)

    cpu_op = FunctionEvent(0, "aten::mm", 0, 0, 10_000)  # host ops are not GPU time
    events = [
        kernel("gemm", 0, 100),
        kernel("copy_on_side_stream", 50, 300),  # overlaps: busy until 300
        kernel("triton_fused", 1_300, 1_400),  # 1 ms idle before it
        kernel("gemm", 1_410, 1_500),  # 10 us idle before it
        cpu_op,
    ]
    gaps = idle_gaps(events, on_gpu=True)
    assert gaps == [(1_000.0, "copy_on_side_stream", "triton_fused"), (10.0, "triton_fused", "gemm")]
    summary = print_gaps(gaps, steps=1)
    assert summary["idle_ms_per_step"] == pytest.approx(1.01)
    assert summary["idle_ms_per_step_by_size"][">= 1 ms"] == pytest.approx(1.0)
    assert summary["idle_ms_per_step_by_next_kernel"] == {"triton_fused": pytest.approx(1.0)}
