"""What `prepare` did: counts per drop reason, channel and redaction kind, warnings, quality figures.

The quality figures are the ones the README's "Prepare" section lists; each is
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

from slackdist.config import split_fractions
from slackdist.data.conversations import TRUNCATION_MARK, Conversation, WindowPlan
from slackdist.data.records import SPLIT_NAMES, BuiltRecord, validate_record
from slackdist.slack.markup import find_raw_markup
from slackdist.slack.metadata import Channel
from slackdist.slack.post import Post

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
    """The DESIGN quality figures, measured on the written records against the source messages.

    A message "reaches a turn" when its cleaned text is found, in order, in the content of a written
    record's message that holds its turn (or its head, before :data:`TRUNCATION_MARK`, when it was
    cut to fit the budget). Threads and conversations are "kept whole" when every one of their
    messages reaches a turn in records of one conversation (one record, or the overlapping windows
    of one). A message "has a reply partner" when another person speaks in its conversation or
    thread (a thread includes its parent wherever that landed).
    """

    threads: int = 0  # Slack threads (parent and replies) with 2+ people
    threads_kept_whole: int = 0
    threads_reopened: int = 0
    thread_parents_joined: int = 0  # parents without thread fields joined to their replies by thread_ts
    conversations_with_2_people: int = 0  # threads and time windows, before windowing
    conversations_kept_whole: int = 0
    replies: int = 0
    replies_with_parent_present: int = 0
    replies_placed_with_parent: int = 0  # in a record of the same conversation as their parent
    reply_partner_messages: int = 0
    reply_partner_messages_covered: int = 0
    messages_truncated: int = 0  # reached a turn only in part (cut to fit the token budget)
    conversations_mixing_channels: int = 0
    dm_turns: int = 0
    private_turns: int = 0
    turns: int = 0
    turns_with_raw_markup: int = 0
    turns_with_html_escapes: int = 0
    code_blocks: int = 0
    code_blocks_intact: int = 0
    code_blocks_changed: Counter = field(default_factory=Counter)  # reason -> blocks
    code_blocks_changed_list: list[dict[str, str]] = field(default_factory=list)  # where, never the text
    records: int = 0
    records_ending_on_assistant: int = 0
    records_invalid: int = 0
    records_one_person_both_roles: int = 0

    def merge(self, other: Quality) -> None:
        """Add another channel's figures."""
        for key, value in vars(other).items():
            if key == "code_blocks_changed_list":
                room = max(0, MAX_LISTED - len(self.code_blocks_changed_list))
                self.code_blocks_changed_list += value[:room]
            elif key == "code_blocks_changed":
                self.code_blocks_changed.update(value)
            else:
                setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["code_blocks_changed"] = dict(self.code_blocks_changed.most_common())
        d["code_blocks_changed_list"] = list(self.code_blocks_changed_list)
        d["threads_kept_whole_ratio"] = _ratio(self.threads_kept_whole, self.threads)
        d["conversations_kept_whole_ratio"] = _ratio(
            self.conversations_kept_whole, self.conversations_with_2_people
        )
        d["replies_placed_with_parent_ratio"] = _ratio(
            self.replies_placed_with_parent, self.replies_with_parent_present
        )
        d["reply_partner_coverage"] = _ratio(self.reply_partner_messages_covered, self.reply_partner_messages)
        d["code_blocks_intact_ratio"] = _ratio(self.code_blocks_intact, self.code_blocks)
        d["records_ending_on_assistant_ratio"] = _ratio(self.records_ending_on_assistant, self.records)
        return d


MAX_LISTED = 50  # code blocks listed by place in code_blocks_changed_list


@dataclass
class _ChannelTally:
    """Where each kept message of one channel went, resolved at :meth:`ReportBuilder.end_channel`.

    Kept per channel because a thread's parent can land in another conversation than its replies
    (a parent without thread fields that came too late to be joined). Plain dicts of strings, not
    an object per message: a million small objects would make every garbage collection slower.
    """

    groups: dict[str, str | None] = field(default_factory=dict)  # ts -> window group of its first record
    speakers: dict[str, str] = field(default_factory=dict)  # ts -> speaker key
    alone: set[str] = field(default_factory=set)  # ts whose own conversation had nobody else in it
    threads: dict[str, list[str]] = field(default_factory=dict)  # thread_ts -> ts of its messages


def window_group(conversation_id: str) -> str:
    """The conversation a record's id belongs to, without the window index: ``<hex>-<part>``.

    Windows of one conversation share it; the parts of a thread reopened by a late reply do not
    (they are not one record or overlapping windows of one, so such a thread is not kept whole).
    """
    head, tail = conversation_id.rsplit("-", 1)
    return f"{head}-{tail.split('.')[0] if '.' in tail else '0'}"


def locate(content: str, text: str, start: int = 0) -> tuple[int, int, bool]:
    """Where a message's text is in a record message's content, from ``start``: (begin, end, whole).

    ``begin`` is -1 when it is not there. A message cut to fit the token budget is found by its head,
    up to :data:`TRUNCATION_MARK` (``whole`` is False then).
    """
    i = content.find(text, start)
    if i >= 0:
        return i, i + len(text), True
    if TRUNCATION_MARK in content:
        i = content.find(text[:16], start)
        j = content.find(TRUNCATION_MARK, i) if i >= 0 else -1
        if j >= 0:
            seg = content[i:j]
            if text.startswith(seg) or (seg.endswith("\n```") and text.startswith(seg[:-4])):
                return i, j, False
    return -1, -1, False


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
        self._tallies: dict[str, _ChannelTally] = {}

    def merge(self, other: ReportBuilder) -> None:
        """Add the counts of another builder (one channel processed elsewhere), in channel order."""
        for name, theirs in other.channels.items():
            mine = self.channel(name, theirs.kind)
            for key in ("messages", "human_messages", "covered_messages", "conversations", "records"):
                setattr(mine, key, getattr(mine, key) + getattr(theirs, key))
            mine.dropped.update(theirs.dropped)
        self.dropped.update(other.dropped)
        self.redactions.update(other.redactions)
        self.quality.merge(other.quality)
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
        """Account for one whole conversation: find each of its messages in the written records.

        Every figure here comes from the records' content; a message found nowhere gets the reason
        its windows give (too short, over budget, the persona never answers), else ``not_in_record``.
        """
        stats = self.channel(conv.channel.name, conv.channel.kind)
        stats.conversations += 1
        q = self.quality
        reached: dict[str, str] = {}  # ts -> window group of the first record holding it
        for _, b in built:
            if b.record is not None:
                self._find_messages(conv, b, reached)
        tally = self._tallies.get(conv.channel.id)
        if tally is None:
            tally = self._tallies[conv.channel.id] = _ChannelTally()
        tally.groups.update(reached)
        speakers = tally.speakers
        keys = set()
        n_posts = 0
        for turn in conv.turns:
            key = turn.speaker_id or turn.speaker
            keys.add(key)
            n_posts += turn.n_messages
            for post in turn.posts:
                speakers[post.ts] = key
        multi = len(keys) >= 2
        groups = set(reached.values())
        whole = len(reached) == n_posts and len(groups) == 1
        if len(reached) < n_posts:
            self._count_drops(conv, plan, built, reached, stats)
        if not multi:
            tally.alone.update(p.ts for t in conv.turns for p in t.posts)
        if conv.thread_ts is not None:
            tally.threads.setdefault(conv.thread_ts, []).extend(p.ts for t in conv.turns for p in t.posts)
        stats.covered_messages += len(reached)
        if multi:
            q.reply_partner_messages += n_posts
            q.reply_partner_messages_covered += len(reached)
            q.conversations_with_2_people += 1
            q.conversations_kept_whole += whole

    def _count_drops(
        self,
        conv: Conversation,
        plan: WindowPlan,
        built: list[tuple[Conversation, BuiltRecord]],
        reached: dict[str, str],
        stats: ChannelStats,
    ) -> None:
        """A drop reason for each message of the conversation found in no record."""
        why = self._drop_reasons(plan, built)
        groups = self._tallies[conv.channel.id].groups
        for turn in conv.turns:
            for post in turn.posts:
                if post.ts not in reached:
                    groups[post.ts] = None
                    reason = why.get(turn.index, "not_in_record")
                    stats.dropped[reason] += 1
                    self.dropped[reason] += 1

    def _find_messages(self, conv: Conversation, b: BuiltRecord, reached: dict[str, str]) -> None:
        """Mark the messages found in one written record; check the code blocks of the ones seen first here."""
        assert b.record is not None
        q = self.quality
        cid = b.record["meta"]["conversation_id"]
        group = window_group(cid)
        messages = b.record["messages"]
        for i, turns in enumerate(b.groups, 1):
            content = messages[i]["content"]
            cursor = 0
            for turn in turns:
                # A turn's text is its messages' texts joined: found whole, each of them is there in order.
                if not turn.truncated and not turn.code:
                    at = content.find(turn.text, cursor)
                    if at >= 0:
                        cursor = at + len(turn.text)
                        for post in turn.posts:
                            reached.setdefault(post.ts, group)
                        continue
                for post in turn.posts:
                    begin, end, whole = locate(content, post.text, cursor)
                    if begin < 0:
                        continue
                    cursor = end
                    if post.ts not in reached:
                        reached[post.ts] = group
                        q.messages_truncated += not whole
                        if post.code:
                            self._check_code(conv, cid, post, content[begin:end], whole)

    def _check_code(self, conv: Conversation, cid: str, post: Post, found: str, whole: bool) -> None:
        """Each of the post's source code blocks must be in what the record holds of the post, byte for byte."""
        q = self.quality
        for block, redacted in zip(post.code, post.code_redacted, strict=True):
            q.code_blocks += 1
            if block in found:
                q.code_blocks_intact += 1
                continue
            reason = "truncated" if not whole else ("redacted" if redacted else "changed")
            q.code_blocks_changed[reason] += 1
            if len(q.code_blocks_changed_list) < MAX_LISTED:
                entry = {
                    "channel": conv.channel.name,
                    "conversation_id": cid,
                    "ts": post.ts,
                    "reason": reason,
                }
                q.code_blocks_changed_list.append(entry)

    def _drop_reasons(
        self, plan: WindowPlan, built: list[tuple[Conversation, BuiltRecord]]
    ) -> dict[int, str]:
        """Turn index -> why its windows gave no record holding it (for messages found in no record)."""
        why: dict[int, str] = {}
        for i in plan.over_budget:
            why[i] = "over_token_budget"
        for window in plan.too_short:
            for t in window.turns:
                why.setdefault(t.index, "conversation_too_short")
        role_reason = "persona_no_answer" if self.persona_mode else "not_in_record"
        for window, b in built:
            for t in window.turns:
                why.setdefault(t.index, role_reason if b.record is not None else (b.reason or "no_record"))
        return why

    def end_channel(self, channel: Channel) -> None:
        """Resolve the channel's threads (parent and replies wherever they landed) and forget its messages."""
        tally = self._tallies.pop(channel.id, None)
        if tally is None:
            return
        q = self.quality
        groups, speakers = tally.groups, tally.speakers
        for thread_ts, members in tally.threads.items():
            # The parent, joined to the thread or left in a time window (then not in members).
            parent_present = thread_ts in groups
            replies = [ts for ts in members if ts != thread_ts]
            q.replies += len(replies)
            everyone = [thread_ts, *replies] if parent_present else replies
            if parent_present:
                parent = groups[thread_ts]
                q.replies_with_parent_present += len(replies)
                q.replies_placed_with_parent += sum(
                    1 for ts in replies if groups[ts] is not None and groups[ts] == parent
                )
            if len({speakers[ts] for ts in everyone}) < 2:
                continue
            q.threads += 1
            where = {groups[ts] for ts in everyone}
            q.threads_kept_whole += len(where) == 1 and None not in where
            for ts in everyone:  # a reply partner that only the thread's parent gives
                if ts in tally.alone:
                    tally.alone.discard(ts)
                    q.reply_partner_messages += 1
                    q.reply_partner_messages_covered += groups[ts] is not None

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
        own = frozenset((window.channel.id,))
        if any(t.channel_ids != own for t in built.turns):
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
        if not self.persona_mode:  # messages alternate user, assistant, ... from the first
            users = {
                t.speaker_key
                for m, g in zip(msgs[1:], built.groups, strict=True)
                if m["role"] == "user"
                for t in g
            }
            helpers = {
                t.speaker_key
                for m, g in zip(msgs[1:], built.groups, strict=True)
                if m["role"] != "user"
                for t in g
            }
            q.records_one_person_both_roles += not users.isdisjoint(helpers)
        self.turn_counts.append(len(msgs) - 1)
        self.token_counts.append(built.tokens)
        if len(self.preview) < self.preview_n:
            self.preview.append(rec)

    def finish(
        self, *, warnings: dict[str, Any], config: dict[str, Any], output: str | None, seconds: float
    ) -> dict[str, Any]:
        """The report as a JSON-able dict.

        An empty validation or test split that the config asked for (a tiny export) is a warning
        (``split_warning``, also counted in ``warnings``) that the summary `prepare` prints.
        """
        human = sum(s.human_messages for s in self.channels.values())
        covered = sum(s.covered_messages for s in self.channels.values())
        split_warning = self._empty_splits(config.get("split"))
        if split_warning:
            warnings = {
                **warnings,
                "count": warnings.get("count", 0) + 1,
                "by_kind": {**warnings.get("by_kind", {}), "empty_split": 1},
                "examples": [*warnings.get("examples", []), split_warning],
            }
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
            "split_warning": split_warning,
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

    def _empty_splits(self, split: str | None) -> str | None:
        """The warning for a validation or test split the config asks for that got no record, or None."""
        fractions = split_fractions(split) if split else (0.0, 0.0, 0.0)
        empty = [
            f"{name}.jsonl"
            for name, fraction in zip(SPLIT_NAMES, fractions, strict=True)
            if name != "train" and fraction > 0 and self.splits.get(name, 0) == 0
        ]
        if not empty:
            return None
        return (
            f"{' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty: {sum(self.splits.values())} "
            f"records are too few for a {split} split; evaluation needs a larger export or another --split"
        )


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


def percent(x: float | None) -> str:
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
        f"| reached a record (coverage) | {t['covered_messages']} ({percent(t['coverage'])}) |",
        f"| conversations | {t['conversations']} |",
        f"| records | {t['records']} (train {t['splits']['train']}, validation {t['splits']['validation']}, "
        f"test {t['splits']['test']}) |",
        f"| turns / tokens | {t['turns']} / {t['tokens']} |",
        "",
        "## Quality",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| coverage of human messages | {percent(t['coverage'])} | |",
        f"| messages with a reply partner that reach a turn | {q['reply_partner_messages_covered']}/"
        f"{q['reply_partner_messages']} ({percent(q['reply_partner_coverage'])}) | ≥ 98% |",
        f"| conversations with 2+ people kept whole | {q['conversations_kept_whole']}/"
        f"{q['conversations_with_2_people']} ({percent(q['conversations_kept_whole_ratio'])}) | ≥ 97% |",
        f"| threads with 2+ people kept whole | {q['threads_kept_whole']}/{q['threads']} "
        f"({percent(q['threads_kept_whole_ratio'])}) | ≥ 97% |",
        f"| replies placed with their parent | {q['replies_placed_with_parent']}/{q['replies_with_parent_present']} "
        f"({percent(q['replies_placed_with_parent_ratio'])}) | 100% |",
        f"| messages cut to fit the token budget | {q['messages_truncated']} | |",
        f"| conversations mixing channels | {q['conversations_mixing_channels']} | 0 |",
        f"| DM / private-channel turns | {q['dm_turns']} / {q['private_turns']} | 0 unless opted in |",
        f"| turns with raw markup outside code | {q['turns_with_raw_markup']} | 0 |",
        f"| turns with HTML escapes outside code | {q['turns_with_html_escapes']} | 0 |",
        f"| code blocks intact | {q['code_blocks_intact']}/{q['code_blocks']} ({percent(q['code_blocks_intact_ratio'])}) "
        "| 100% but redacted |",
        f"| code blocks changed, by reason | {_reasons(q['code_blocks_changed'])} | |",
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
            f"| #{name} | {c['kind']} | {c['messages']} | {c['human_messages']} | {percent(c['coverage'])} "
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


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _table(title: str, key: str, counts: dict[str, int]) -> list[str]:
    lines = [f"## {title}", ""]
    if not counts:
        return lines + ["none", ""]
    lines += [f"| {key} | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    return lines + [""]


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, ensure_ascii=False, indent=2) + "\n"
