"""The pure parts of bench/train_throughput.py: the quality comparison and the table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from train_throughput import compare_quality, median_rows, print_table  # noqa: E402


def test_compare_quality_reports_the_largest_moving_average_gap() -> None:
    a = {"name": "default", "losses": [10.0] * 10 + [5.0] * 10}
    b = {"name": "plain", "losses": [10.0] * 10 + [5.0] * 9 + [6.0]}
    q = compare_quality(a, b, window=10)
    assert q["steps"] == 20 and q["runs"] == ["default", "plain"]
    assert q["last_gap"] == pytest.approx(1 / 51, abs=1e-5)  # 5.0 vs 5.1
    assert q["max_window_gap"] == q["last_gap"]
    same = compare_quality(a, dict(a, name="again"), window=10)
    assert same["max_window_gap"] == 0


def test_table_has_a_ratio_column_per_peer(capsys) -> None:
    rows = [
        {"name": "default", "tokens_per_s": 24000.0, "peak_gib": 37.0, "mfu_6nt": 0.5},
        {"name": "peer_trl_seed", "tokens_per_s": 6000.0, "peak_gib": 3.9},
        {"name": "peer_unsloth_d05", "tokens_per_s": 4000.0, "peak_gib": 3.7},
        {"name": "broken", "failed": True},
    ]
    print_table(rows)
    out = capsys.readouterr().out.splitlines()
    assert "x trl_seed" in out[0] and "x unsloth_d05" in out[0]
    assert out[1].split()[-2:] == ["4.00", "6.00"]
    assert out[-1].split() == ["broken", "failed"]


def test_repeated_runs_are_summarised_by_their_median(capsys) -> None:
    rows = [
        {"name": "default", "tokens_per_s": 25000.0, "peak_gib": 31.0},
        {"name": "plain", "tokens_per_s": 6000.0, "peak_gib": 6.0},
        {"name": "default", "tokens_per_s": 22000.0, "peak_gib": 31.0},
        {"name": "plain", "failed": True},
        {"name": "default", "tokens_per_s": 24000.0, "peak_gib": 31.0},
        {"name": "peer_trl_seed", "tokens_per_s": 6000.0, "peak_gib": 3.9},
    ]
    summary = median_rows(rows)
    assert [r["name"] for r in summary] == ["default", "plain", "peer_trl_seed"]
    assert summary[0]["tokens_per_s"] == 24000.0 and summary[0]["range"] == [22000.0, 25000.0]
    assert summary[0]["runs"] == 3
    # the failed run is counted, not used
    assert summary[1]["tokens_per_s"] == 6000.0 and summary[1]["runs"] == 2
    assert "range" not in summary[2]
    even = median_rows([dict(rows[0]), dict(rows[2])])
    assert even[0]["tokens_per_s"] == 22000.0  # the lower middle: no run is invented
    print_table(summary)
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[-4:] == ["(median", "of", "3:", "22000-25000)"]
    assert out[1].split()[-5] == "4.00"  # the ratio is the median's
