"""bench/chat_bench.py runs end to end on the CPU at tiny size (a smoke test: no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_chat_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "bench/chat_bench.py",
        "--build-tiny",
        str(tmp_path / "tiny"),
        "--prompt-tokens",
        "24",
    ]
    cmd += ["--new-tokens", "6", "--repeats", "1", "--fast", "on", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| slackdist `stream_reply` (merged, load " in done.stdout and "decode speedup" in done.stdout
    result = json.loads(out.read_text())
    for path in ("plain_generate", "slackdist"):
        assert result[path]["new_tokens"] == 6  # min_new_tokens forced the full length
        assert result[path]["first_token_ms"] > 0 and result[path]["decode_tokens_per_s"] > 0
    assert result["fast_path"] is True  # the static-cache path ran (uncompiled on CPU)
    assert 8 <= result["prompt_tokens"] <= 24


def test_chat_bench_on_a_training_output(tmp_path):
    """`--adapter-dir`: a training output's adapter, plain path beside chat's default load."""
    from inference_helpers import write_tiny_adapter

    from slackdist.model.tiny import write_tiny_model

    adapter = write_tiny_adapter(write_tiny_model(tmp_path / "tiny"), tmp_path / "out")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench/chat_bench.py", "--adapter-dir", str(adapter), "--prompt-tokens", "24"]
    cmd += ["--new-tokens", "4", "--repeats", "1", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    # on the CPU nothing is merged (no fast path to gain): both rows are the adapter on its fp32 base
    assert result["plain_kind"] == "adapter" and result["kind"] == "adapter"
    assert result["slackdist"]["new_tokens"] == 4 and result["plain_generate"]["new_tokens"] == 4
