"""Training data: the prepared records as examples, each epoch packed once, each rank's micro-batches.

Each epoch the conversations are packed afresh (deterministic in seed and epoch), once: `Epoch`
keeps which conversations go into which row and builds a row when it is fed. One optimizer step
takes `micro_batch_size x gradient_accumulation_steps x num_processes` packed rows and each rank
takes its own micro-batches of them. Rows do not divide evenly: the last step's missing
micro-batches are empty (filler rows with no label tokens), so nothing is dropped or seen twice
and the result does not depend on the number of processes. Resuming starts at the first packed
row of the epoch not yet trained on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from slackdist.config import TrainConfig
from slackdist.data.examples import Example, load_examples
from slackdist.errors import SlackdistError
from slackdist.train.distributed import Topology
from slackdist.train.packing import PackedRow, pack, pack_order, packed_row

logger = logging.getLogger(__name__)

TRAIN_FILE = "train.jsonl"
VALIDATION_FILE = "validation.jsonl"


def load_training_examples(
    t: TrainConfig, tokenizer: Any, accelerator: Accelerator
) -> tuple[list[Example], list[Example]]:
    """Tokenize DATA/train.jsonl and DATA/validation.jsonl (validation may be absent or empty).

    Raises:
        SlackdistError: no train.jsonl, a bad record, or no usable training conversation.
    """
    data = Path(t.data_dir)
    val_path = data / VALIDATION_FILE
    with accelerator.main_process_first():
        train = load_examples(data / TRAIN_FILE, tokenizer, train_on=t.train_on, max_seq_len=t.max_seq_len)
        val = (
            load_examples(val_path, tokenizer, train_on=t.train_on, max_seq_len=t.max_seq_len)
            if val_path.is_file()
            else []
        )
    if not train:
        raise SlackdistError(f"{data / TRAIN_FILE}: no conversation fits max_seq_len={t.max_seq_len}")
    if not val:
        logger.warning("%s: no validation conversations; no eval and no early stopping", val_path)
    return train, val


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

    def __init__(self, examples: list[Example], *, index: int, t: TrainConfig) -> None:
        self.index = index
        self.examples = examples
        lengths = [len(ex) for ex in examples]
        self.order = pack_order(lengths, t.max_seq_len, seed=t.seed, epoch=index, packing=t.packing)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> PackedRow:  # type: ignore[override]  # rows are read one at a time
        return packed_row([self.examples[j] for j in self.order[i]])

    def num_steps(self, rows_per_step: int) -> int:
        """Optimizer steps of `rows_per_step` rows (all ranks) in this epoch."""
        return math.ceil(len(self) / rows_per_step)


def validation_rows(examples: list[Example], t: TrainConfig) -> list[PackedRow]:
    """The validation conversations, packed once for every eval of the run."""
    return pack(examples, t.max_seq_len, seed=t.seed, epoch=0, packing=t.packing) if examples else []
