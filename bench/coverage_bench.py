"""How much of a Slack export reaches the written records, measured without trusting report.json.

    python bench/coverage_bench.py                                  # this checkout, shared + synthetic exports
    python bench/coverage_bench.py --code /work/main --code .       # before / after, side by side
    python bench/coverage_bench.py --export path/to/export --messages 5000 --json /tmp/c.json

For each code tree (``--code DIR``: its ``slackdist`` runs with ``PYTHONPATH=DIR``) and each export
(the two shared real exports, unpacked from ``../shared/slack_exports/public_exports.tar.xz``, any
``--export``, and a deterministic synthetic export with threads of 2–40 messages), it runs
``slackdist prepare EXPORT --out DIR`` with the defaults, then reads the export with its own
minimal reader (not slackdist's) and the written ``train/validation/test.jsonl``, and counts:

- **reply-partner coverage**: human messages whose conversation has another person in it (a
  thread with its parent, or a run of channel messages with gaps under 2 hours) that reach a turn;
- **conversations kept whole**: such conversations whose every message reaches a turn in records
  of one conversation (``meta.conversation_id`` up to its window index) that are one record or
  overlapping windows (linked by shared messages);
- **threads kept whole**: the same for Slack threads (a parent and its replies by ``thread_ts``,
  the parent found by its ts whatever fields it was exported with).

A message "reaches a turn" when, in a record of its channel whose ``meta.start``..``meta.end``
spans it, one message's content holds its words in order (at least 80% of its first 40 words;
all of them for 3 words or fewer); words are taken from the raw text without ``<…>`` markup,
``:emoji:`` codes, e-mail addresses and token-like strings, which cleaning and redaction rewrite.
A message without words (an emoji, a bare link) counts when such a record exists; their number
is printed. report.json's own figures are printed beside the measured ones.
"""

from __future__ import annotations

import argparse
import bisect
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "coverage_bench.json"
SHARED_EXPORTS = REPO.parent / "shared" / "slack_exports" / "public_exports.tar.xz"
TARGET_COVERAGE = 0.98
TARGET_WHOLE = 0.97
GAP_HOURS = 2.0  # DataConfig.gap_hours' default: what "a run of channel messages" means here
SPLITS = ("train", "validation", "test")

# ---------------------------------------------------------------- the source export, read on its own

HUMAN_SUBTYPES = {None, "thread_broadcast", "reply_broadcast", "me_message", "file_share"}
_DAY_FILE = re.compile(r"^\d{4}-\d{2}-\d{2}\.json$")
_DM_FOLDER = re.compile(r"^D[A-Z0-9]{8,}$")
_MARKUP = re.compile(r"<[@#!][^<>\n]*>|<(?:https?://|mailto:|ftp://)[^<>\n]*>")  # Slack's, not "a < b > c"
_EMOJI = re.compile(r":[a-z0-9_+'\-]+:")
_EMAIL = re.compile(r"\S+@\S+\.\S+")
_TOKENISH = re.compile(
    r"\S*(?:xox[a-z]-|gh[pousr]_|github_pat_|AKIA|eyJ|sk_live|sk-)\S*|\S*[A-Za-z0-9+/_-]{32,}\S*"
)
_WORD = re.compile(r"\w+")
MAX_WORDS = 40


def words(text: str) -> list[str]:
    """Lower-case words of a text, without what cleaning and redaction rewrite."""
    text = _MARKUP.sub(" ", text).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    text = _TOKENISH.sub(" ", _EMAIL.sub(" ", _EMOJI.sub(" ", text)))
    return [w.lower() for w in _WORD.findall(text)]


@dataclass
class SourceMessage:
    folder: str
    ts: str
    user: str
    words: list[str]
    partnered: bool = False

    @property
    def time(self) -> float:
        return float(self.ts)


@dataclass
class SourceConversation:
    kind: str  # "thread" or "window"
    messages: list[SourceMessage]

    @property
    def people(self) -> int:
        return len({m.user for m in self.messages})


@dataclass
class Source:
    channel_names: dict[str, str]  # folder -> channel name as records name it
    conversations: list[SourceConversation] = field(default_factory=list)

    @property
    def messages(self) -> list[SourceMessage]:
        return [m for c in self.conversations for m in c.messages]


def _text(m: dict) -> str:
    text = m.get("text") if isinstance(m.get("text"), str) else ""
    if text.strip():
        return text
    parts = []
    for block in m.get("blocks") or []:
        for el in block.get("elements") or [] if isinstance(block, dict) else []:
            for inner in el.get("elements") or [] if isinstance(el, dict) else []:
                if isinstance(inner, dict) and isinstance(inner.get("text"), str):
                    parts.append(inner["text"])
    for att in m.get("attachments") or []:
        if isinstance(att, dict):
            parts += [att[k] for k in ("pretext", "title", "text") if isinstance(att.get(k), str)]
    return " ".join(parts)


def _files(m: dict) -> list[str]:
    files = [m["file"]] if isinstance(m.get("file"), dict) else []
    files += [f for f in m.get("files") or [] if isinstance(f, dict)]
    return [
        f.get("name") or f.get("title") or ""
        for f in files
        if f.get("mode") not in ("hidden_by_limit", "tombstone")
    ]


def _load(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def read_source(root: Path, gap_hours: float = GAP_HOURS) -> Source:
    """Public channels of an export folder, as conversations of human messages."""
    if not (root / "channels.json").exists():
        subdirs = [p for p in root.iterdir() if p.is_dir()]
        if len(subdirs) == 1:
            root = subdirs[0]
    users = _load(root / "users.json")
    bots = {u.get("id") for u in users if isinstance(u, dict) and (u.get("is_bot") or u.get("is_app_user"))}
    bots.add("USLACKBOT")
    folders = {
        p.name for p in root.iterdir() if p.is_dir() and any(_DAY_FILE.match(f.name) for f in p.iterdir())
    }
    private = set()
    for meta in ("groups.json", "dms.json", "mpims.json"):
        for c in _load(root / meta):
            if isinstance(c, dict):
                private |= {c.get("name"), c.get("id")}
    names = {}
    for c in _load(root / "channels.json"):
        if isinstance(c, dict) and c.get("name") in folders and not c.get("is_private"):
            names[c["name"]] = c["name"]
    for folder in folders - set(names) - private:
        if not _DM_FOLDER.match(folder):
            names[folder] = folder
    source = Source(channel_names=names)
    for folder in sorted(names):
        source.conversations += _channel_conversations(root / folder, folder, bots, gap_hours)
    for conv in source.conversations:
        if conv.people >= 2:
            for m in conv.messages:
                m.partnered = True
    return source


def _channel_conversations(path: Path, folder: str, bots: set, gap_hours: float) -> list[SourceConversation]:
    human: dict[str, tuple[SourceMessage, str | None]] = {}
    for day in sorted(p for p in path.iterdir() if _DAY_FILE.match(p.name)):
        for m in _load(day):
            if not isinstance(m, dict) or m.get("type", "message") != "message":
                continue
            try:
                ts = str(m["ts"])
                float(ts)
            except (KeyError, ValueError):
                continue
            if m.get("subtype") not in HUMAN_SUBTYPES or m.get("bot_id") or m.get("bot_profile"):
                continue
            user = m.get("user") if isinstance(m.get("user"), str) else None
            if user is None or user in bots:
                continue
            text, files = _text(m), _files(m)
            if not text.strip() and not files:
                continue
            thread_ts = m.get("thread_ts") if isinstance(m.get("thread_ts"), str) else None
            # File names only when there is no text: cleaning may move a file's name into the text.
            ws = words(text) or words(" ".join(files))
            human.setdefault(ts, (SourceMessage(folder, ts, user, ws), thread_ts))
    threads: dict[str, list[SourceMessage]] = defaultdict(list)
    for ts, (msg, thread_ts) in human.items():
        if thread_ts is not None and thread_ts != ts:
            threads[thread_ts].append(msg)
    for ts, (msg, thread_ts) in human.items():
        if ts in threads or thread_ts == ts:  # a parent, whatever fields it was exported with
            threads[ts].append(msg)
    in_threads = {m.ts for ms in threads.values() for m in ms}
    out = [SourceConversation("thread", sorted(ms, key=lambda m: m.time)) for ms in threads.values()]
    loose = sorted((m for m, _ in human.values() if m.ts not in in_threads), key=lambda m: m.time)
    run: list[SourceMessage] = []
    for m in loose:
        if run and m.time - run[-1].time >= gap_hours * 3600:
            out.append(SourceConversation("window", run))
            run = []
        run.append(m)
    if run:
        out.append(SourceConversation("window", run))
    return out


# ---------------------------------------------------------------- the written records


@dataclass
class WrittenMessage:
    """One user/assistant message of a record, indexed for ordered word search."""

    record: int
    positions: dict[str, list[int]]

    @classmethod
    def of(cls, record: int, content: str) -> WrittenMessage:
        positions: dict[str, list[int]] = defaultdict(list)
        for i, w in enumerate(words(content)):
            positions[w].append(i)
        return cls(record, positions)

    def holds(self, ws: list[str]) -> bool:
        need = len(ws) if len(ws) <= 3 else math.ceil(0.8 * len(ws))
        at, found = -1, 0
        for w in ws:
            pos = self.positions.get(w)
            if not pos:
                continue
            k = bisect.bisect_right(pos, at)
            if k < len(pos):
                at, found = pos[k], found + 1
        return found >= need


@dataclass
class Written:
    groups: list[str]  # record -> its conversation id without the window index (one per conversation)
    by_day: dict[tuple[str, int], list[int]]  # (channel, day) -> records whose span touches that day
    spans: list[tuple[float, float]]
    messages: dict[int, list[WrittenMessage]]


_WINDOW_INDEX = re.compile(r"[.-]\d+$")  # "<hex>-<window>" or "<hex>-<part>.<window>"


def read_records(out: Path) -> Written:
    groups, spans, messages = [], [], {}
    by_day: dict[tuple[str, int], list[int]] = defaultdict(list)
    for split in SPLITS:
        path = out / f"{split}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            meta, i = rec["meta"], len(groups)
            groups.append(_WINDOW_INDEX.sub("", meta["conversation_id"]))
            spans.append((meta["start"] - 1e-3, meta["end"] + 1e-3))
            messages[i] = [WrittenMessage.of(i, m["content"]) for m in rec["messages"][1:]]
            for day in range(int(meta["start"] // 86400), int(meta["end"] // 86400) + 1):
                by_day[(meta["channel"], day)].append(i)
    return Written(groups, by_day, spans, messages)


# ---------------------------------------------------------------- measuring


def where_found(source: Source, written: Written) -> tuple[dict[int, set[int]], int]:
    """id(message) -> records holding it; and how many messages had no words (span only)."""
    found: dict[int, set[int]] = {}
    wordless = 0
    for m in source.messages:
        channel = source.channel_names[m.folder]
        candidates = [
            r
            for r in written.by_day.get((channel, int(m.time // 86400)), [])
            if written.spans[r][0] <= m.time <= written.spans[r][1]
        ]
        ws = m.words[:MAX_WORDS]
        if not ws:
            wordless += 1
            found[id(m)] = set(candidates)
            continue
        found[id(m)] = {r for r in candidates if any(w.holds(ws) for w in written.messages[r])}
    return found, wordless


def whole(conv: SourceConversation, found: dict[int, set[int]], groups: list[str]) -> bool:
    """Every message in records of one conversation, linked into one chain by shared messages."""
    holders = [found[id(m)] for m in conv.messages]
    if not all(holders):
        return False
    shared = set.intersection(*({groups[r] for r in h} for h in holders))
    for group in shared:
        sets = [{r for r in h if groups[r] == group} for h in holders]
        linked = set(sets[0])
        grew = True
        while grew:
            grew = False
            for s in sets:
                if s & linked and not s <= linked:
                    linked |= s
                    grew = True
        if all(s & linked for s in sets):
            return True
    return False


def measure(export: Path, out: Path) -> dict:
    source = read_source(export)
    written = read_records(out)
    found, wordless = where_found(source, written)
    partnered = [m for m in source.messages if m.partnered]
    multi = [c for c in source.conversations if c.people >= 2]
    threads = [c for c in multi if c.kind == "thread"]
    whole_convs = sum(whole(c, found, written.groups) for c in multi)
    whole_threads = sum(whole(c, found, written.groups) for c in threads)
    covered = sum(1 for m in partnered if found[id(m)])
    return {
        "human_messages": len(source.messages),
        "reply_partner_messages": len(partnered),
        "reply_partner_covered": covered,
        "reply_partner_coverage": _ratio(covered, len(partnered)),
        "conversations_2_people": len(multi),
        "conversations_whole": whole_convs,
        "conversations_whole_ratio": _ratio(whole_convs, len(multi)),
        "threads_2_people": len(threads),
        "threads_whole": whole_threads,
        "threads_whole_ratio": _ratio(whole_threads, len(threads)),
        "records": len(written.groups),
        "wordless_messages": wordless,
    }


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def report_claims(out: Path) -> dict:
    """What report.json says about the same figures (keys of either version of the report)."""
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    q, t = report["quality"], report["totals"]
    return {
        # Older reports had only the coverage of all human messages.
        "coverage": q.get("reply_partner_coverage"),
        "human_coverage": t.get("coverage"),
        "conversations_whole": q.get("conversations_kept_whole_ratio"),
        "threads_whole": q.get("threads_kept_whole_ratio"),
        "replies_with_parent": q.get("replies_placed_with_parent_ratio"),
    }


# ---------------------------------------------------------------- a synthetic export with real threads


def _prepare_bench():
    spec = importlib.util.spec_from_file_location(
        "prepare_bench", Path(__file__).with_name("prepare_bench.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("prepare_bench", module)
    spec.loader.exec_module(module)
    return module


class ThreadedGenerator(_prepare_bench().Generator):
    """prepare_bench's generator, with threads of 2–40 messages among 2–5 people.

    Of the threads: 20% have a parent exported without thread fields (no ``thread_ts``,
    ``reply_count`` or ``replies``), 2% a parent longer than the default token budget, 10% a reply
    days later (in a later day file); old and new thread formats and ``thread_broadcast`` replies
    as in prepare_bench. Between threads: runs of channel chatter among 1–4 people, bots, joins.
    """

    def __init__(self, seed: int) -> None:
        super().__init__(seed, n_users=40, n_channels=6)

    def long_text(self) -> str:
        code = "```\n" + "\n".join(f"step_{i} = run({i})" for i in range(40)) + "\n```"
        return " ".join(self.words(40, 60) for _ in range(self.rng.randint(50, 80))) + "\n" + code

    def thread(self, t: float) -> tuple[list[dict], float]:
        rng = self.rng
        people = rng.sample(self.users, rng.randint(2, 5))
        n = rng.randint(2, 40)
        parent = self.human(t, people[0], self.long_text() if rng.random() < 0.02 else self.text()[0])
        replies, rt, who = [], t, people[0]
        for j in range(n - 1):
            rt += rng.expovariate(1 / 300)
            if j == n - 2 and rng.random() < 0.1:
                rt += rng.uniform(2, 20) * 86400
            if rng.random() < 0.8:
                who = rng.choice([p for p in people if p != who] or people)
            reply = self.human(rt, who, self.text()[0])
            reply["thread_ts"] = parent["ts"]
            if rng.random() < 0.03:
                reply["subtype"] = "thread_broadcast"
            replies.append(reply)
        r = rng.random()
        if r < 0.2:
            pass  # exported without thread fields
        elif r < 0.4:
            parent["thread_ts"] = parent["ts"]
            parent["replies"] = [{"user": x["user"], "ts": x["ts"]} for x in replies]
        else:
            parent["thread_ts"] = parent["ts"]
            parent["reply_count"] = len(replies)
            parent["reply_users"] = sorted({x["user"] for x in replies})
        return [parent, *replies], t

    def channel_messages(self, n: int, start: float) -> list[dict]:
        rng = self.rng
        out: list[dict] = []
        t = start
        while len(out) < n:
            t += rng.uniform(3 * 3600, 30 * 3600)  # a gap: a new conversation
            r = rng.random()
            if r < 0.1:
                out.append(self.other(t))
            elif r < 0.55:
                msgs, t = self.thread(t)
                out += msgs
                for _ in range(rng.randint(0, 3)):  # chatter while the thread runs
                    t += rng.expovariate(1 / 900)
                    out.append(self.human(t, rng.choice(self.users), self.text()[0]))
            else:
                people = rng.sample(self.users, rng.randint(1, 4))
                for _ in range(rng.randint(1, 12)):
                    t += rng.expovariate(1 / 600)
                    out.append(self.human(t, rng.choice(people), self.text()[0]))
        return out


def generate_threaded_export(root: Path, n_messages: int, seed: int = 0) -> dict:
    """Write the deterministic synthetic export with threads of 2–40 messages; returns counts."""
    return ThreadedGenerator(seed).write(root, n_messages)


# ---------------------------------------------------------------- running prepare


def run_prepare(code: Path, export: Path, out: Path) -> None:
    """``slackdist prepare EXPORT --out OUT`` with the defaults, from the code tree ``code``.

    Raises:
        RuntimeError: prepare failed.
    """
    env = {**os.environ, "PYTHONPATH": str(code), "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "slackdist", "prepare", str(export), "--out", str(out)],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"prepare ({code}) failed on {export}:\n{proc.stderr[-2000:]}")


def _commit(code: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True)
    return proc.stdout.strip() or "?"


def run(codes: list[Path], exports: dict[str, Path], workdir: Path) -> list[dict]:
    rows = []
    for name, export in exports.items():
        for code in codes:
            out = workdir / f"out-{len(rows)}"
            run_prepare(code, export, out)
            rows.append(
                {
                    "export": name,
                    "code": str(code),
                    "commit": _commit(code),
                    **measure(export, out),
                    "report_says": report_claims(out),
                }
            )
            shutil.rmtree(out, ignore_errors=True)
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def print_table(rows: list[dict]) -> None:
    head = (
        "export",
        "code",
        "partner msgs",
        "reach a turn",
        "(report says)",
        "convs 2+",
        "whole",
        "(report)",
        "threads 2+",
        "whole",
        "(report)",
    )
    table = [head]
    for r in rows:
        says = r["report_says"]
        table.append(
            (
                r["export"],
                f"{Path(r['code']).name} {r['commit']}",
                str(r["reply_partner_messages"]),
                _pct(r["reply_partner_coverage"]),
                _pct(says["coverage"]),
                str(r["conversations_2_people"]),
                _pct(r["conversations_whole_ratio"]),
                _pct(says["conversations_whole"]),
                str(r["threads_2_people"]),
                _pct(r["threads_whole_ratio"]),
                _pct(says["threads_whole"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(
        f"targets: reach a turn >= {TARGET_COVERAGE:.0%}, conversations and threads whole >= {TARGET_WHOLE:.0%}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--code", type=Path, action="append", help="code tree to run (repeat; default: this checkout)"
    )
    parser.add_argument(
        "--export", type=Path, action="append", default=[], help="another export folder to measure"
    )
    parser.add_argument(
        "--messages", type=int, default=20_000, help="messages in the synthetic export (0: none)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-shared", action="store_true", help="leave out the two shared real exports")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the rows go")
    args = parser.parse_args(argv)
    codes = [c.resolve() for c in args.code or [REPO]]
    work = Path(tempfile.mkdtemp(prefix="slackdist-coverage-"))
    try:
        exports: dict[str, Path] = {}
        if not args.no_shared and SHARED_EXPORTS.is_file():
            with tarfile.open(SHARED_EXPORTS) as tar:
                tar.extractall(work / "shared", filter="data")
            exports |= {p.name: p for p in sorted((work / "shared").iterdir()) if p.is_dir()}
        exports |= {p.name: p for p in args.export}
        if args.messages:
            synthetic = work / f"synthetic_threads_{args.messages}"
            generate_threaded_export(synthetic, args.messages, args.seed)
            exports[synthetic.name] = synthetic
        rows = run(codes, exports, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "rows": rows,
        "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, Python {platform.python_version()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
