"""Leaving a person out (`prepare --exclude-users`): what it costs everyone else, and in time.

    python bench/consent_bench.py                          # sample + both shared exports + a synthetic one
    python bench/consent_bench.py --messages 200000 --json /tmp/consent.json

For each export, `prepare` runs without the flag and with ``--exclude-users X``, X being the person
with the most messages in the records whose leaving still leaves a conversation (one process,
``--workers 1``, so CPU time is comparable). From the two runs' provenance.jsonl (which message,
by whom, in which record) it counts, for everyone but X:

- **others**: their human messages (report.json's ``human_messages`` with the flag; it must equal the
  run without the flag minus X's human messages);
- **reached without / with**: how many of them reach a turn in each run, and the coverage;
- **lost**: reached without the flag, not with it. Each one is checked to have been in a
  conversation X spoke in: a conversation whose only other speaker was X is one person talking, which
  the rules do not keep. **gained** (reached only with the flag) must be 0.

It also looks for X's user id, names and e-mail (whole words, any case) in every file written with
the flag (**traces**, must be 0), and times `prepare` both ways; on the synthetic export also with
``--only-users`` naming half the people (the other half's names are all scrubbed from the text).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slackdist.config import DataConfig  # noqa: E402
from slackdist.data.prepare import prepare  # noqa: E402
from slackdist.data.provenance import PROVENANCE_FILE, iter_entries  # noqa: E402
from slackdist.data.report import window_group  # noqa: E402
from slackdist.errors import SlackdistError  # noqa: E402
from slackdist.slack.export import open_export  # noqa: E402
from slackdist.slack.metadata import load_users  # noqa: E402

DEFAULT_JSON = REPO / "bench" / "results" / "consent_bench.json"
SHARED_EXPORTS = REPO.parent / "shared" / "slack_exports" / "public_exports.tar.xz"
SAMPLE = REPO / "tests" / "fixtures" / "sample_export"


def _run(export: Path, out: Path, **kwargs) -> tuple[dict, list[dict], float]:
    started = time.process_time()
    report = prepare(export, out, DataConfig(workers=1, **kwargs))
    return report.data, list(iter_entries(out / PROVENANCE_FILE)), time.process_time() - started


def reached(entries: list[dict]) -> dict[tuple[str, str], str | None]:
    return {(c, ts): writer for e in entries for c, ts, writer in e["messages"]}


def _forms(export: Path, uid: str) -> list[str]:
    with open_export(export) as src:
        user = load_users(src)[uid]
    return [f for f in (user.id, user.username, user.display_name, user.real_name, user.email) if f]


@dataclass
class Runs:
    """`prepare` of one export without and with ``--exclude-users gone``: reports, provenance, CPU seconds."""

    gone: str
    before: dict
    entries_before: list[dict]
    cpu_before: float
    after: dict
    entries_after: list[dict]
    cpu_after: float


def runs_without_busiest(export: Path, work: Path) -> Runs:
    """Prepare without the flag, then without the person with the most messages in the records whose
    leaving still leaves a conversation (in sev_testarchive_2016 the busiest is in every one).

    Raises:
        RuntimeError: every person is in every conversation.
    """
    before, entries_before, cpu_before = _run(export, work / "all")
    writers: dict[str, int] = defaultdict(int)
    for writer in reached(entries_before).values():
        if writer:
            writers[writer] += 1
    for gone in sorted(writers, key=lambda w: (-writers[w], w)):
        try:
            after, entries_after, cpu_after = _run(export, work / "without", exclude_users=[gone])
        except SlackdistError:
            continue
        return Runs(gone, before, entries_before, cpu_before, after, entries_after, cpu_after)
    raise RuntimeError(f"{export}: every person is in every conversation")


def lost_and_with_them(runs: Runs) -> tuple[set, set, set]:
    """(others' messages reached without the flag, lost with it, lost ones whose conversation had them)."""
    gone = runs.gone
    others_reached = {m for m, w in reached(runs.entries_before).items() if w != gone}
    groups_with_them = {window_group(e["record"]) for e in runs.entries_before if gone in e["users"]}
    group_of: dict[tuple[str, str], set[str]] = defaultdict(set)
    for e in runs.entries_before:
        for c, ts, _ in e["messages"]:
            group_of[(c, ts)].add(window_group(e["record"]))
    lost = others_reached - set(reached(runs.entries_after))
    return others_reached, lost, {m for m in lost if group_of[m] & groups_with_them}


def measure(name: str, export: Path, work: Path, *, only_half: bool = False) -> dict:
    """The figures of one export (module docstring)."""
    runs = runs_without_busiest(export, work)
    gone, before, after = runs.gone, runs.before, runs.after
    others_reached, lost, with_them = lost_and_with_them(runs)
    reached_after = reached(runs.entries_after)
    text = "\n".join(
        p.read_text(encoding="utf-8") for p in sorted((work / "without").iterdir()) if p.suffix != ".png"
    )
    traces = sum(bool(re.search(rf"(?<!\w){re.escape(f)}(?!\w)", text, re.I)) for f in _forms(export, gone))
    others = after["totals"]["human_messages"]
    row = {
        "export": name,
        "human_messages": before["totals"]["human_messages"],
        "their_human_messages": before["totals"]["human_messages"] - others,
        "their_messages_left_out": after["dropped"].get("excluded_user", 0),
        "others": others,
        "others_reached_without_flag": len(others_reached),
        "others_reached_with_flag": len(reached_after),
        "coverage_without_flag_all": before["totals"]["coverage"],
        "coverage_without_flag_others": round(len(others_reached) / others, 4) if others else None,
        "coverage_with_flag": after["totals"]["coverage"],
        "lost": len(lost),
        "lost_without_them_in_the_conversation": len(lost - with_them),
        "gained": len(set(reached_after) - others_reached),
        "traces": traces,
        "prepare_cpu_s_without": round(runs.cpu_before, 3),
        "prepare_cpu_s_with": round(runs.cpu_after, 3),
    }
    if only_half:
        with open_export(export) as src:
            people = sorted(u.id for u in load_users(src).values() if not u.is_bot)
        _, _, cpu_only = _run(export, work / "only", only_users=people[::2])
        row["prepare_cpu_s_only_half"] = round(cpu_only, 3)
        row["only_users_named"] = len(people[::2])
    return row


def print_table(rows: list[dict]) -> None:
    print("| export | human messages (theirs) | others' coverage without → with | lost (all with them) | gained "
          "| traces | prepare CPU s without / with |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cov = f"{100 * r['coverage_without_flag_others']:.1f}% → {100 * r['coverage_with_flag']:.1f}%"
        lost = f"{r['lost']} ({r['lost'] - r['lost_without_them_in_the_conversation']})"
        cpu = f"{r['prepare_cpu_s_without']} / {r['prepare_cpu_s_with']}"
        if "prepare_cpu_s_only_half" in r:
            cpu += f" (only half: {r['prepare_cpu_s_only_half']})"
        print(f"| {r['export']} | {r['human_messages']} ({r['their_human_messages']}) | {cov} | {lost} | "
              f"{r['gained']} | {r['traces']} | {cpu} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=30000, help="size of the synthetic export (0: none)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        exports = {"sample_export": SAMPLE}
        if SHARED_EXPORTS.is_file():
            with tarfile.open(SHARED_EXPORTS) as tar:
                tar.extractall(work / "shared", filter="data")
            exports |= {p.name: p for p in sorted((work / "shared").iterdir()) if p.is_dir()}
        for name, export in exports.items():
            rows.append(measure(name, export, work / name))
        if args.messages:
            spec = importlib.util.spec_from_file_location(
                "prepare_bench", REPO / "bench" / "prepare_bench.py"
            )
            bench = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(bench)
            synthetic = work / "synthetic"
            bench.generate_export(synthetic, args.messages)
            rows.append(
                measure(f"synthetic, {args.messages:,} messages", synthetic, work / "s", only_half=True)
            )
    print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
            "python": platform.python_version()}  # fmt: skip
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if all(r["traces"] == 0 and r["gained"] == 0 and r["lost_without_them_in_the_conversation"] == 0
                    for r in rows) else 1  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
