"""End to end: `slackdist prepare` on the sample export (folder, zip, nested zip), bad inputs, real exports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from export_helpers import MARKER, deflate_bomb, raw_zip, stored, write_export
from export_helpers import msg as slack_message
from hypothesis import given, settings
from hypothesis import strategies as st
from script_helpers import load_bench

from slackdist.cli import main as cli_main
from slackdist.config import DataConfig
from slackdist.data.prepare import prepare
from slackdist.data.records import SPLIT_NAMES, group_of, validate_record
from slackdist.data.report import _TOKEN_BINS, _TURN_BINS, histogram
from slackdist.errors import SlackdistError
from slackdist.slack.markup import code_blocks, decode_entities, find_raw_markup

REPO = Path(__file__).resolve().parents[1]


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slackdist", "prepare", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def read_records(out: Path) -> dict[str, list[dict]]:
    return {
        name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        for name in SPLIT_NAMES
    }


def all_records(out: Path) -> list[dict]:
    return [r for recs in read_records(out).values() for r in recs]


def all_output_text(out: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in sorted(out.iterdir()))


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f"{name}.tmp-")]


def raw_messages(export: Path) -> list[tuple[str, dict]]:
    out = []
    for day in sorted(export.glob("*/*.json")):
        if day.stem[:2] == "20":
            out.extend((day.parent.name, m) for m in json.loads(day.read_text(encoding="utf-8")))
    return out


@pytest.fixture(scope="module")
def sample_out(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The sample folder through the real CLI in a subprocess (defaults)."""
    out = tmp_path_factory.mktemp("prep") / "out"
    proc = run_cli(str(REPO / "tests/fixtures/sample_export"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_cli_writes_every_file_with_valid_records(sample_out):
    out, proc = sample_out
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "report.json", "report.md"):
        assert (out / name).is_file()
    for png in ("turns_per_conversation.png", "tokens_per_conversation.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = all_records(out)
    assert len(records) >= 8
    for r in records:
        assert validate_record(r) == [], r["meta"]
        assert r["messages"][-1]["role"] == "assistant"
    assert "wrote train.jsonl" in proc.stdout and str(out) in proc.stdout
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_no_planted_secret_in_any_output_or_log(sample_out, sample_secrets):
    out, proc = sample_out
    text = all_output_text(out) + proc.stdout + proc.stderr
    for secret in (
        sample_secrets.PLANTED_SECRETS + sample_secrets.PLANTED_EMAILS + sample_secrets.PLANTED_PHONES
    ):
        assert secret not in text, secret
    report = json.loads((out / "report.json").read_text())
    assert report["redactions"]["slack_token"] >= 1 and report["redactions"]["email"] >= 1


def test_no_markup_or_escapes_and_code_blocks_intact(sample_out, sample_secrets):
    out, _ = sample_out
    contents = [m["content"] for r in all_records(out) for m in r["messages"][1:]]
    assert all(find_raw_markup(c) == [] for c in contents)
    body = "\n".join(contents)
    checked = 0
    for _, msg in raw_messages(REPO / "tests/fixtures/sample_export"):
        for block in code_blocks(msg.get("text", "")):
            decoded = decode_entities(block)
            if any(s in decoded for s in sample_secrets.PLANTED_SECRETS) or "password=" in decoded:
                continue  # redacted inside code too (checked above)
            assert decoded in body
            checked += 1
    assert checked >= 1
    q = json.loads((out / "report.json").read_text())["quality"]
    assert q["turns_with_raw_markup"] == 0 and q["turns_with_html_escapes"] == 0
    assert q["code_blocks"] >= 2 and q["code_blocks_intact"] >= checked  # (blocks-only messages add some)
    # the blocks that held a planted secret are measured as changed, with the reason
    changed = q["code_blocks"] - q["code_blocks_intact"]
    assert changed >= 2 and q["code_blocks_changed"] == {"redacted": changed}
    assert q["conversations_mixing_channels"] == 0 and q["records_invalid"] == 0


def test_no_conversation_in_two_splits(sample_out):
    out, _ = sample_out
    groups = {name: {group_of(r) for r in recs} for name, recs in read_records(out).items()}
    assert not (groups["train"] & groups["validation"] or groups["train"] & groups["test"])
    assert not groups["validation"] & groups["test"]


def test_late_reply_thread_is_rebuilt_in_one_conversation(sample_out):
    out, _ = sample_out
    raw = [m for ch, m in raw_messages(REPO / "tests/fixtures/sample_export") if ch == "general"]
    parent = next(m for m in raw if m.get("reply_count"))
    replies = [m for m in raw if m.get("thread_ts") == parent["ts"] and m["ts"] != parent["ts"]]
    assert len({json.dumps(r["ts"]) for r in replies}) == parent["reply_count"]
    recs = [r for r in all_records(out) if r["meta"]["thread_ts"] == parent["ts"]]
    assert len(recs) == 1
    (rec,) = recs
    assert rec["meta"]["start"] == float(parent["ts"])
    assert rec["meta"]["end"] == max(float(r["ts"]) for r in replies)  # the closing reply is kept
    text = "\n".join(m["content"] for m in rec["messages"])
    assert "Late to the party" in text and "Should we ship on Friday" in text


def test_dms_absent_by_default_and_present_when_asked(sample_out, tmp_path, sample_secrets):
    out, _ = sample_out
    channels = {r["meta"]["channel"] for r in all_records(out)}
    assert "D0DMADAGR1" not in channels and not any(c.startswith("mpdm-") for c in channels)
    report = json.loads((out / "report.json").read_text())
    assert report["quality"]["dm_turns"] == 0

    out2 = tmp_path / "with_dms"
    assert (
        cli_main(["prepare", str(REPO / "tests/fixtures/sample_export"), "--out", str(out2), "--include-dms"])
        == 0
    )
    report2 = json.loads((out2 / "report.json").read_text())
    assert report2["quality"]["dm_turns"] > 0
    assert any(c.startswith("mpdm-") or c == "D0DMADAGR1" for c in report2["channels"])
    assert sample_secrets.DM_TOKEN_VALUE not in all_output_text(out2)


@pytest.mark.parametrize("kind", ["zip", "nested_zip"])
def test_zip_gives_the_same_records_as_the_folder(
    kind, sample_out, sample_export_zip, sample_export_zip_nested, tmp_path
):
    folder_out, _ = sample_out
    export = sample_export_zip if kind == "zip" else sample_export_zip_nested
    out = tmp_path / "z"
    assert cli_main(["prepare", str(export), "--out", str(out), "--workspace", "sample_export"]) == 0
    assert read_records(out) == read_records(folder_out)


def test_dry_run_writes_nothing_and_prints_the_report(tmp_path, capsys):
    out = tmp_path / "never"
    code = cli_main(["prepare", str(REPO / "tests/fixtures/sample_export"), "--out", str(out), "--dry-run"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "## Quality" in printed and "conversations mixing channels" in printed
    assert list(tmp_path.iterdir()) == []


def test_rerun_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "out"
    export = str(REPO / "tests/fixtures/sample_export")
    assert cli_main(["prepare", export, "--out", str(out)]) == 0
    first = read_records(out)
    (out / "keep.txt").write_text("a file put into the output")
    assert cli_main(["prepare", export, "--out", str(out), "--split", "50,25,25"]) == 0
    second = read_records(out)
    assert sum(map(len, first.values())) == sum(map(len, second.values()))
    assert len(second["test"]) > len(first["test"])
    assert not (out / "keep.txt").exists()  # one rename of a whole new folder, not file by file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_persona_mode(tmp_path):
    out = tmp_path / "p"
    assert (
        cli_main(
            ["prepare", str(REPO / "tests/fixtures/sample_export"), "--out", str(out), "--as", "Grace Hopper"]
        )
        == 0
    )
    records = all_records(out)
    assert records
    for r in records:
        assert "Grace Hopper" in r["messages"][0]["content"]
        assert "Grace Hopper" in r["meta"]["speakers"]
        for m in r["messages"][1:]:
            if m["role"] == "assistant":
                assert not m["content"].startswith(("Ada Lovelace:", "alan.t:", "linus:"))
            else:
                assert not m["content"].startswith("Grace Hopper:")
    nobody = tmp_path / "nobody"
    code = cli_main(
        ["prepare", str(REPO / "tests/fixtures/sample_export"), "--out", str(nobody), "--as", "Nobody"]
    )
    assert code == 2 and leftovers(tmp_path, "nobody") == []


def test_split_by_time_puts_the_newest_in_test(tmp_path):
    out = tmp_path / "t"
    args = ["prepare", str(REPO / "tests/fixtures/sample_export"), "--out", str(out), "--split-by", "time"]
    assert cli_main([*args, "--split", "60,20,20"]) == 0
    recs = read_records(out)
    assert recs["test"] and recs["validation"]
    assert max(r["meta"]["start"] for r in recs["train"]) <= min(
        r["meta"]["start"] for r in recs["validation"]
    )
    assert max(r["meta"]["start"] for r in recs["validation"]) <= min(
        r["meta"]["start"] for r in recs["test"]
    )


def test_token_budget_with_a_real_tokenizer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    budget = 160
    report = prepare(
        REPO / "tests/fixtures/sample_export",
        out,
        DataConfig(tokenizer=str(tiny_model_dir), max_tokens=budget, max_turns=6, window_overlap=2),
    )
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = all_records(out)
    assert records
    for r in records:
        n = len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
        assert n <= budget
        assert len(r["messages"]) - 1 <= 6
    assert report.data["histograms"]["tokens"]
    assert report.totals["tokens"] == sum(
        len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
        for r in records
    )


def test_keep_emails(tmp_path, sample_secrets):
    out = tmp_path / "k"
    assert (
        cli_main(["prepare", str(REPO / "tests/fixtures/sample_export"), "--out", str(out), "--keep-emails"])
        == 0
    )
    text = all_output_text(out)
    assert sample_secrets.EMAIL_1 in text
    assert all(s not in text for s in sample_secrets.PLANTED_SECRETS)


# ---------------------------------------------------------------- warnings and bad input


def broken_copy(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    shutil.copytree(REPO / "tests/fixtures/sample_export", export)
    return export


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("slackdist prepare: error:")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_strict_turns_warnings_into_errors(tmp_path, capsys):
    export = str(REPO / "tests/fixtures/sample_export")
    out = tmp_path / "s"
    assert cli_main(["prepare", export, "--out", str(out), "--strict"]) == 2
    assert_one_line_error(capsys.readouterr().err, "general/2021-03-01.json", "U0GHOST02", "--strict")
    assert leftovers(tmp_path, "s") == []
    assert cli_main(["prepare", export, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["warnings"]["count"] == 1 and report["warnings"]["by_kind"] == {"unknown_user": 1}


@pytest.mark.parametrize("damage", ["truncated", "not_utf8"])
def test_bad_day_file_is_a_warning_or_a_strict_error(damage, tmp_path, capsys):
    export = broken_copy(tmp_path)
    day = export / "engineering" / "2021-03-02.json"
    data = day.read_bytes()
    day.write_bytes(
        data[: len(data) // 2] if damage == "truncated" else b'[{"text": "caf\xe9", "ts": "1.0"}]'
    )
    out = tmp_path / "out"
    assert cli_main(["prepare", str(export), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["warnings"]["by_kind"]["bad_day_file"] == 1
    out2 = tmp_path / "strict"
    assert (
        cli_main(["prepare", str(export), "--out", str(out2), "--strict", "--channels", "engineering"]) == 2
    )
    assert_one_line_error(capsys.readouterr().err, "engineering/2021-03-02.json")
    assert leftovers(tmp_path, "strict") == []


def test_bad_inputs_exit_2_with_one_line_and_leave_nothing(tmp_path):
    not_export = tmp_path / "not_export"
    not_export.mkdir()
    (not_export / "notes.txt").write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "channels.json").write_text("[]")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("channels.json", "[]")
        zf.writestr("../escape/2021-01-01.json", "[]")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ([str(not_export), "--out"], "not_export"),
        ([str(empty), "--out"], "empty"),
        ([str(evil), "--out"], "evil.zip"),
        ([str(tmp_path / "missing"), "--out"], "missing"),
        ([str(REPO / "tests/fixtures/sample_export"), "--channels", "nope", "--out"], "nope"),
    ]
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        proc = run_cli(*args, str(out))
        assert proc.returncode == 2, (args, proc.stderr)
        assert_one_line_error(proc.stderr, needle)
        assert leftovers(tmp_path, f"out{i}") == []
    assert not (tmp_path / "escape").exists()
    proc = run_cli(str(REPO / "tests/fixtures/sample_export"), "--out", str(a_file))
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "a_file")
    proc = run_cli(str(REPO / "tests/fixtures/sample_export"))
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "--out")


def test_programmatic_errors_are_slackdist_errors(tmp_path):
    with pytest.raises(SlackdistError, match="--out"):
        prepare(REPO / "tests/fixtures/sample_export", None, DataConfig())


# ---------------------------------------------------------------- real exports


@pytest.mark.parametrize("name", ["sev_testarchive_2016", "houstondatavis_2016"])
def test_real_exports_meet_the_quality_figures(name, public_exports, tmp_path):
    report = prepare(public_exports[name], tmp_path / "out", DataConfig())
    q, t = report.quality, report.totals
    assert t["records"] > 0 and t["human_messages"] > 0
    assert q["conversations_mixing_channels"] == 0
    assert q["turns_with_raw_markup"] == 0 and q["turns_with_html_escapes"] == 0
    assert q["code_blocks_intact"] == q["code_blocks"]
    assert q["records_ending_on_assistant"] == q["records"] and q["records_invalid"] == 0
    assert q["dm_turns"] == 0
    # every message is accounted for: covered, or a counted drop reason
    assert sum(report.data["dropped"].values()) + t["covered_messages"] == t["messages"]
    for r in all_records(tmp_path / "out"):
        assert all(find_raw_markup(m["content"]) == [] for m in r["messages"])


@pytest.mark.parametrize("split_by", ["hash", "time"])
def test_workers_do_not_change_the_output(tmp_path, split_by):
    export = REPO / "tests/fixtures/sample_export"
    cfg = {"include_dms": True, "split_by": split_by}
    serial = prepare(export, tmp_path / "serial", DataConfig(workers=1, **cfg))
    parallel = prepare(export, tmp_path / "parallel", DataConfig(workers=2, **cfg))
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes()
    assert read_records(tmp_path / "serial") == read_records(tmp_path / "parallel")
    for key in ("totals", "quality", "dropped", "redactions", "channels", "preview", "warnings"):
        a, b = serial.data[key], parallel.data[key]
        if key == "totals":
            a, b = (
                {k: v for k, v in a.items() if k != "seconds"},
                {k: v for k, v in b.items() if k != "seconds"},
            )
        assert a == b, key


def test_results_are_merged_in_channel_order_whatever_order_they_finish_in():
    from slackdist.data.workers import in_channel_order

    class Bar:
        n = 0

        def update(self, k: int) -> None:
            self.n += k

    finished = [SimpleNamespace(index=i, report=SimpleNamespace(day_files=1)) for i in (2, 0, 3, 1)]
    bar = Bar()
    merged = []
    for result in in_channel_order(iter(finished), bar):
        merged.append(result.index)
        assert bar.n >= len(merged)  # the bar counts each channel as it finishes, before it is merged
    assert merged == [0, 1, 2, 3] and bar.n == 4


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=-10, max_value=40000), max_size=60),
    st.sampled_from([_TURN_BINS, _TOKEN_BINS, [5], [0, 1]]),
)
def test_histogram_bins_each_value_under_the_last_edge_it_reaches(values, edges):
    labels = [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:], strict=False)] + [f"{edges[-1]}+"]
    want = dict.fromkeys(labels, 0)
    for v in values:  # the slow way: walk the edges (below the first edge counts in the first bin)
        i = 0
        while i < len(edges) - 1 and v >= edges[i + 1]:
            i += 1
        want[labels[i]] += 1
    got = histogram(values, edges)
    assert list(got) == labels
    assert got == want


# ---------------------------------------------------------------- bots, and nothing left


def record_texts(out: Path) -> list[str]:
    return [m["content"] for r in all_records(out) for m in r["messages"][1:]]


def test_include_bots_keeps_agents_under_their_name_and_feeds_only_in_named_channels(tmp_path):
    export = REPO / "tests/fixtures/sample_export"
    plain = prepare(export, tmp_path / "plain", DataConfig())
    assert not [t for t in record_texts(tmp_path / "plain") if t.startswith(("Deploy Bot:", "Digest:"))]
    bots = prepare(export, tmp_path / "bots", DataConfig(include_bots=True))
    texts = record_texts(tmp_path / "bots")
    assert any(t.startswith("Deploy Bot: Deployed v1.4.2 to production") for t in texts)
    assert any(t.startswith("Digest: Weekly digest is ready") for t in texts)
    for feed in ("All 128 tests passed", "Daily standup", "Reminder: submit your timesheet"):
        assert not [t for t in texts if feed in t], feed  # integration feeds and Slackbot stay out
    assert bots.data["dropped"]["bot_feed"] == 4 and "bot" not in bots.data["dropped"]
    assert plain.data["dropped"]["bot"] == 8
    prepare(export, tmp_path / "named", DataConfig(include_bots=True, channels=["random"]))
    named = "\n".join(record_texts(tmp_path / "named"))
    assert (
        "ci: Build #42" in named and "Standup App: *Daily standup*" in named and "Slackbot: Reminder" in named
    )


def agent_workspace(root: Path) -> Path:
    """People who only talk with an agent (in #help threads and in DMs), and a CI feed channel."""
    users = [
        {"id": "U1", "name": "ada", "profile": {"display_name": "Ada"}},
        {"id": "U2", "name": "bob", "profile": {"display_name": "Bob"}},
        {"id": "UAGENT", "name": "helper", "is_bot": True, "profile": {"real_name": "Helper"}},
    ]
    agent = {"bot_id": "B1", "bot_profile": {"id": "B1", "name": "Helper"}}
    help_day, dm_day, ci_day = [], [], []
    for i in range(6):
        t = 1_700_000_000 + 600 * i
        asker = "U1" if i % 2 else "U2"
        help_day += [
            slack_message(
                f"{t}.000100",
                f"how do I deploy service {i}?",
                user=asker,
                thread_ts=f"{t}.000100",
                reply_count=1,
            ),
            slack_message(
                f"{t + 60}.000100", f"Run make deploy-{i}.", user="UAGENT", thread_ts=f"{t}.000100", **agent
            ),
        ]
        dm_day += [
            slack_message(f"{t}.000200", f"summarise ticket {i}", user=asker),
            slack_message(f"{t + 30}.000200", "Done.", user="UAGENT", **agent),
        ]
        ci_day.append(
            {
                "type": "message",
                "subtype": "bot_message",
                "bot_id": "B9",
                "username": "ci",
                "text": "",
                "ts": f"{t}.000300",
                "attachments": [{"fallback": f"Build {i} passed", "text": "all green"}],
            }  # fmt: skip
        )
    return write_export(
        root,
        {
            "users.json": users,
            "channels.json": [{"id": "C1", "name": "help"}, {"id": "C2", "name": "ci"}],
            "dms.json": [{"id": "D0AGENTDM1", "members": ["U1", "UAGENT"]}],
            "help/2023-11-14.json": help_day,
            "D0AGENTDM1/2023-11-14.json": dm_day,
            "ci/2023-11-14.json": ci_day,
        },
    )


def nothing_left_until_flags(export: Path, capsys, hints: list[str], flags: list[str]) -> Path:
    """Without ``flags``: exit 2 with one line holding every hint and nothing written; with them, the output."""
    out = export.parent / "out"
    assert cli_main(["prepare", str(export), "--out", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, *hints)
    assert leftovers(export.parent, "out") == []
    assert cli_main(["prepare", str(export), "--out", str(out), *flags]) == 0
    return out


def test_a_workspace_that_talks_only_with_agents(tmp_path, capsys):
    hints = [
        "agents: no conversation left (6 human messages",
        "12 messages in DMs and group DMs (--include-dms keeps them)",
        "6 bot messages (--include-bots keeps them)",
        "6 integration feed posts (--include-bots keeps them in channels named with --channels)",
    ]
    out = nothing_left_until_flags(
        agent_workspace(tmp_path / "agents"), capsys, hints, ["--include-bots", "--include-dms"]
    )
    assert {r["meta"]["channel"] for r in all_records(out)} == {"help", "D0AGENTDM1"}
    texts = record_texts(out)
    assert sum(t.startswith("Helper: Run make deploy-") for t in texts) >= 5
    assert not [t for t in texts if "all green" in t or "passed" in t]  # the CI feed stays out
    report = json.loads((out / "report.json").read_text())
    assert report["dropped"]["bot_feed"] == 6


def test_a_workspace_with_only_private_channels_and_dms_names_both_flags(tmp_path, capsys):
    export = write_export(
        tmp_path / "private",
        {
            "users.json": [{"id": "U1", "name": "ada"}, {"id": "U2", "name": "bob"}],
            "groups.json": [{"id": "G1", "name": "team", "is_private": True}],
            "mpims.json": [{"id": "G2", "name": "mpdm-ada--bob-1"}],
            "team/2023-11-14.json": [
                slack_message(f"{1_700_000_000 + i}.0", f"q{i}", user=f"U{1 + i % 2}") for i in range(5)
            ],
            "mpdm-ada--bob-1/2023-11-14.json": [
                slack_message(f"{1_700_000_000 + i}.0", "hi", user=f"U{1 + i % 2}") for i in range(3)
            ],
        },
    )
    hints = [
        "private: no conversation left (0 human messages",
        "5 messages in private channels (--include-private keeps them)",
        "3 messages in DMs and group DMs (--include-dms keeps them)",
    ]
    out = nothing_left_until_flags(export, capsys, hints, ["--include-private", "--include-dms"])
    assert {r["meta"]["channel"] for r in all_records(out)} == {"team", "mpdm-ada--bob-1"}


# ---------------------------------------------------------------- hostile input, end to end


def hostile_copy(tmp_path: Path) -> Path:
    """The sample export plus one of each hostile day-file case, each with MARKER where it must not leak."""
    export = broken_copy(tmp_path)
    outside = tmp_path / "outside.json"
    outside.write_text(
        json.dumps([slack_message("1614600000.000001", f"outside {MARKER}", user="U0ADA0001")])
    )
    (export / "general" / "2021-03-05.json").symlink_to(outside)
    (export / "general" / "2021-03-06.json").write_bytes(b"[" * 200_000 + b"]" * 200_000)
    plan = {"id": "F9", "name": "plan.pdf"}
    day = [
        slack_message("1614700000.000001", "is the plan ready?", user="U0ADA0001"),
        slack_message(
            "1614700001.000001", "here it is", user="U0GRACE01", subtype="file_share", file=plan, files=[plan]
        ),
        slack_message(
            "1614700002.000001", "", user="U0ADA0001", attachments=[{"text": "ok", "fields": {"k": MARKER}}]
        ),
        slack_message("1614700003.000001", "thanks", user="U0GRACE01", blocks=MARKER, reactions=[MARKER]),
        {**slack_message("x", f"bad ts {MARKER}", user="U0ADA0001"), "ts": "inf"},
        MARKER,
    ]
    (export / "general" / "2021-03-07.json").write_text(json.dumps(day))
    return export


def test_a_hostile_export_is_read_with_counted_warnings_and_nothing_quoted(tmp_path, capsys):
    export = hostile_copy(tmp_path)
    out = tmp_path / "out"
    assert cli_main(["prepare", str(export), "--out", str(out)]) == 0
    text = all_output_text(out) + "\n".join(capsys.readouterr())
    assert MARKER not in text and "Infinity" not in text and "NaN" not in text
    report = json.loads((out / "report.json").read_text())
    by_kind = report["warnings"]["by_kind"]
    assert by_kind["symlink_outside_export"] == 1 and by_kind["bad_day_file"] == 1 and by_kind["bad_ts"] == 1
    # `fields` and `reactions` of the wrong type (`blocks` are not read when a message has text)
    assert by_kind["malformed_item"] == 2 and by_kind["bad_message"] == 1
    shared = [t for t in record_texts(out) if "here it is" in t]
    assert len(shared) == 1 and shared[0].count("[file: plan.pdf]") == 1  # in `file` and `files[]`: once
    assert cli_main(["prepare", str(export), "--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--strict")
    assert leftovers(tmp_path, "strict") == []


def test_a_zip_bomb_is_one_line_and_never_inflated(tmp_path):
    members = [stored("users.json", []), stored("channels.json", [{"id": "C1", "name": "general"}])]
    bomb = raw_zip(
        tmp_path / "bomb.zip", [*members, ("general/2021-01-01.json", deflate_bomb(2), 0, 2 << 30, 8, 0)]
    )
    liar = raw_zip(
        tmp_path / "liar.zip", [*members, ("general/2021-01-01.json", deflate_bomb(2), 0, 1 << 20, 8, 0)]
    )
    assert bomb.stat().st_size < 2_200_000
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc for the peak memory of the child")
    # VmHWM: the peak RSS of this process image (ru_maxrss would carry pytest's own peak across the exec)
    child = (
        "import sys\nfrom slackdist.cli import main\nrc = main(sys.argv[1:])\n"
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\nsys.exit(rc)"
    )
    for path, needle in ((bomb, "refusing a likely zip bomb"), (liar, "damaged zip member")):
        proc = subprocess.run(
            [sys.executable, "-c", child, "prepare", str(path), "--out", str(tmp_path / "o")],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2
        assert_one_line_error(proc.stderr, path.name, needle)
        peak_mib = int(proc.stdout.split()[-1]) / 1024
        assert peak_mib < 300, peak_mib  # the 2 GiB it expands to were never in memory
        assert leftovers(tmp_path, "o") == []


# ---------------------------------------------------------------- Ctrl-C


@pytest.fixture(scope="module")
def big_export(tmp_path_factory) -> Path:
    """A synthetic export large enough that prepare is still running when it is interrupted (~2 s)."""
    bench = load_bench("prepare_bench")
    root = tmp_path_factory.mktemp("big") / "export"
    bench.generate_export(root, 30_000, seed=3)
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@contextmanager
def running_prepare(export: Path, out: Path, workers: str) -> Iterator[subprocess.Popen]:
    """`slackdist prepare` in its own process group (like a job in a terminal); killed if still running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "slackdist", "prepare", str(export), "--out", str(out), "--workers", workers],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def wait_for(condition, what: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Poll ``condition`` until it holds; fail (never hang) when the deadline passes or prepare exits."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"prepare exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.002)


# Ctrl-C in a terminal reaches every process of the group; SIGTERM comes to the process (`kill PID`, a
# service manager) or to the whole group (SLURM's scancel). Each takes the same clean path.
INTERRUPTS = [("SIGINT", "group", "temp_folder"), ("SIGINT", "group", "workers_writing")]
INTERRUPTS += [("SIGTERM", "process", "workers_writing"), ("SIGTERM", "group", "workers_writing")]


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(("sig", "to", "moment"), INTERRUPTS)
def test_an_interrupt_exits_with_one_line_and_the_previous_output_intact(
    tmp_path, big_export, workers, sig, to, moment
):
    out = tmp_path / "out"
    prepare(REPO / "tests/fixtures/sample_export", out, DataConfig())
    before = snapshot(out)

    def temp() -> list[Path]:
        return [p for p in leftovers(tmp_path, "out") if p.name != "out"]

    with running_prepare(big_export, out, workers) as proc:
        if moment == "temp_folder":
            wait_for(lambda: bool(temp()), "a temporary folder", proc)
        else:
            wait_for(lambda: any(any((t / "parts").glob("*")) for t in temp()), "a part file", proc)
        (os.killpg if to == "group" else os.kill)(proc.pid, getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    by = " by SIGTERM" if sig == "SIGTERM" else ""
    assert proc.returncode == (143 if sig == "SIGTERM" else 130)
    assert err.splitlines() == [f"slackdist prepare: interrupted{by}, nothing written; {out} is as it was"]
    assert snapshot(out) == before
    assert leftovers(tmp_path, "out") == [out]

    def group_gone() -> bool:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        return False

    deadline = time.monotonic() + 30
    while not group_gone():  # no worker outlives it
        assert time.monotonic() < deadline, "a worker process is still running"
        time.sleep(0.01)


def test_ctrl_c_during_code_run_from_a_string_still_exits_130(tmp_path):
    # A Ctrl-C that lands while code from a string runs (a dataclass or namedtuple being defined by a lazy
    # import) made `python -m` end by SIGINT (-2) after our handler had run; it must still exit 130.
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import sys\nimport slackdist.data.workers as w\n\n"
        "def run_channel(job, src, index):\n"
        "    exec('import os, signal\\nos.kill(os.getpid(), signal.SIGINT)\\nwhile True: pass')\n\n"
        "w.run_channel = run_channel\nfrom slackdist.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "interrupted_in_exec", "prepare", str(REPO / "tests/fixtures/sample_export"),
         "--out", str(out), "--workers", "1"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.splitlines() == ["slackdist prepare: interrupted, nothing written"]
    assert leftovers(tmp_path, "out") == []


def test_a_worker_killed_mid_run_is_a_one_line_error_not_a_hang(tmp_path, big_export):
    import psutil

    out = tmp_path / "out"
    with running_prepare(big_export, out, "2") as proc:
        wait_for(lambda: len(psutil.Process(proc.pid).children()) == 2, "two workers", proc)
        psutil.Process(proc.pid).children()[0].kill()  # as the out-of-memory killer would
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert_one_line_error(err, "a worker process stopped unexpectedly")
    assert leftovers(tmp_path, "out") == []
