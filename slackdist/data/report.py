"""What `prepare` did: counts per drop reason, channel and redaction kind, warnings, quality figures.

The quality figures are the ones DESIGN.md "Quality figures `prepare` reports" lists; each is
measured on what is actually written (the records), not assumed from the code. Examples in the
report are built from the records, which hold only cleaned, redacted text.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slackdist.data.conversations import Conversation, WindowPlan
from slackdist.data.records import SPLIT_NAMES, BuiltRecord, validate_record
from slackdist.slack.markup import find_raw_markup

PLOTS = {"turns": "turns_per_conversation.png", "tokens": "tokens_per_conversation.png"}
_TURN_BINS = [2, 3, 4, 6, 8, 12, 16, 24, 32, 41, 64, 128]
_TOKEN_BINS = [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]


@dataclass
class ChannelStats:
    """Counts for one channel."""

    kind: str
    messages: int = 0
    human_messages: int = 0
    covered_messages: int = 0
    conversations: int = 0
    records: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "messages": self.messages,
            "human_messages": self.human_messages,
            "covered_messages": self.covered_messages,
            "coverage": _ratio(self.covered_messages, self.human_messages),
            "conversations": self.conversations,
            "records": self.records,
            "dropped": dict(self.dropped.most_common()),
        }


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


@dataclass
class Quality:
    """The DESIGN quality figures, counted over written records."""

    threads: int = 0
    threads_kept_whole: int = 0
    threads_reopened: int = 0
    replies: int = 0
    replies_with_parent_present: int = 0
    replies_placed_with_parent: int = 0
    conversations_mixing_channels: int = 0
    dm_turns: int = 0
    private_turns: int = 0
    turns: int = 0
    turns_with_raw_markup: int = 0
    turns_with_html_escapes: int = 0
    code_blocks: int = 0
    code_blocks_intact: int = 0
    records: int = 0
    records_ending_on_assistant: int = 0
    records_invalid: int = 0
    records_one_person_both_roles: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["threads_kept_whole_ratio"] = _ratio(self.threads_kept_whole, self.threads)
        d["replies_placed_with_parent_ratio"] = _ratio(
            self.replies_placed_with_parent, self.replies_with_parent_present
        )
        d["code_blocks_intact_ratio"] = _ratio(self.code_blocks_intact, self.code_blocks)
        d["records_ending_on_assistant_ratio"] = _ratio(self.records_ending_on_assistant, self.records)
        return d


class ReportBuilder:
    """Collects counts while `prepare` streams; :meth:`finish` returns the report dict."""

    def __init__(self, *, export: str, workspace: str, persona_mode: bool, preview: int) -> None:
        self.export = export
        self.workspace = workspace
        self.persona_mode = persona_mode
        self.preview_n = preview
        self.channels: dict[str, ChannelStats] = {}
        self.dropped: Counter = Counter()
        self.redactions: Counter = Counter()
        self.quality = Quality()
        self.splits: Counter = Counter()
        self.turn_counts: list[int] = []
        self.token_counts: list[int] = []
        self.preview: list[dict[str, Any]] = []
        self.day_files = 0

    def merge(self, other: ReportBuilder) -> None:
        """Add the counts of another builder (one channel processed elsewhere), in channel order."""
        for name, theirs in other.channels.items():
            mine = self.channel(name, theirs.kind)
            for key in ("messages", "human_messages", "covered_messages", "conversations", "records"):
                setattr(mine, key, getattr(mine, key) + getattr(theirs, key))
            mine.dropped.update(theirs.dropped)
        self.dropped.update(other.dropped)
        self.redactions.update(other.redactions)
        for key, value in vars(other.quality).items():
            setattr(self.quality, key, getattr(self.quality, key) + value)
        self.turn_counts += other.turn_counts
        self.token_counts += other.token_counts
        self.preview += other.preview[: max(0, self.preview_n - len(self.preview))]
        self.day_files += other.day_files

    def channel(self, name: str, kind: str) -> ChannelStats:
        if name not in self.channels:
            self.channels[name] = ChannelStats(kind=kind)
        return self.channels[name]

    def message(self, stats: ChannelStats, reason: str | None) -> None:
        """One message read: ``reason`` is why it is not a human message (bot, join, empty...), or None."""
        stats.messages += 1
        if reason is None:
            stats.human_messages += 1
        else:
            stats.dropped[reason] += 1
            self.dropped[reason] += 1

    def conversation(
        self, conv: Conversation, plan: WindowPlan, built: list[tuple[Conversation, BuiltRecord]]
    ) -> None:
        """Account for one whole conversation: which messages reached a record, and why the rest did not."""
        stats = self.channel(conv.channel.name, conv.channel.kind)
        stats.conversations += 1
        used: set[int] = set()
        window_reason: dict[int, str] = {}
        in_record_window: set[int] = set()
        for window in plan.too_short:
            for t in window.turns:
                window_reason.setdefault(t.index, "conversation_too_short")
        for window, b in built:
            idx = {t.index for t in window.turns}
            if b.record is None:
                for i in idx:
                    window_reason.setdefault(i, b.reason or "no_record")
            else:
                used.update(b.used_turns)
                in_record_window.update(idx)
        over = set(plan.over_budget)
        role_reason = "persona_no_answer" if self.persona_mode else "trailing_user_turn"
        for t in conv.turns:
            if t.index in used:
                stats.covered_messages += t.n_messages
                continue
            if t.index in over:
                reason = "over_token_budget"
            elif t.index in in_record_window:
                reason = role_reason
            else:
                reason = window_reason.get(t.index, "conversation_too_short")
            stats.dropped[reason] += t.n_messages
            self.dropped[reason] += t.n_messages
        if conv.thread_ts is not None:
            q = self.quality
            if conv.n_messages >= 2:
                q.threads += 1
                if (
                    not plan.too_short
                    and not plan.over_budget
                    and all(b.record is not None for _, b in built)
                ):
                    q.threads_kept_whole += 1
            q.replies += conv.n_replies
            if conv.parent_present:
                q.replies_with_parent_present += conv.n_replies
                # The grouper keys replies by their thread_ts, the parent's ts in the same channel:
                # a reply whose parent is in the export cannot land anywhere else.
                q.replies_placed_with_parent += conv.n_replies

    def record(self, window: Conversation, built: BuiltRecord) -> None:
        """Check one written record against the quality rules."""
        assert built.record is not None
        rec = built.record
        q = self.quality
        stats = self.channel(window.channel.name, window.channel.kind)
        stats.records += 1
        q.records += 1
        msgs = rec["messages"]
        if msgs[-1]["role"] == "assistant":
            q.records_ending_on_assistant += 1
        if validate_record(rec):
            q.records_invalid += 1
        turns = built.turns
        own = frozenset((window.channel.id,))
        if any(t.channel_ids != own for t in turns):
            q.conversations_mixing_channels += 1
        if window.channel.kind in ("dm", "mpim"):
            q.dm_turns += len(msgs) - 1
        elif window.channel.kind == "private":
            q.private_turns += len(msgs) - 1
        q.turns += len(msgs) - 1
        for m in msgs[1:]:
            found = find_raw_markup(m["content"])
            if found:
                if any(not f.startswith("&") for f in found):
                    q.turns_with_raw_markup += 1
                if any(f.startswith("&") for f in found):
                    q.turns_with_html_escapes += 1
        if any(t.code for t in turns):
            body = "\n".join(m["content"] for m in msgs[1:])
            for t in turns:
                for block in t.code:
                    q.code_blocks += 1
                    q.code_blocks_intact += block in body
        if not self.persona_mode:
            # Turns alternate user, assistant, ...: a person on both roles speaks at an even and an odd place.
            users = {t.speaker_key for t in turns[0::2]}
            if not users.isdisjoint(t.speaker_key for t in turns[1::2]):
                q.records_one_person_both_roles += 1
        self.turn_counts.append(len(msgs) - 1)
        self.token_counts.append(built.tokens)
        if len(self.preview) < self.preview_n:
            self.preview.append(rec)

    def finish(
        self, *, warnings: dict[str, Any], config: dict[str, Any], output: str | None, seconds: float
    ) -> dict[str, Any]:
        """The report as a JSON-able dict."""
        human = sum(s.human_messages for s in self.channels.values())
        covered = sum(s.covered_messages for s in self.channels.values())
        return {
            "export": self.export,
            "workspace": self.workspace,
            "output": output,
            "totals": {
                "channels": len(self.channels),
                "day_files": self.day_files,
                "messages": sum(s.messages for s in self.channels.values()),
                "human_messages": human,
                "covered_messages": covered,
                "coverage": _ratio(covered, human),
                "conversations": sum(s.conversations for s in self.channels.values()),
                "records": self.quality.records,
                "splits": {name: self.splits.get(name, 0) for name in SPLIT_NAMES},
                "turns": sum(self.turn_counts),
                "tokens": sum(self.token_counts),
                "seconds": round(seconds, 3),
            },
            "dropped": dict(self.dropped.most_common()),
            "redactions": dict(self.redactions.most_common()),
            "warnings": warnings,
            "quality": self.quality.as_dict(),
            "channels": {name: s.as_dict() for name, s in sorted(self.channels.items())},
            "histograms": {
                "turns": histogram(self.turn_counts, _TURN_BINS),
                "tokens": histogram(self.token_counts, _TOKEN_BINS),
            },
            "plots": list(PLOTS.values()),
            "preview": self.preview,
            "config": config,
        }


def histogram(values: Iterable[int], edges: list[int]) -> dict[str, int]:
    """Counts per bin ``[a, b)``, labelled ``"a-b"`` (last bin ``"a+"``)."""
    labels = [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:], strict=False)] + [f"{edges[-1]}+"]
    # Bin of v: the last edge <= v (values below the first edge count in the first bin). One bisect
    # per distinct value: there is one value per record.
    counts = Counter(values)
    per_bin = [0] * len(labels)
    for v, n in counts.items():
        per_bin[max(0, bisect.bisect_right(edges, v) - 1)] += n
    return dict(zip(labels, per_bin, strict=True))


def import_plotting() -> Any:
    """``matplotlib.pyplot`` with the Agg backend (imported on first use: it takes a while)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(turns: list[int], tokens: list[int], out_dir: Path) -> list[Path]:
    """PNG histograms of turns and tokens per conversation (matplotlib, Agg backend)."""
    import numpy as np

    plt = import_plotting()

    paths = []
    for key, values, xlabel in (
        ("turns", turns, "turns per conversation"),
        ("tokens", tokens, "tokens per conversation"),
    ):
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        # An array, not the list: hist() converts a long list element by element (seconds at 1M messages).
        data = np.asarray(values or [0])
        ax.hist(data, bins=min(40, max(1, len(set(values)))) if values else 1, color="#4a7ab5")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("conversations")
        ax.set_title(f"{xlabel} (n={len(values)})")
        fig.tight_layout()
        path = out_dir / PLOTS[key]
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- markdown


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: totals, quality figures, drops, redactions, warnings, channels, plots and examples."""
    t, q = report["totals"], report["quality"]
    lines = [
        f"# slackdist prepare report: {report['export']}",
        "",
        f"Workspace `{report['workspace']}`; {t['channels']} channels, {t['day_files']} day files, "
        f"{t['messages']} messages read in {t['seconds']} s.",
        "",
        "## Totals",
        "",
        "| | |",
        "|---|---|",
        f"| human messages | {t['human_messages']} |",
        f"| reached a record (coverage) | {t['covered_messages']} ({_pct(t['coverage'])}) |",
        f"| conversations | {t['conversations']} |",
        f"| records | {t['records']} (train {t['splits']['train']}, validation {t['splits']['validation']}, "
        f"test {t['splits']['test']}) |",
        f"| turns / tokens | {t['turns']} / {t['tokens']} |",
        "",
        "## Quality",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| coverage of human messages | {_pct(t['coverage'])} | |",
        f"| threads kept whole | {q['threads_kept_whole']}/{q['threads']} ({_pct(q['threads_kept_whole_ratio'])}) | |",
        f"| replies placed with their parent | {q['replies_placed_with_parent']}/{q['replies_with_parent_present']} "
        f"({_pct(q['replies_placed_with_parent_ratio'])}) | 100% |",
        f"| conversations mixing channels | {q['conversations_mixing_channels']} | 0 |",
        f"| DM / private-channel turns | {q['dm_turns']} / {q['private_turns']} | 0 unless opted in |",
        f"| turns with raw markup outside code | {q['turns_with_raw_markup']} | 0 |",
        f"| turns with HTML escapes outside code | {q['turns_with_html_escapes']} | 0 |",
        f"| code blocks intact | {q['code_blocks_intact']}/{q['code_blocks']} ({_pct(q['code_blocks_intact_ratio'])}) "
        "| 100% |",
        f"| records ending on an assistant turn | {q['records_ending_on_assistant']}/{q['records']} | all |",
        f"| records with a bad shape | {q['records_invalid']} | 0 |",
        f"| records with one person on both roles | {q['records_one_person_both_roles']} | (alternate mode, 3+ people) |",
        "",
    ]
    lines += _table("Dropped messages", "reason", report["dropped"])
    lines += _table("Redactions", "kind", report["redactions"])
    w = report["warnings"]
    lines += _table(f"Warnings ({w.get('count', 0)})", "kind", w.get("by_kind", {}))
    for example in w.get("examples", []):
        lines.append(f"- {example}")
    if w.get("examples"):
        lines.append("")
    lines += [
        "## Channels",
        "",
        "| channel | kind | messages | human | coverage | conversations | records |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in report["channels"].items():
        lines.append(
            f"| #{name} | {c['kind']} | {c['messages']} | {c['human_messages']} | {_pct(c['coverage'])} "
            f"| {c['conversations']} | {c['records']} |"
        )
    lines += ["", "## Histograms", ""]
    for key in ("turns", "tokens"):
        lines.append(f"![{key}]({PLOTS[key]})")
        lines.append("")
        lines += [f"| {key} | records |", "|---|---|"]
        lines += [f"| {label} | {n} |" for label, n in report["histograms"][key].items() if n]
        lines.append("")
    if report["preview"]:
        lines += ["## Examples", ""]
        for i, rec in enumerate(report["preview"], 1):
            meta = rec["meta"]
            where = f"thread {meta['thread_ts']}" if meta["thread_ts"] else "channel"
            lines += [f"### {i}. #{meta['channel']} ({where}, {meta['conversation_id']})", ""]
            for m in rec["messages"]:
                lines.append(f"**{m['role']}**:")
                lines.append("")
                lines += ["    " + line for line in m["content"].split("\n")]
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _table(title: str, key: str, counts: dict[str, int]) -> list[str]:
    lines = [f"## {title}", ""]
    if not counts:
        return lines + ["none", ""]
    lines += [f"| {key} | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    return lines + [""]


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, ensure_ascii=False, indent=2) + "\n"
