"""Training data: `--data` as examples, each epoch packed once, each rank's micro-batches.

Each epoch the conversations are packed afresh (deterministic in seed and epoch), once: `Epoch`
keeps which conversations go into which row and builds a row when it is fed. One optimizer step
takes `micro_batch_size x gradient_accumulation_steps x num_processes` packed rows and each rank
takes its own micro-batches of them. Rows do not divide evenly: the last step's missing
micro-batches are empty (filler rows with no label tokens), so nothing is dropped or seen twice
and the result does not depend on the number of processes. Resuming starts at the first packed
row of the epoch not yet trained on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from slackdist.config import TrainConfig
from slackdist.data.examples import Example, TokenizedSplit, load_split
from slackdist.data.sources import DataSource, check_data_source, open_data
from slackdist.errors import SlackdistError
from slackdist.train.distributed import Topology
from slackdist.train.packing import PackedRow, pack, pack_order, packed_row

logger = logging.getLogger(__name__)

PREPARE_REPORT = "report.json"


def check_training_data(t: TrainConfig) -> None:
    """A `--data` that cannot be opened is one line before the model loads (`check_data_source`).

    Raises:
        SlackdistError: a missing path, a Slack export that was not prepared, an unusable hub id.
    """
    check_data_source(t.data_dir)


def load_training_examples(
    t: TrainConfig, tokenizer: Any, accelerator: Accelerator
) -> tuple[TokenizedSplit, TokenizedSplit | list[Example]]:
    """The training and validation conversations of `--data`, tokenized (cached by `datasets`).

    Validation is the source's `train.validation_split`; a source without one (a single file, most
    hub datasets) gets `train.validation_fraction` of the training records held out, chosen by
    `train.seed`. A prepared folder's empty validation.jsonl means no validation.

    Raises:
        SlackdistError: unreadable data, no training split, a bad record, or no usable training conversation.
    """
    with accelerator.main_process_first():  # the main process tokenizes and caches, the others read
        source = open_data(t.data_dir)
        train = load_split(source, t.train_split, tokenizer, train_on=t.train_on, max_seq_len=t.max_seq_len)
        if t.validation_split in source.splits:
            val = load_split(
                source, t.validation_split, tokenizer, train_on=t.train_on, max_seq_len=t.max_seq_len
            )
            held_out = ""
        else:
            train, val, held_out = hold_out(train, t)
    main = accelerator.is_main_process
    if main and held_out:
        logger.warning("%s", held_out)
    if main and train.num_too_long:
        logger.warning("%s%s", train.describe_dropped(), _why_longer(source, t))
    if not train:
        raise SlackdistError(
            f"{source.where(t.train_split)}: no conversation fits max_seq_len={t.max_seq_len}"
            if train.num_records
            else f"{source.where(t.train_split)}: no conversations to train on"
        )
    if main and not val:
        logger.warning(
            "%s: no validation conversations; no eval and no early stopping", source.where(t.validation_split)
        )
    return train, val


def hold_out(train: TokenizedSplit, t: TrainConfig) -> tuple[TokenizedSplit, TokenizedSplit | list, str]:
    """Split `train.validation_fraction` of the records off for validation (a seeded permutation).

    Returns:
        (training part, validation part or [] when none is held out, the one line that says how).
    """
    n = train.num_records
    n_val = max(1, round(n * t.validation_fraction)) if t.validation_fraction > 0 and n >= 2 else 0
    if n_val == 0:
        return train, [], ""
    order = np.random.default_rng(t.seed).permutation(n)
    kept = TokenizedSplit(
        train.tokenized, max_seq_len=t.max_seq_len, name=train.name, rows=np.sort(order[n_val:])
    )
    val = TokenizedSplit(
        train.tokenized,
        max_seq_len=t.max_seq_len,
        name=f"{train.name} (held out)",
        rows=np.sort(order[:n_val]),
    )
    note = (
        f"{train.name}: no {t.validation_split!r} split; held out {n_val} of its {n} conversations for "
        f"validation (train.validation_fraction={t.validation_fraction:g}, seed {t.seed})"
    )
    return kept, val, note


def _why_longer(source: DataSource, t: TrainConfig) -> str:
    """Why a prepared folder holds conversations longer than training keeps, from its report.json."""
    if source.kind != "prepared folder":
        return ""
    try:
        config = json.loads((Path(source.spec) / PREPARE_REPORT).read_text(encoding="utf-8"))["config"]
        tokenizer, budget = config.get("tokenizer"), int(config["max_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if budget > t.max_seq_len:
        return f" (prepare's budget was data.max_tokens={budget}; prepare again with --max-tokens {t.max_seq_len})"
    if not tokenizer:
        return (
            " (prepare estimated ~4 characters a token; `slackdist prepare --tokenizer MODEL` counts with the "
            "model's own tokenizer and splits such conversations into windows instead)"
        )
    return f" (prepare counted with the tokenizer {tokenizer}; training uses the model's)"


@dataclass
class Batches:
    """One rank's share of rows: per optimizer step, its micro-batches (row indices; empty = filler)."""

    steps: list[list[list[int]]]

    def __len__(self) -> int:
        return len(self.steps)


def shard_rows(
    num_rows: int,
    *,
    micro_batch_size: int,
    accumulation: int,
    num_processes: int,
    rank: int,
    first_row: int = 0,
) -> Batches:
    """Split packed rows [first_row, num_rows) into optimizer steps and give rank `rank` its micro-batches.

    Step s covers rows first_row + [s*R, (s+1)*R) with R = micro_batch_size * accumulation * num_processes;
    micro-batch j of rank r is the r-th slice of the j-th group of `micro_batch_size * num_processes`.
    Past the last row a micro-batch is empty (the step feeds a filler row with no label tokens), so
    every rank runs the same number of forwards (FSDP and DDP need that) and no row is dropped.
    """
    per_step = micro_batch_size * accumulation * num_processes
    steps = []
    for s in range(math.ceil(max(num_rows - first_row, 0) / per_step)):
        micro = []
        for j in range(accumulation):
            start = first_row + s * per_step + (j * num_processes + rank) * micro_batch_size
            micro.append([i for i in range(start, start + micro_batch_size) if i < num_rows])
        steps.append(micro)
    return Batches(steps)


def rank_steps(
    rows: Sequence[PackedRow],
    *,
    rows_per_forward: int,
    accumulation: int,
    topology: Topology,
    first_row: int = 0,
) -> Iterator[list[list[PackedRow]]]:
    """This rank's micro-batches of each optimizer step over `rows` (`shard_rows`), as rows."""
    shards = shard_rows(
        len(rows),
        micro_batch_size=rows_per_forward,
        accumulation=accumulation,
        num_processes=topology.world_size,
        rank=topology.rank,
        first_row=first_row,
    )
    for step in shards.steps:
        yield [[rows[i] for i in micro] for micro in step]


class Epoch(Sequence[PackedRow]):
    """One epoch's packed rows: packed once (which conversations share a row, in which order),
    each row built when it is read."""

    def __init__(self, examples: Sequence[Example], *, index: int, t: TrainConfig) -> None:
        self.index = index
        self.examples = examples
        # A TokenizedSplit knows its lengths: packing needs no conversation read.
        lengths = getattr(examples, "lengths", None) or [len(ex) for ex in examples]
        self.order = pack_order(lengths, t.max_seq_len, seed=t.seed, epoch=index, packing=t.packing)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> PackedRow:  # type: ignore[override]  # rows are read one at a time
        return packed_row([self.examples[j] for j in self.order[i]])

    def num_steps(self, rows_per_step: int) -> int:
        """Optimizer steps of `rows_per_step` rows (all ranks) in this epoch."""
        return math.ceil(len(self) / rows_per_step)


def validation_rows(examples: Sequence[Example], t: TrainConfig) -> list[PackedRow]:
    """The validation conversations, packed once for every eval of the run."""
    return pack(list(examples), t.max_seq_len, seed=t.seed, epoch=0, packing=t.packing) if examples else []
