"""bench/data_bench.py works end to end at a tiny size (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

from script_helpers import load_bench

REPO = Path(__file__).resolve().parents[1]


def test_data_bench_rows_feed_the_same_batches(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    bench = load_bench("data_bench")
    out = tmp_path / "d.json"
    argv = ["--model", str(tiny_model_dir), "--baseline", str(REPO), "--messages", "3000"]
    assert bench.main([*argv, "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["path"] for r in rows] == [
        "baseline tree",
        "datasets, first run",
        "datasets, second run",
        "save_to_disk folder, first run",
    ]
    assert result["messages"] == 3000 and rows[0]["conversations"] == result["splits"]["train"]
    assert len({r["batches_sha256"] for r in rows}) == 1 and all(r["steps_measured"] > 0 for r in rows)
    assert "| datasets, second run |" in capsys.readouterr().out
