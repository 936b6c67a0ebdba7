"""bench/serve_bench.py runs end to end on the CPU with the tiny model (a smoke test: no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_serve_bench_smoke(tmp_path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, "bench/serve_bench.py", "--clients", "1,2", "--requests", "3", "--warm-up", "1"]
    cmd += ["--prompt-tokens", "16", "--new-tokens", "4", "--hostile", "2", "--oversize-mb", "5"]
    cmd += ["--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "| clients | requests |" in done.stdout and "| hostile request |" in done.stdout
    result = json.loads(out.read_text())
    assert [row["clients"] for row in result["load"]] == [1, 2]
    assert all(row["requests"] == 3 and row["errors"] == 0 for row in result["load"])
    assert all(row["completion_tokens_per_s"] > 0 and row["health_max_ms"] > 0 for row in result["load"])
    statuses = {row["case"]: set(row["statuses"]) for row in result["hostile"]}
    assert statuses == {
        "5 MB, Content-Length": {413},
        "5 MB, chunked": {413},
        "4 MB prompt (within the limit)": {400},
    }
    assert all(len(row["rss_after_each_mb"]) == 2 and row["rss_before_mb"] > 0 for row in result["hostile"])
