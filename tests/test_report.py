"""The report measures the records it wrote: coverage, threads whole, replies with their parent, code blocks.

Each figure is shown to fall below 100% on a case built for it (a block changed by redaction, a thread
split across records, a record that lost a message), so none of them can be set by construction.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from data_helpers import grouped

from slackdist.config import DataConfig
from slackdist.data.prepare import prepare, summary_lines
from slackdist.data.records import SPLIT_NAMES, RecordBuilder
from slackdist.data.report import ReportBuilder, window_group
from slackdist.slack.metadata import Channel
from slackdist.slack.post import Post

DAY = 86400.0
T0 = 1_600_000_000.0
GITHUB_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0" * 2  # a fake token of the documented shape
USERS = {"U1": "Ann", "U2": "Bob", "U3": "Cat", "U4": "Dan"}


def msg(t: float, user: str, text: str, **extra) -> dict:
    return {"type": "message", "user": user, "text": text, "ts": f"{T0 + t:.6f}", **extra}


def write_export(root: Path, messages: list[dict], users: dict[str, str] = USERS) -> Path:
    """A one-channel export (#general) whose messages go into day files by their ts."""
    (root / "general").mkdir(parents=True)
    (root / "users.json").write_text(
        json.dumps([{"id": u, "name": n.lower(), "profile": {"display_name": n}} for u, n in users.items()])
    )
    (root / "channels.json").write_text(json.dumps([{"id": "C1", "name": "general"}]))
    days: dict[str, list[dict]] = {}
    for m in messages:
        days.setdefault(datetime.fromtimestamp(float(m["ts"]), UTC).strftime("%Y-%m-%d"), []).append(m)
    for day, items in days.items():
        (root / "general" / f"{day}.json").write_text(json.dumps(items))
    return root


def records(out: Path) -> list[dict]:
    return [json.loads(line) for n in SPLIT_NAMES for line in (out / f"{n}.jsonl").read_text().splitlines()]


def output_text(out: Path) -> str:
    return "\n".join(
        p.read_text(encoding="utf-8") for p in out.iterdir() if p.suffix in (".json", ".jsonl", ".md")
    )


def test_a_code_block_changed_by_redaction_counts_as_changed_with_its_reason(tmp_path):
    export = write_export(
        tmp_path / "e",
        [
            msg(0, "U1", f"my config:\n```\nGITHUB_TOKEN={GITHUB_TOKEN}\n```"),
            msg(60, "U2", "and mine:\n```\nif a &lt; b:\n    go()\n```"),
            msg(120, "U1", "thanks"),
        ],
    )
    report = prepare(export, tmp_path / "out", DataConfig())
    q = report.quality
    assert q["code_blocks"] == 2 and q["code_blocks_intact"] == 1 and q["code_blocks_intact_ratio"] == 0.5
    assert q["code_blocks_changed"] == {"redacted": 1}
    (entry,) = q["code_blocks_changed_list"]
    assert entry["reason"] == "redacted" and entry["ts"] == f"{T0:.6f}" and entry["channel"] == "general"
    assert set(entry) == {"channel", "conversation_id", "ts", "reason"}  # where, never the text
    text = output_text(tmp_path / "out")
    assert GITHUB_TOKEN not in text
    assert "if a < b:\n    go()" in "\n".join(
        m["content"] for r in records(tmp_path / "out") for m in r["messages"]
    )


def test_a_thread_split_across_records_is_not_kept_whole(tmp_path):
    # The parent announces one reply; once it is read the thread is yielded, and two late replies
    # (a stale count) become a second part: not one record, not overlapping windows.
    export = write_export(
        tmp_path / "e",
        [
            msg(0, "U1", "how do we deploy?", thread_ts=f"{T0:.6f}", reply_count=1),
            msg(60, "U2", "make deploy", thread_ts=f"{T0:.6f}"),
            msg(3 * DAY, "U3", "that target is gone now", thread_ts=f"{T0:.6f}"),
            msg(3 * DAY + 60, "U4", "use the pipeline", thread_ts=f"{T0:.6f}"),
        ],
    )
    q = prepare(export, tmp_path / "out", DataConfig()).quality
    assert q["threads_reopened"] == 1
    assert q["threads"] == 1 and q["threads_kept_whole"] == 0 and q["threads_kept_whole_ratio"] == 0.0
    assert q["replies_with_parent_present"] == 3 and q["replies_placed_with_parent"] == 1
    assert q["reply_partner_coverage"] == 1.0 and q["conversations_kept_whole"] == 2  # each part is whole
    groups = {window_group(r["meta"]["conversation_id"]) for r in records(tmp_path / "out")}
    assert len(groups) == 2


def test_replies_that_come_too_late_to_join_a_bare_parent_are_not_placed_with_it(tmp_path):
    export = write_export(
        tmp_path / "e",
        [
            msg(0, "U1", "anyone seen the outage report?"),  # a parent exported without thread fields
            msg(60, "U2", "not yet"),
            msg(3 * DAY, "U3", "here it is", thread_ts=f"{T0:.6f}"),
            msg(3 * DAY + 60, "U4", "thanks", thread_ts=f"{T0:.6f}"),
        ],
    )
    q = prepare(export, tmp_path / "out", DataConfig()).quality
    assert q["thread_parents_joined"] == 0
    assert q["replies_with_parent_present"] == 2 and q["replies_placed_with_parent"] == 0
    assert q["threads"] == 1 and q["threads_kept_whole"] == 0


def test_a_bare_parent_answered_in_time_is_joined_and_its_thread_is_whole(tmp_path):
    export = write_export(
        tmp_path / "e",
        [
            msg(0, "U1", "anyone seen the outage report?"),
            msg(60, "U2", "unrelated chatter"),
            msg(600, "U3", "here it is", thread_ts=f"{T0:.6f}"),
            msg(700, "U1", "thanks", thread_ts=f"{T0:.6f}"),
            msg(800, "U3", "np", thread_ts=f"{T0:.6f}"),
        ],
    )
    out = tmp_path / "out"
    q = prepare(export, out, DataConfig()).quality
    assert q["thread_parents_joined"] == 1 and q["threads"] == 1 and q["threads_kept_whole"] == 1
    assert q["replies_placed_with_parent_ratio"] == 1.0
    (thread,) = [r for r in records(out) if r["meta"]["thread_ts"] == f"{T0:.6f}"]
    assert thread["messages"][1]["content"].startswith("Ann: anyone seen the outage report?")
    assert thread["messages"][-1]["content"] == "Cat: np"  # odd length: the closing answer is kept


def test_coverage_is_measured_on_what_the_records_hold():
    channel = Channel(id="C1", name="general", kind="public", folder="general")
    posts = [
        Post(
            ts=f"{T0 + i:.6f}",
            thread_ts=None,
            speaker=w,
            speaker_id=w,
            text=f"{w} says {i}",
            source="d",
            channel_id="C1",
        )
        for i, w in enumerate(["Ann", "Bob", "Ann", "Bob"])
    ]
    (conv,) = grouped(channel, posts)
    builder = RecordBuilder(DataConfig(), workspace="w")
    honest = ReportBuilder(export="e", workspace="w", persona_mode=False, preview=0)
    plan, built = builder.build_conversation(conv)
    honest.conversation(conv, plan, built)
    assert honest.quality.reply_partner_messages_covered == 4 and honest.quality.conversations_kept_whole == 1
    # A record that lost a message (as a buggy role or window step would write it) is measured as such.
    plan, built = builder.build_conversation(conv)
    built[0][1].record["messages"][3]["content"] = "Ann: something else"
    measured = ReportBuilder(export="e", workspace="w", persona_mode=False, preview=0)
    measured.conversation(conv, plan, built)
    measured.end_channel(channel)
    q = measured.quality.as_dict()
    assert q["reply_partner_messages"] == 4 and q["reply_partner_messages_covered"] == 3
    assert q["reply_partner_coverage"] == 0.75 and q["conversations_kept_whole"] == 0
    assert measured.dropped == {"not_in_record": 1} and measured.channels["general"].covered_messages == 3


def test_display_names_go_through_the_redactor(tmp_path):
    users = {"U1": "ann.smith@example.com", "U2": "+1 415 555 0134", "U3": "Cat"}
    export = write_export(
        tmp_path / "e",
        [msg(0, "U1", "hi <@U2>"), msg(60, "U2", "hello"), msg(120, "U3", "hey all")],
        users=users,
    )
    report = prepare(export, tmp_path / "out", DataConfig())
    text = output_text(tmp_path / "out")
    assert "ann.smith@example.com" not in text and "555 0134" not in text
    (rec,) = records(tmp_path / "out")
    assert rec["meta"]["speakers"] == ["[EMAIL]", "[PHONE]", "Cat"]
    assert rec["messages"][1]["content"].startswith("[EMAIL]: hi @[PHONE]")
    assert report.data["redactions"]["email"] >= 1 and report.data["redactions"]["phone"] >= 2


def test_a_tiny_export_warns_that_validation_and_test_are_empty(tmp_path):
    export = write_export(tmp_path / "e", [msg(0, "U1", "hi"), msg(60, "U2", "hello")])
    report = prepare(export, tmp_path / "out", DataConfig())
    w = report.data["warnings"]
    assert w["by_kind"]["empty_split"] == 1 and w["count"] >= 1
    lines = summary_lines(report)
    assert (
        "warning: validation.jsonl and test.jsonl are empty: 1 records are too few for a 90,5,5 split"
        in lines[-3]
    )
    assert "empty_split" in (tmp_path / "out" / "report.md").read_text()
    bigger = prepare(export, tmp_path / "out2", DataConfig(split="100,0,0"))
    assert "empty_split" not in bigger.data["warnings"]["by_kind"]  # no split was asked for


def test_a_file_share_names_its_file_once(tmp_path):
    legacy = msg(
        0,
        "U1",
        "<@U1|ann> uploaded a file: <https://x.slack.com/files/ann/F1/chart.png|chart.png>",
        subtype="file_share",
        file={"id": "F1", "name": "chart.png"},
        files=[{"id": "F1", "name": "chart.png"}],
    )
    only_files = msg(60, "U2", "", subtype="file_share", files=[{"name": "notes.pdf"}, {"name": "notes.pdf"}])
    export = write_export(tmp_path / "e", [legacy, only_files])
    prepare(export, tmp_path / "out", DataConfig())
    (rec,) = records(tmp_path / "out")
    user, helper = (m["content"] for m in rec["messages"][1:])
    assert "[file: chart.png]" not in user and user.count("chart.png (") == 1
    assert helper.count("[file: notes.pdf]") == 1


def test_dm_records_name_their_participants(sample_export_dir, tmp_path):
    prepare(sample_export_dir, tmp_path / "out", DataConfig(include_dms=True))
    dms = [r for r in records(tmp_path / "out") if r["meta"]["channel"].startswith(("D0", "mpdm"))]
    assert len(dms) >= 2
    for r in dms:
        system = r["messages"][0]["content"]
        assert "#D0" not in system and "#mpdm" not in system and "direct message between" in system
        assert all(name in system for name in r["meta"]["speakers"])
