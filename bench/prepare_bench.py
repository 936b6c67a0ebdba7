"""Benchmark `slackdist prepare` against a plain `json.load` of the same day files.

    nice python bench/prepare_bench.py                      # 1,000,000 messages
    python bench/prepare_bench.py --messages 20000 --json /tmp/b.json

Generates a deterministic synthetic export (not timed): channels with day files, users.json with
``user_profile`` on messages, rich_text ``blocks``, mentions, channel links, links, emoji, entities,
code blocks (with markup inside), reactions, file shares, bots, joins, threads (old and new format)
whose late replies land in later day files, thread_broadcast, and a few planted secrets. Then it
times (a) ``json.load`` of every day file and (b) the full ``prepare`` run in a child process (so
the generator's memory does not count), and reports messages/s, the ratio to the plain load and
the child's peak RSS. Targets: ratio <= 3.5, peak RSS <= 1 GiB at 1M messages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "prepare_bench.json"
TARGET_RATIO = 3.5  # with secret detection on (it was 3 before)
TARGET_RSS = 1 << 30
TIMING_NOTE = (
    "generation not timed (its files are synced to disk first); both read the same files with a warm page "
    "cache (read once before the plain load); plain load: one process; prepare: its own process with its "
    "default workers (one per core)"
)

WORDS = (
    "deploy build test review merge the a to of and we it is for on this that with fix bug release "
    "staging prod db query latency cache api docs meeting tomorrow today ticket sprint cluster node "
    "pod config rollback alert error log metric dashboard feature flag customer issue ok thanks sure "
    "maybe looks good lgtm done waiting blocked ping later lunch café über niño 東京 данные"
).split()
EMOJI = ["tada", "+1", "thinking_face", "rocket", "white_check_mark", "eyes", "fire", "partyparrot", "pray"]


class Generator:
    """A deterministic synthetic export; every random choice comes from one seeded RNG."""

    def __init__(self, seed: int, n_users: int = 300, n_channels: int = 40) -> None:
        self.rng = random.Random(seed)
        self.users = [f"U{i:08d}" for i in range(n_users)]
        self.names = {u: f"Person {i}" for i, u in enumerate(self.users)}
        self.channels = [(f"C{i:08d}", f"channel-{i:02d}") for i in range(n_channels)]

    def words(self, lo: int, hi: int) -> str:
        return " ".join(self.rng.choices(WORDS, k=self.rng.randint(lo, hi)))

    def text(self) -> tuple[str, bool]:
        """(mrkdwn text, has a code block)."""
        r = self.rng.random
        parts = [self.words(3, 25)]
        if r() < 0.25:
            parts.append(f"<@{self.rng.choice(self.users)}>")
        if r() < 0.05:
            cid, name = self.rng.choice(self.channels)
            parts.append(f"<#{cid}|{name}>")
        if r() < 0.12:
            parts.append(
                f"<https://example.com/{self.rng.randint(1, 9999)}|docs> or <https://example.org/x?a=1&amp;b=2>"
            )
        if r() < 0.15:
            parts.append(f":{self.rng.choice(EMOJI)}:")
        if r() < 0.08:
            parts.append("a &lt; b &amp;&amp; c &gt; d")
        if r() < 0.03:
            parts.append("<!here>")
        if r() < 0.005:
            parts.append("token xoxb-1234567890-0987654321-AbCdEfGhIjKlMn and mail jane.doe@example.com")
        code = r() < 0.05
        if code:
            parts.append(
                '```if a &lt; b &amp;&amp; ok:\n    notify("<@U00000001>")  # :tada: <https://x.y|z>\n'
                f"    return {self.rng.randint(0, 99)}```"
            )
        elif r() < 0.1:
            parts.append("`kubectl get pods -n prod`")
        return " ".join(parts), code

    def human(self, ts: float, user: str, text: str) -> dict:
        msg = {
            "client_msg_id": f"{self.rng.getrandbits(64):016x}",
            "type": "message",
            "text": text,
            "user": user,
            "ts": f"{ts:.6f}",
            "team": "T00000001",
            "user_team": "T00000001",
            "source_team": "T00000001",
            "user_profile": {
                "avatar_hash": f"g{self.rng.getrandbits(40):010x}",
                "image_72": f"https://secure.gravatar.com/avatar/{user}.jpg?s=72",
                "first_name": self.names[user].split()[0],
                "real_name": self.names[user],
                "display_name": self.names[user],
                "team": "T00000001",
                "name": self.names[user].lower().replace(" ", "."),
                "is_restricted": False,
                "is_ultra_restricted": False,
            },
        }
        if self.rng.random() < 0.5:
            msg["blocks"] = [
                {
                    "type": "rich_text",
                    "block_id": f"{self.rng.getrandbits(20):05x}",
                    "elements": [
                        {"type": "rich_text_section", "elements": [{"type": "text", "text": text[:200]}]}
                    ],
                }
            ]
        if self.rng.random() < 0.2:
            msg["reactions"] = [
                {"name": self.rng.choice(EMOJI), "users": [user], "count": self.rng.randint(1, 5)}
                for _ in range(self.rng.randint(1, 2))
            ]
        if self.rng.random() < 0.05:
            msg["edited"] = {"user": user, "ts": f"{ts + 30:.6f}"}
        return msg

    def other(self, ts: float) -> dict:
        """A bot message, a join, or a file share."""
        r = self.rng.random()
        user = self.rng.choice(self.users)
        if r < 0.45:
            return {
                "type": "message",
                "subtype": "bot_message",
                "bot_id": "B00000001",
                "username": "ci-bot",
                "text": "",
                "ts": f"{ts:.6f}",
                "attachments": [
                    {"fallback": f"Build #{self.rng.randint(1, 9999)} passed", "text": "all green"}
                ],
            }
        if r < 0.8:
            return {"type": "message", "subtype": "channel_join", "user": user, "ts": f"{ts:.6f}",
                    "text": f"<@{user}> has joined the channel"}  # fmt: skip
        msg = self.human(ts, user, self.words(2, 8))
        msg["subtype"] = "file_share"
        msg["files"] = [{"id": "F1", "name": f"report-{self.rng.randint(1, 999)}.pdf", "mode": "hosted"}]
        return msg

    def channel_messages(self, n: int, start: float) -> list[dict]:
        """n messages of one channel: bursts of chatter, threads (some with late replies), bots."""
        rng = self.rng
        out: list[dict] = []
        t = start
        while len(out) < n:
            t += rng.expovariate(1 / 1800) if rng.random() < 0.9 else rng.uniform(3 * 3600, 40 * 3600)
            r = rng.random()
            if r < 0.12:
                out.append(self.other(t))
                continue
            user = rng.choice(self.users[:60] if rng.random() < 0.8 else self.users)
            text, _ = self.text()
            msg = self.human(t, user, text)
            out.append(msg)
            if r < 0.27:  # a thread parent
                k = rng.randint(1, 8)
                replies = []
                rt = t
                for j in range(k):
                    rt += rng.expovariate(1 / 600)
                    if j == k - 1 and rng.random() < 0.15:
                        rt += rng.uniform(2, 30) * 86400  # a late reply, days later
                    reply = self.human(rt, rng.choice(self.users[:60]), self.text()[0])
                    reply["thread_ts"] = msg["ts"]
                    reply["parent_user_id"] = user
                    if rng.random() < 0.05:
                        reply["subtype"] = "thread_broadcast"
                    replies.append(reply)
                msg["thread_ts"] = msg["ts"]
                if rng.random() < 0.3:  # old export format
                    msg["replies"] = [{"user": x["user"], "ts": x["ts"]} for x in replies]
                else:
                    msg["reply_count"] = k
                    msg["reply_users"] = sorted({x["user"] for x in replies})
                    msg["latest_reply"] = replies[-1]["ts"]
                out.extend(replies)
        return out[:n]

    def write(self, root: Path, n_messages: int) -> dict:
        """Write the export; returns counts."""
        root.mkdir(parents=True, exist_ok=True)
        users = [
            {
                "id": u,
                "name": self.names[u].lower().replace(" ", "."),
                "real_name": self.names[u],
                "profile": {"real_name": self.names[u], "display_name": self.names[u]},
            }  # fmt: skip
            for u in self.users
        ]
        users.append({"id": "UBOT00001", "name": "ci-bot", "is_bot": True, "profile": {"real_name": "CI"}})
        (root / "users.json").write_text(json.dumps(users, indent=1))
        channels = [
            {"id": cid, "name": name, "created": 1500000000, "members": []} for cid, name in self.channels
        ]
        (root / "channels.json").write_text(json.dumps(channels, indent=1))
        per_channel = [n_messages // len(self.channels)] * len(self.channels)
        per_channel[0] += n_messages - sum(per_channel)
        day_files = 0
        for (_, name), n in zip(self.channels, per_channel, strict=True):
            msgs = self.channel_messages(n, 1_600_000_000.0 + self.rng.uniform(0, 86400))
            msgs.sort(key=lambda m: float(m["ts"]))
            days: dict[str, list[dict]] = {}
            for m in msgs:
                day = datetime.fromtimestamp(float(m["ts"]), UTC).strftime("%Y-%m-%d")
                days.setdefault(day, []).append(m)
            folder = root / name
            folder.mkdir()
            for day, items in days.items():
                (folder / f"{day}.json").write_text(json.dumps(items, indent=4, ensure_ascii=False))
            day_files += len(days)
        return {"messages": n_messages, "channels": len(self.channels), "day_files": day_files}


def generate_export(root: Path, n_messages: int, seed: int = 0) -> dict:
    """Write a deterministic synthetic export of ``n_messages`` messages to ``root``."""
    return Generator(seed).write(root, n_messages)


def time_plain_load(root: Path) -> tuple[float, float, int]:
    """(wall, CPU) seconds to json.load every day file, and the message count (page cache warmed first)."""
    files = sorted(p for p in root.glob("*/*.json"))
    for p in files:
        p.read_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for p in files:
        with open(p, encoding="utf-8") as f:
            n += len(json.load(f))
    return time.perf_counter() - t0, time.process_time() - c0, n


_CHILD = """
import json, sys, time
from slackdist.config import DataConfig
from slackdist.data.prepare import prepare
t0 = time.perf_counter()
report = prepare(sys.argv[1], sys.argv[2], DataConfig())
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "totals": report.totals, "quality": report.quality}))
"""


def run_prepare_child(export: Path, out: Path) -> dict:
    """Run prepare() in a child process; returns its timing, totals, CPU time and peak RSS.

    Peak RSS is sampled every 20 ms over the child and its worker processes together (psutil),
    and is at least the largest single process's ru_maxrss.

    Raises:
        RuntimeError: the child failed.
    """
    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(export), str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_bytes"] = max(peak, after.ru_maxrss * 1024)
    result["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def run(n_messages: int, seed: int = 0, workdir: Path | None = None) -> dict:
    """Generate, time both, and return the result row."""
    tmp = Path(tempfile.mkdtemp(prefix="slackdist-bench-", dir=workdir))
    try:
        export = tmp / "export"
        t0 = time.perf_counter()
        gen = generate_export(export, n_messages, seed)
        # Flush the generated files to disk first: otherwise writing back ~1 GiB of dirty pages
        # competes with whatever is timed next (it is part of generating, which is not timed).
        os.sync()
        gen_seconds = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in export.rglob("*.json"))
        load_before = os.getloadavg()[0]
        load_seconds, load_cpu, loaded = time_plain_load(export)
        child = run_prepare_child(export, tmp / "out")
        prep = child["seconds"]
        return {
            "messages": loaded,
            "channels": gen["channels"],
            "day_files": gen["day_files"],
            "export_bytes": size,
            "generate_seconds": round(gen_seconds, 2),
            "plain_load_seconds": round(load_seconds, 3),
            "prepare_seconds": round(prep, 3),
            "prepare_messages_per_second": round(loaded / prep) if prep else None,
            "plain_load_messages_per_second": round(loaded / load_seconds) if load_seconds else None,
            "ratio_to_plain_load": round(prep / load_seconds, 2) if load_seconds else None,
            "plain_load_cpu_seconds": round(load_cpu, 3),
            "prepare_cpu_seconds": round(child["cpu_seconds"], 3),
            "cpu_ratio_to_plain_load": round(child["cpu_seconds"] / load_cpu, 2) if load_cpu else None,
            "workers": os.cpu_count(),
            "peak_rss_mib": round(child["peak_rss_bytes"] / 2**20, 1),
            "records": child["totals"]["records"],
            "coverage": child["totals"]["coverage"],
            "quality": {
                k: child["quality"][k]
                for k in (
                    "conversations_mixing_channels",
                    "turns_with_raw_markup",
                    "turns_with_html_escapes",
                    "code_blocks",
                    "code_blocks_intact",
                    "threads",
                    "threads_kept_whole",
                )
            },
            "targets": {
                "ratio_ok": prep <= TARGET_RATIO * load_seconds,
                "rss_ok": child["peak_rss_bytes"] <= TARGET_RSS,
            },
            "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, Python {platform.python_version()}",
            "load_average": round(load_before, 2),
            "timing": TIMING_NOTE,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_table(row: dict) -> None:
    items = [
        ("messages", f"{row['messages']:,}"),
        ("export size", f"{row['export_bytes'] / 2**20:.0f} MiB in {row['day_files']:,} day files"),
        (
            "plain json.load",
            f"{row['plain_load_seconds']:.2f} s ({row['plain_load_messages_per_second']:,} msg/s)",
        ),
        ("prepare", f"{row['prepare_seconds']:.2f} s ({row['prepare_messages_per_second']:,} msg/s)"),
        ("ratio to plain load", f"{row['ratio_to_plain_load']}x wall (target <= {TARGET_RATIO:g}x)"),
        (
            "CPU time",
            f"prepare {row['prepare_cpu_seconds']:.2f} s vs load {row['plain_load_cpu_seconds']:.2f} s "
            f"({row['cpu_ratio_to_plain_load']}x, all workers)",
        ),  # fmt: skip
        ("peak RSS (prepare)", f"{row['peak_rss_mib']} MiB (target <= 1024 MiB)"),
        ("records", f"{row['records']:,} (coverage {100 * (row['coverage'] or 0):.1f}%)"),
        ("machine", f"{row['machine']}, load average {row['load_average']} before the run"),
        ("timing", row["timing"]),
    ]
    width = max(len(k) for k, _ in items)
    for k, v in items:
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages in the synthetic export")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the result row goes")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the temp export goes (default: $TMPDIR)"
    )
    args = parser.parse_args(argv)
    row = run(args.messages, args.seed, args.workdir)
    print_table(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
