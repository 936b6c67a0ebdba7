"""bench/prepare_bench.py works end to end at a tiny size (no timing assertions)."""

from __future__ import annotations

import json

from script_helpers import load_bench


def test_generator_is_deterministic_and_realistic(tmp_path):
    bench = load_bench("prepare_bench")
    a = bench.generate_export(tmp_path / "a", 2000, seed=1)
    b = bench.generate_export(tmp_path / "b", 2000, seed=1)
    assert a == b and a["messages"] == 2000
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.json"))
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.json"))
    for rel in files_a[:20]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    msgs = [m for p in (tmp_path / "a").glob("*/*.json") for m in json.loads(p.read_text())]
    assert len(msgs) == 2000
    text = json.dumps(msgs)
    for needle in (
        "<@U",
        "```",
        "bot_message",
        "channel_join",
        "thread_ts",
        "reactions",
        "&amp;",
        "reply_count",
    ):
        assert needle in text, needle
    # some thread replies sit in a later day file than their parent
    day_of = {
        (p.parent.name, m["ts"]): p.stem
        for p in (tmp_path / "a").glob("*/*.json")
        for m in json.loads(p.read_text())
    }
    later = 0
    for p in (tmp_path / "a").glob("*/*.json"):
        for m in json.loads(p.read_text()):
            if m.get("thread_ts") and m["thread_ts"] != m["ts"]:
                parent_day = day_of.get((p.parent.name, m["thread_ts"]))
                later += parent_day is not None and parent_day < p.stem
    assert later > 0


def test_bench_runs_and_writes_json(tmp_path, capsys):
    bench = load_bench("prepare_bench")
    out = tmp_path / "result.json"
    assert bench.main(["--messages", "2000", "--json", str(out), "--workdir", str(tmp_path)]) == 0
    row = json.loads(out.read_text())
    assert row["messages"] == 2000 and row["records"] > 0
    assert row["prepare_seconds"] > 0 and row["plain_load_seconds"] > 0 and row["peak_rss_mib"] > 0
    assert row["quality"]["conversations_mixing_channels"] == 0
    assert row["quality"]["turns_with_raw_markup"] == 0 and row["quality"]["turns_with_html_escapes"] == 0
    assert row["quality"]["code_blocks_intact"] == row["quality"]["code_blocks"] > 0
    assert "ratio to plain load" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("slackdist-bench-")] == []
