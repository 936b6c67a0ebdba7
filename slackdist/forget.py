"""`slackdist forget USER --data DIR [--export PATH] [--models ROOT]`: erase a person from a prepared dataset.

1. DIR's provenance (``provenance.jsonl``, :mod:`slackdist.data.provenance`) names the export DIR was
   prepared from, by path and identity. The export is opened (``--export`` where it has moved) and must
   have that identity: another export would give another dataset.
2. USER is found in the export's users.json like a name of ``--exclude-users`` (display, real or user
   name, user id, e-mail; every user the name matches).
3. `prepare` runs again into DIR with DIR's own recorded config (report.json; the people it already
   left out are recorded there as keyed hashes) and USER left out too: the rules of ``--exclude-users``,
   in full — their messages, mentions, names, e-mail and quoted text go, and conversations are grouped
   and windowed again without them. DIR's files are replaced only once the new ones are complete.
4. The new provenance is checked: no record holds a message of USER or mentions them.
5. With ``--models ROOT``: every folder under ROOT whose provenance holds or mentions USER (training
   outputs and merged models; `train` and `merge` copy the provenance into them) is listed with the
   command that retrains it. Their weights were trained on USER's messages: they must be retrained and
   the old folders deleted.

Why from the export and not by editing the JSONL: a record is built from whole conversations (turns
merged per speaker, roles counted from the last turn, overlapping windows), so removing one person's
turns from a written record would leave merged turns, roles and windows that `prepare` would never
write, and quoted text of theirs inside other people's messages cannot be told apart in the JSONL.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from slackdist.config import DataConfig
from slackdist.data.prepare import prepare
from slackdist.data.provenance import (
    PROVENANCE_FILE,
    Holding,
    export_identity,
    find_holders,
    holding,
    read_export,
)
from slackdist.data.records import persona_names
from slackdist.errors import SlackdistError, first_line
from slackdist.slack.consent import resolve_people
from slackdist.slack.export import open_export
from slackdist.slack.metadata import UserInfo, load_users
from slackdist.slack.warnings import Warnings

if TYPE_CHECKING:
    from slackdist.config import Config

REPORT_FILE = "report.json"
ADAPTER_CONFIG = "adapter_config.json"
TRAINING_CONFIG = "slackdist_config.yaml"


@dataclasses.dataclass(frozen=True)
class Forgotten:
    """What `forget` did: the person's user ids, what DIR held of them before, its records after."""

    user_ids: tuple[str, ...]
    before: Holding
    records_after: int


def forget(user: str, data_dir: str | Path, *, export: str | Path | None = None) -> Forgotten:
    """Prepare DIR again from its export without ``user``.

    Args:
        user: the person: display, real or user name, user id or e-mail in the export's users.json.
        data_dir: a folder `slackdist prepare` wrote (with provenance.jsonl and report.json).
        export: the export, when it is no longer where the provenance says.

    Returns:
        What was forgotten.

    Raises:
        SlackdistError: DIR has no provenance or report, the export is missing or is another one,
            USER is nobody in users.json, USER is DIR's only persona, or the new data still holds them.
    """
    data_dir = Path(data_dir)
    ref = read_export(data_dir / PROVENANCE_FILE)
    source = Path(export) if export is not None else Path(ref.path)
    if not source.exists():
        raise SlackdistError(
            f"{source}: the export {data_dir} was prepared from is not there; pass --export PATH"
        )
    with open_export(source, Warnings()) as src:
        if export_identity(src) != ref.id:
            raise SlackdistError(
                f"{source}: not the export {data_dir} was prepared from (its users, channels or files "
                "differ); pass --export with that export"
            )
        users = load_users(src)
        where = src.where("users.json")
        ids = resolve_people([user], users, flag="forget", salt=ref.id, where=where)
    cfg = _recorded_config(data_dir)
    personas = [p for p in persona_names(cfg.persona) if not (_persona_ids(p, users, ref.id) & ids)]
    if cfg.persona and not personas:
        raise SlackdistError(
            f"{data_dir}: prepared to answer as {user!r} (--as); forgetting them leaves no persona: "
            "prepare the export again with another --as, or without it"
        )
    cfg.persona = ", ".join(personas) or None
    cfg.exclude_users = [*cfg.exclude_users, *sorted(ids)]
    before = holding(data_dir / PROVENANCE_FILE, sorted(ids))
    report = prepare(source, data_dir, cfg)
    after = holding(data_dir / PROVENANCE_FILE, sorted(ids))
    if after.records or after.mentions:  # the rules above make this impossible; never trust that silently
        raise SlackdistError(f"{data_dir / PROVENANCE_FILE}: still holds {user!r} after forgetting")
    return Forgotten(tuple(sorted(ids)), before, report.totals["records"])


def _persona_ids(name: str, users: dict[str, UserInfo], salt: str) -> frozenset[str]:
    """The user ids a persona name stands for (none when it names no user: then it is a speaker name)."""
    try:
        return resolve_people([name], users, flag="--as", salt=salt, where="users.json")
    except SlackdistError:
        return frozenset()


def _recorded_config(data_dir: Path) -> DataConfig:
    """The data config DIR was prepared with, from its report.json.

    Raises:
        SlackdistError: no readable report.json.
    """
    path = data_dir / REPORT_FILE
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SlackdistError(
            f"{path}: cannot read the config DIR was prepared with ({first_line(e)})"
        ) from None
    names = {f.name for f in dataclasses.fields(DataConfig)}
    cfg = DataConfig(**{k: v for k, v in recorded.items() if k in names})
    cfg.dry_run = False
    return cfg


# ---------------------------------------------------------------- models trained on the person


@dataclasses.dataclass(frozen=True)
class Retrain:
    """A model folder that holds the person, and how to build it again without them."""

    holding: Holding
    kind: str  # "training output", "merged model", "model folder"
    commands: list[str]


def retrain_plan(root: str | Path, user_ids: Sequence[str], data_dir: str | Path) -> list[Retrain]:
    """Every folder under ``root`` whose provenance holds or mentions ``user_ids``, with its commands.

    A training output is moved aside and trained again in its place from its own config on the
    rewritten DIR (``--set train.resume=null``: never from its old checkpoints); the old folder is
    deleted once the new one is complete. A merged
    model inside a training output (``--merge-after-training``) comes back with it; another merged
    model is merged again from the retrained adapter whose provenance was identical to its own.

    Raises:
        SlackdistError: ``root`` is not a folder, or a provenance file under it is unreadable.
    """
    holders = find_holders(root, user_ids)
    outputs = [h for h in holders if (h.folder / ADAPTER_CONFIG).is_file()]
    data = shlex.quote(str(data_dir))
    plans = []
    for held in sorted(holders, key=lambda h: h not in outputs):  # adapters first: merges need them
        folder = held.folder
        q = shlex.quote(str(folder))
        inside = next((o for o in outputs if o.folder != folder and o.folder in folder.parents), None)
        if held in outputs:
            old = shlex.quote(f"{folder}.forgotten")
            has_config = (folder / TRAINING_CONFIG).is_file()
            config = f" --config {shlex.quote(f'{folder}.forgotten/{TRAINING_CONFIG}')}" if has_config else ""
            commands = [
                f"mv {q} {old} && slackdist train{config} --data {data} --output {q} --set train.resume=null "
                f"&& rm -rf {old}"
            ]
            plans.append(Retrain(held, "training output", commands))
        elif inside is not None:
            plans.append(Retrain(held, "merged model", [f"# rebuilt by retraining {inside.folder}"]))
        else:
            source = _same_provenance(folder, outputs)
            adapter = shlex.quote(str(source.folder)) if source else "RETRAINED_ADAPTER"
            commands = [f"slackdist merge --adapter {adapter} --output {q}"]
            plans.append(
                Retrain(
                    held, "merged model" if (folder / "config.json").is_file() else "model folder", commands
                )
            )
    return plans


def _same_provenance(folder: Path, outputs: list[Holding]) -> Holding | None:
    """The training output whose provenance is byte for byte the one a merged folder carries."""
    mine = (folder / PROVENANCE_FILE).read_bytes()
    return next((o for o in outputs if (o.folder / PROVENANCE_FILE).read_bytes() == mine), None)


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist forget USER --data DIR [--export PATH] [--models ROOT]`.

    Raises:
        SlackdistError: see :func:`forget` and :func:`retrain_plan`.
    """
    done = forget(args.user, args.data, export=args.export)
    b = done.before
    print(
        f"forgot {args.user!r} ({', '.join(done.user_ids)}) in {args.data}: {b.records} records held their "
        f"messages and {b.mentions} mentioned them; prepared again without them: {done.records_after} records, "
        "none holds or mentions them"
    )
    if args.models is None:
        print("models trained on the old data still hold them: run again with --models ROOT to list them")
        return 0
    plans = retrain_plan(args.models, done.user_ids, args.data)
    if not plans:
        print(f"no model folder under {args.models} was trained on data that holds them")
        return 0
    print(
        f"{len(plans)} model folders under {args.models} were trained on data that holds them; they must be "
        "retrained without them (the old weights hold what they learnt from their messages):"
    )
    for plan in plans:
        h = plan.holding
        print(
            f"  {h.folder}  ({plan.kind}: {h.records} records with their messages, {h.mentions} mentioning them)"
        )
        for command in plan.commands:
            print(f"      {command}")
    return 0
