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
    assert "| slackdist `stream_reply` |" in done.stdout and "decode speedup" in done.stdout
    result = json.loads(out.read_text())
    for path in ("plain_generate", "slackdist"):
        assert result[path]["new_tokens"] == 6  # min_new_tokens forced the full length
        assert result[path]["first_token_ms"] > 0 and result[path]["decode_tokens_per_s"] > 0
    assert result["fast_path"] is True  # the static-cache path ran (uncompiled on CPU)
    assert 8 <= result["prompt_tokens"] <= 24
