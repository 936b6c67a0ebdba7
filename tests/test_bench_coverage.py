"""bench/coverage_bench.py: its own reader and the targets on both shared exports and a threaded one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_helpers import load_bench

from slackdist.config import DataConfig
from slackdist.data.prepare import prepare


@pytest.fixture(scope="module")
def bench():
    return load_bench("coverage_bench")


@pytest.fixture(scope="module")
def threaded_export(bench, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("threads") / "export"
    bench.generate_threaded_export(root, 4000, seed=3)
    return root


def test_words_leave_out_what_cleaning_rewrites(bench):
    raw = "see <https://x.y/a|the docs> :tada: a &lt; b, ping <@U123> or ann@example.com xoxb-1-2-abc"
    assert bench.words(raw) == ["see", "a", "b", "ping", "or"]
    assert bench.words("Ann: see the docs (https://x.y/a) 🎉 a < b, ping @Bob or [EMAIL]")[:3] == [
        "ann",
        "see",
        "the",
    ]


def test_the_threaded_export_is_deterministic_and_has_what_it_promises(bench, threaded_export, tmp_path):
    again = tmp_path / "again"
    bench.generate_threaded_export(again, 4000, seed=3)
    files = sorted(p.relative_to(threaded_export) for p in threaded_export.rglob("*.json"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.json"))
    assert all((threaded_export / f).read_bytes() == (again / f).read_bytes() for f in files)
    source = bench.read_source(threaded_export)
    threads = [c for c in source.conversations if c.kind == "thread"]
    sizes = [len(c.messages) for c in threads]
    assert min(sizes) >= 1 and max(sizes) <= 40 and sum(s >= 30 for s in sizes) >= 3
    raw = [m for p in threaded_export.glob("*/*.json") for m in json.loads(p.read_text())]
    replied = {m["thread_ts"] for m in raw if m.get("thread_ts") and m["thread_ts"] != m["ts"]}
    bare = [m for m in raw if m["ts"] in replied and "thread_ts" not in m]
    assert len(bare) >= 10  # parents exported without thread fields
    assert any(len(m.get("text", "")) > 4 * 2048 for m in raw)  # a parent over the default token budget


def test_the_reader_finds_a_lost_message(bench, threaded_export, tmp_path):
    out = tmp_path / "out"
    prepare(threaded_export, out, DataConfig())
    before = bench.measure(threaded_export, out)
    path = out / "train.jsonl"
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])
    first["messages"][-1]["content"] = "nothing of the kind"  # a record that lost its closing message
    path.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    after = bench.measure(threaded_export, out)
    assert after["reply_partner_covered"] < before["reply_partner_covered"]
    assert after["conversations_whole"] == before["conversations_whole"] - 1


@pytest.mark.parametrize("name", ["sev_testarchive_2016", "houstondatavis_2016", "threaded"])
def test_exports_reach_the_coverage_and_whole_thread_targets(
    bench, name, public_exports, threaded_export, tmp_path
):
    export = threaded_export if name == "threaded" else public_exports[name]
    out = tmp_path / "out"
    report = prepare(export, out, DataConfig())
    measured = bench.measure(export, out)  # its own reader, not the report
    assert measured["reply_partner_messages"] > 0
    assert measured["reply_partner_coverage"] >= bench.TARGET_COVERAGE
    assert measured["conversations_whole_ratio"] >= bench.TARGET_WHOLE
    if name == "threaded":
        assert measured["threads_2_people"] > 50 and measured["threads_whole_ratio"] >= bench.TARGET_WHOLE
    # The report says what the independent count says. They differ only where a parent without
    # thread fields got its first reply too late to be joined: the bench moves it out of its time
    # window into the thread, prepare leaves it in the window (where it may partner someone).
    q = report.quality
    assert q["reply_partner_coverage"] >= bench.TARGET_COVERAGE
    for ours, theirs in (
        ("reply_partner_messages", "reply_partner_messages"),
        ("conversations_with_2_people", "conversations_2_people"),
        ("threads", "threads_2_people"),
        ("threads_kept_whole", "threads_whole"),
    ):
        assert abs(q[ours] - measured[theirs]) <= 0.01 * max(1, measured[theirs]), ours
