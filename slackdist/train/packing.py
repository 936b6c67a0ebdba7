"""Examples (token ids with labels, `slackdist.data.examples`) -> packed rows -> padded batches.

A packed row holds several conversations back to back. Each conversation's
`position_ids` restart at 0, and the attention backends use those restarts as sequence
boundaries (transformers' block mask for SDPA/eager, `cu_seqlens` for varlen kernels),
so no token attends across conversations and a conversation's logits inside a row equal
its logits alone (tests/test_packing.py proves it). The first label of every
conversation is -100: with the usual one-token shift, the token before a boundary would
otherwise be trained to predict the next conversation's first token.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from slackdist.data.examples import Example
from slackdist.model.loss import IGNORE_INDEX


@dataclass
class PackedRow:
    """Conversations laid end to end in one row of at most `max_seq_len` tokens."""

    input_ids: list[int]
    labels: list[int]
    """Labels with the first label of each conversation set to -100."""
    position_ids: list[int]
    """0, 1, ... restarting at 0 for each conversation."""
    seq_lens: list[int]
    """Length of each conversation in the row, in order."""

    def __len__(self) -> int:
        return len(self.input_ids)


def _rng(seed: int, epoch: int) -> random.Random:
    # String seeds hash with SHA-512 in CPython: the same on every run, rank and platform.
    return random.Random(f"slackdist-pack-{seed}-{epoch}")


def _bins_best_fit_decreasing(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """Bin indices into rows: longest first (ties in `order`), each into the fullest row it fits."""
    by_length = sorted(order, key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in by_length:
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
            continue
        space, b = free.pop(pos)
        bins[b].append(i)
        bisect.insort(free, (space - lengths[i], b))
    return bins


def packed_row(examples: list[Example]) -> PackedRow:
    """The examples laid end to end, positions restarting and the first label masked for each."""
    row = PackedRow(input_ids=[], labels=[], position_ids=[], seq_lens=[])
    for ex in examples:
        row.input_ids += ex.input_ids
        row.labels += [IGNORE_INDEX, *ex.labels[1:]]
        row.position_ids += range(len(ex))
        row.seq_lens.append(len(ex))
    return row


def pack_order(
    lengths: list[int], max_seq_len: int, *, seed: int, epoch: int, packing: bool = True
) -> list[list[int]]:
    """Which examples go into which row, rows in training order: the packing decision without the rows.

    Shuffles the examples for this epoch, then bins them best-fit-decreasing into rows of at most
    `max_seq_len` tokens (nearly full rows) and shuffles the rows. Deterministic for a given
    (seed, epoch); different epochs give different rows and order.

    Args:
        lengths: tokens of each example.
        max_seq_len: tokens per row.
        seed: run seed.
        epoch: epoch number (0-based).
        packing: False gives one example per row (still shuffled).

    Returns:
        Per row, the indices of its examples.

    Raises:
        ValueError: an example longer than `max_seq_len`.
    """
    too_long = [n for n in lengths if n > max_seq_len]
    if too_long:
        raise ValueError(
            f"{len(too_long)} examples are longer than max_seq_len={max_seq_len} (longest {max(too_long)})"
        )
    rng = _rng(seed, epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not packing:
        return [[i] for i in order]
    bins = _bins_best_fit_decreasing(lengths, order, max_seq_len)
    rng.shuffle(bins)
    return bins


def pack(
    examples: list[Example], max_seq_len: int, *, seed: int, epoch: int, packing: bool = True
) -> list[PackedRow]:
    """The rows of `pack_order`, built: every packed row of one epoch at once (e.g. validation).

    Raises:
        ValueError: an example longer than `max_seq_len`.
    """
    order = pack_order([len(ex) for ex in examples], max_seq_len, seed=seed, epoch=epoch, packing=packing)
    return [packed_row([examples[i] for i in b]) for b in order]


def _longs(values: list[int]) -> torch.Tensor:
    # Through numpy: torch.tensor(list) takes ~1 ms for an 8k-token row, 8x longer, and a step
    # collates while the GPU waits for its inputs.
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


def collate(
    rows: list[PackedRow], pad_id: int, *, pad_to_multiple_of: int = 1, varlen_kwargs: bool = False
) -> dict[str, Any]:
    """Right-pad rows into a batch.

    Padding is its own "conversation": its positions restart at 0, so it is a separate
    sequence for every attention backend and never attends into (or is attended by) real
    tokens; its labels are -100.

    Args:
        rows: packed rows (or one conversation each).
        pad_id: the tokenizer's pad token id.
        pad_to_multiple_of: round the padded length up (e.g. 8 or 64 for tensor cores).
        varlen_kwargs: also return `cu_seq_lens_q/k` (int32) and `max_length_q/k`, computed
            here on the CPU from the rows, so varlen attention needs no GPU sync per batch.

    Returns:
        `input_ids`, `labels`, `position_ids` as `[B, T]` long tensors, `num_label_tokens` (int:
        labels that count after the one-token shift, i.e. `labels[:, 1:] != -100`) and
        `label_positions` (long tensor: the flat indices `b * T + t` of the positions whose next
        label counts, for `chunked_lm_loss`), plus the varlen entries when asked. Both label
        entries are counted here on the CPU, so the loss needs no GPU sync to find its tokens.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    width = max(len(r) for r in rows)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    seq_lens: list[int] = []
    for b, row in enumerate(rows):
        n = len(row)
        input_ids[b, :n] = _longs(row.input_ids)
        labels[b, :n] = _longs(row.labels)
        position_ids[b, :n] = _longs(row.position_ids)
        position_ids[b, n:] = torch.arange(width - n)
        seq_lens += row.seq_lens + ([width - n] if width > n else [])
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    label_positions = counted.flatten().nonzero().flatten()
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "num_label_tokens": label_positions.numel(),
        "label_positions": label_positions,
    }
    if varlen_kwargs:
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seq_lens, dtype=torch.int32).cumsum(0)
        batch |= {
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max(seq_lens),
            "max_length_k": max(seq_lens),
        }
    return batch
