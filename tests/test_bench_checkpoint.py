"""bench/checkpoint_check.py end to end on the CPU: the tiny model through `accelerate launch` with cpu.yaml
(the GPU configs are reported as skipped here, and the run goes on past them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_checkpoint_check_runs_resumes_compares_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "results" / "checkpoint_check.json"
    command = [
        sys.executable,
        str(REPO / "bench" / "checkpoint_check.py"),
        "--configs",
        "fsdp1,cpu",
        "--tiny",
    ]
    command += [
        "--steps",
        "4",
        "--save-at",
        "2",
        "--max-seq-len",
        "256",
        "--out",
        str(out),
        "--work",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    runs = {r["config"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs["fsdp1"] == {"config": "fsdp1", "skipped": "needs a CUDA GPU"}
    cpu = runs["cpu"]
    assert cpu["passed"] and cpu["layout"] == "adapter" and cpu["resumed_steps"] == 2
    assert cpu["max_loss_rel_diff"] == 0 and cpu["update_rel_diff"] == 0  # the CPU is deterministic
    assert {"optimizer.bin", "random_states_0.pkl", "manifest.json"} <= cpu["entries_mib"].keys()
    assert 2 <= cpu["state_per_adapter"] <= 6 and cpu["non_lora_keys"] == []
    assert "launch_configs/cpu.yaml --num_processes 1" in cpu["command"]
    table = proc.stdout[proc.stdout.index("config ") :].splitlines()
    assert table[1].split()[:4] == ["fsdp1", "skipped", "needs", "a"]
    assert table[2].split()[:4] == ["cpu", "ok", "adapter", "2"]
