"""`slackdist prepare EXPORT --out DIR`: a Slack export becomes train/validation/test JSONL and a report.

The recipe, top to bottom in :func:`prepare`: open the export and read its users and channels
(``slack/``) and who is left out (``slack/consent.py``: ``--exclude-users``, ``--only-users``), then
run every channel through the pipeline (``channel.py``: read -> clean -> group -> window -> record),
in worker processes (``workers.py``), merging each channel's report in channel order; decide the
split once every conversation is known (``records.Split``), and write the splits, their provenance
(``provenance.py``), the report and the plots into a temporary folder that is moved into DIR at the
end (``output.py``), so an error leaves nothing behind and DIR never holds half-written files.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from slackdist.config import Config, DataConfig
from slackdist.data.canaries import CANARIES_FILE, card_with_canaries, plant_canaries
from slackdist.data.card import CARD_FILE
from slackdist.data.channel import FEED_NOTE, Job
from slackdist.data.interrupts import forget_interrupt_in_exec
from slackdist.data.output import SplitCounts, Staging
from slackdist.data.provenance import PROVENANCE_FILE, export_identity, header_line
from slackdist.data.records import (
    SPLIT_NAMES,
    PersonaMatcher,
    RecordBuilder,
    Split,
    load_token_counter,
    persona_names,
)
from slackdist.data.report import ReportBuilder, percent, render_markdown, report_json, write_plots
from slackdist.data.workers import channel_results, in_channel_order
from slackdist.errors import SlackdistError
from slackdist.files import check_output_dir, interrupt_exit_code, interrupted
from slackdist.slack.consent import Consent, hashed_user_id, resolve_people
from slackdist.slack.days import count_day_files, count_messages
from slackdist.slack.export import ExportSource, open_export
from slackdist.slack.metadata import Channel, UserInfo, list_channels, load_users
from slackdist.slack.warnings import Warnings

OUTPUT_FILES = (*(f"{n}.jsonl" for n in SPLIT_NAMES), "report.json", "report.md", CARD_FILE, PROVENANCE_FILE)
OUTPUT_MARKERS = ("report.json", "train.jsonl")
"""A folder with one of these is an earlier output, replaced without --overwrite."""


@dataclass
class Report:
    """What `prepare` produced: the report dict (as in report.json) and where the files went."""

    data: dict[str, Any]
    out_dir: Path | None

    @property
    def quality(self) -> dict[str, Any]:
        return self.data["quality"]

    @property
    def totals(self) -> dict[str, Any]:
        return self.data["totals"]

    def markdown(self) -> str:
        return render_markdown(self.data)


def prepare(
    export: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None,
    cfg: DataConfig,
    *,
    overwrite: bool = False,
) -> Report:
    """Run the whole data build; write DIR/{train,validation,test}.jsonl, report.json/.md and plots.

    Args:
        export: export folder or .zip.
        out_dir: output folder (None only with ``cfg.dry_run``); replaced whole by one rename.
        cfg: the data section of the config. ``cfg.persona`` (one name or several, comma-separated)
            implies persona roles; ``cfg.exclude_users`` / ``cfg.only_users`` leave people out.
        overwrite: replace ``out_dir`` even when it is non-empty and not an earlier output.

    Returns:
        The report.

    Raises:
        SlackdistError: bad input (one line naming the file), a person named that users.json does
            not have, no conversation left, a warning under ``cfg.strict``, or a DIR that is not ours
            (`check_output_dir`). Nothing is written then.
        KeyboardInterrupt: Ctrl-C (or SIGTERM, under `slackdist.files.sigterm_interrupts`); the workers
            are stopped, the temporary folder is removed and DIR is left as it was.
    """
    started = time.perf_counter()
    if cfg.persona and cfg.roles != "persona":
        cfg.roles = "persona"
    out = None if cfg.dry_run or out_dir is None else Path(out_dir)
    if out is None and not cfg.dry_run:
        raise SlackdistError("--out DIR is required (or use --dry-run)")
    if out is not None:
        check_output_dir(
            out, markers=OUTPUT_MARKERS, what="a prepared data folder", overwrite=overwrite, inputs=[export]
        )
    staging = Staging(out)
    split = Split.from_config(cfg)
    counter = load_token_counter(cfg.tokenizer)
    warnings = Warnings()
    with open_export(export, warnings) as src:
        # Setup: who is who, which channels, how records are built.
        users = load_users(src, warnings)
        _strict(cfg, warnings)
        identity = export_identity(src)
        consent = Consent.build(
            users,
            exclude=cfg.exclude_users,
            only=cfg.only_users,
            salt=identity,
            where=src.where("users.json"),
        )
        private: list[Channel] = []
        channels = list_channels(
            src,
            include_dms=cfg.include_dms,
            include_private=cfg.include_private,
            channels=cfg.channels,
            exclude_channels=cfg.exclude_channels,
            warnings=warnings,
            left_out_private=private,
        )
        if not channels:
            raise SlackdistError(_nothing_left(src, None, cfg, private))
        if consent is not None:  # a group DM's folder name holds its members' user names
            channels = [replace(c, name=consent.scrub(c.name)) for c in channels]
        workspace = cfg.workspace or src.name
        personas = [resolve_persona(name, users) for name in persona_names(cfg.persona)]
        _check_personas(personas, consent, src)
        builder = RecordBuilder(cfg, workspace=workspace, counter=counter, persona=personas or None)
        report = ReportBuilder(
            export=src.name, workspace=workspace, persona_mode=builder.persona_mode, preview=cfg.preview
        )
        with staging:
            # Every channel through the pipeline, merged in channel order.
            job = Job(Path(export), cfg, users, channels, builder, workspace, staging.parts, split, consent)
            staging.begin_provenance(header_line(identity, src.name, export))
            counts = SplitCounts()
            workers = cfg.workers or os.cpu_count() or 1
            with (
                _progress(count_day_files(src, channels)) as bar,
                channel_results(job, src, workers) as results,
            ):
                for result in in_channel_order(results, bar):
                    staging.join(result.index)
                    report.merge(result.report)
                    warnings.merge(result.warnings)
                    _strict(cfg, warnings)
                    counts.merge(result.counts)
            if report.quality.records == 0:
                raise SlackdistError(_nothing_left(src, report, cfg, private, warnings.notes))
            # The split of the conversations that waited for every start (by time), then the report.
            assign = split.assign(counts.starts)
            report.splits.update(dict(zip(SPLIT_NAMES, counts.totals(assign), strict=True)))
            data = report.finish(
                warnings=_warnings_summary(warnings, consent),
                config=_recorded_config(cfg, users, identity),
                output=None if out is None else str(out),
                seconds=time.perf_counter() - started,
            )
            # Save: the splits, the report and the plots, moved into DIR together.
            if staging.folder is not None:
                staging.write_splits(len(channels), assign)
                planted = None
                if cfg.canaries or cfg.canaries_redacted:  # copies into train.jsonl; the key beside it
                    planted = data["canaries"] = plant_canaries(staging.folder, cfg, builder.counter)
                staging.write("report.json", report_json(data))
                staging.write("report.md", render_markdown(data))
                staging.write(CARD_FILE, card_with_canaries(report.splits, planted))  # loads with `datasets`
                write_plots(report.turn_counts, report.token_counts, staging.folder)
                staging.install()
    return Report(data=data, out_dir=out)


def resolve_persona(name: str, users: dict[str, UserInfo]) -> PersonaMatcher:
    """``--as NAME``: the user ids whose id, display, real or user name is NAME (case-insensitive)."""
    key = name.strip().lstrip("@").casefold()
    ids = frozenset(
        u.id
        for u in users.values()
        if key in {n.casefold() for n in (u.id, u.name, u.real_name, u.display_name, u.username) if n}
    )
    return PersonaMatcher(name.strip().lstrip("@"), ids)


def _check_personas(personas: list[PersonaMatcher], consent: Consent | None, src: ExportSource) -> None:
    """A persona cannot be someone the dataset leaves out."""
    for persona in personas:
        if consent is not None and any(consent.excludes(uid) for uid in persona.user_ids):
            raise SlackdistError(
                f"{src.path}: --as {persona.name!r} is left out by --exclude-users / --only-users"
            )


def _recorded_config(cfg: DataConfig, users: dict[str, UserInfo], identity: str) -> dict[str, Any]:
    """The config as report.json records it: the people named by --exclude-users and --only-users as
    keyed hashes of their user ids (``Consent``), so the report names nobody it leaves out, while
    `prepare` and `forget`, given the same export, can read the list back (``sha256:...`` is a name)."""
    recorded = asdict(cfg)
    for key, flag in (("exclude_users", "--exclude-users"), ("only_users", "--only-users")):
        if recorded[key]:
            ids = resolve_people(recorded[key], users, flag=flag, salt=identity, where="users.json")
            recorded[key] = sorted(hashed_user_id(identity, uid) for uid in ids)
    return recorded


def _strict(cfg: DataConfig, warnings: Warnings) -> None:
    if cfg.strict and warnings:
        warnings.raise_if_any()


def _nothing_left(
    src: ExportSource,
    report: ReportBuilder | None,
    cfg: DataConfig,
    private: list[Channel],
    notes: Counter | None = None,
) -> str:
    """The one-line error when no record is left: what was left out, and the flag that keeps it."""
    human = 0 if report is None else sum(s.human_messages for s in report.channels.values())
    if cfg.persona and human:
        return f"{src.path}: --as {cfg.persona!r}: that person answers in no conversation ({human} human messages read)"
    left_out = _left_out(src, report, private, notes or Counter())
    if report is None and not left_out:
        return f"{src.path}: no channel left after --channels / --exclude-channels"
    top = "" if report is None else ", ".join(f"{k} {v}" for k, v in report.dropped.most_common(3))
    return (
        f"{src.path}: no conversation left ({human} human messages"
        + (f"; left out: {'; '.join(left_out)}" if left_out else "")
        + f"; most dropped: {top or 'none'})"
    )


def _left_out(
    src: ExportSource, report: ReportBuilder | None, private: list[Channel], notes: Counter
) -> list[str]:
    """Messages left out by the privacy and bot switches, each with the flag that keeps them."""
    dms = [c for c in private if c.kind in ("dm", "mpim")]
    hints = []
    n_private = count_messages(src, [c for c in private if c.kind == "private"])
    if n_private:
        hints.append(f"{n_private} messages in private channels (--include-private keeps them)")
    n_dms = count_messages(src, dms)
    if n_dms:
        hints.append(f"{n_dms} messages in DMs and group DMs (--include-dms keeps them)")
    dropped = Counter() if report is None else report.dropped
    feeds = dropped["bot_feed"] + notes[FEED_NOTE]
    if dropped["bot"] - notes[FEED_NOTE]:
        hints.append(f"{dropped['bot'] - notes[FEED_NOTE]} bot messages (--include-bots keeps them)")
    if feeds:
        hints.append(
            f"{feeds} integration feed posts (--include-bots keeps them in channels named with --channels)"
        )
    return hints


def _warnings_summary(warnings: Warnings, consent: Consent | None = None) -> dict[str, Any]:
    summary = warnings.summary()
    examples = [e for examples in summary["examples"].values() for e in examples]
    if consent is not None:  # a path names a group DM's folder, which holds its members' user names
        examples = [consent.scrub(e) for e in examples]
    return {
        "count": warnings.total,
        "by_kind": summary["counts"],
        "examples": examples,
        "notes": summary["notes"],
    }


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


class _progress:
    """A tqdm bar over day files on an interactive stderr (disable=None: off when not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None

    def __enter__(self) -> Any:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            return _NoBar()
        self.bar = tqdm(total=self.total, unit="file", desc="day files", file=sys.stderr, disable=None)
        return self.bar

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- CLI


def summary_lines(report: Report) -> list[str]:
    """The short summary `prepare` prints."""
    t, q = report.totals, report.quality
    s = t["splits"]
    lines = [
        f"read {t['messages']} messages ({t['human_messages']} human) from {t['channels']} channels, "
        f"{t['day_files']} day files in {t['seconds']:.1f} s",
        f"{t['records']} conversations -> train {s['train']}, validation {s['validation']}, test {s['test']}; "
        f"coverage {100 * (t['coverage'] or 0):.1f}% of human messages",
        f"quality: mixing channels {q['conversations_mixing_channels']}, raw markup {q['turns_with_raw_markup']}, "
        f"escapes {q['turns_with_html_escapes']}, code blocks intact {q['code_blocks_intact']}/{q['code_blocks']}",
        f"measured on the records: {percent(q['reply_partner_coverage'])} of messages with a reply partner reach a "
        f"turn, conversations kept whole {percent(q['conversations_kept_whole_ratio'])}, "
        f"threads kept whole {percent(q['threads_kept_whole_ratio'])}",
    ]
    left_out = report.data["dropped"].get("excluded_user")
    if left_out:
        lines.append(f"left out {left_out} messages of the people --exclude-users / --only-users leave out")
    if report.data.get("split_warning"):
        lines.append(f"warning: {report.data['split_warning']}")
    if report.data["warnings"]["count"]:
        lines.append(f"{report.data['warnings']['count']} warnings (see the report)")
    if report.out_dir is not None:
        lines.append(f"wrote {', '.join(OUTPUT_FILES)} and plots to {report.out_dir}")
    canaries = report.data.get("canaries")
    if canaries and report.out_dir is not None:
        lines.append(
            f"planted {canaries['planted']} canaries and {canaries['redacted']} redacted secrets in copies of "
            f"training conversations; the answer key is {report.out_dir / CANARIES_FILE}: keep it apart from "
            "the data (slackdist audit reads it)"
        )
        if canaries["redacted_left_in_data"]:
            lines.append(
                f"warning: the redactor left {canaries['redacted_left_in_data']} planted secrets in train.jsonl"
            )
    return lines


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist prepare EXPORT --out DIR`.

    Raises:
        SlackdistError: bad input; cli.py prints it as one line and exits 2.
    """
    data = cfg.data
    if args.out is None and not data.dry_run:
        raise SlackdistError("--out DIR is required (or use --dry-run to print the report only)")
    try:
        report = prepare(args.export, args.out, data, overwrite=args.overwrite)
    except KeyboardInterrupt as e:
        forget_interrupt_in_exec()
        kept = f"; {args.out} is as it was" if args.out is not None and Path(args.out).exists() else ""
        print(f"slackdist prepare: {interrupted(e)}, nothing written{kept}", file=sys.stderr)
        return interrupt_exit_code(e)
    if data.dry_run:
        print(report.markdown())
    print("\n".join(summary_lines(report)))
    return 0
