"""Chat records -> token ids with labels -> packed rows -> padded batches.

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
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from slackdist.errors import SlackdistError
from slackdist.model.template import encode_chat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One conversation as token ids and labels (-100 where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


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


class Examples(list):
    """`list[Example]` that also says how many records were read and how many were too long."""

    num_records: int = 0
    num_too_long: int = 0


def make_example(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    train_on: Literal["assistant", "all"],
) -> Example:
    """Token ids of a conversation (through `encode_chat`) and its labels.

    Args:
        tokenizer: tokenizer with our chat template.
        messages: chat messages.
        train_on: "assistant" labels the assistant turns' content and end-of-turn tokens;
            "all" labels every token (system and user turns, headers and all).

    Raises:
        ValueError: malformed messages.
    """
    ids, mask = encode_chat(tokenizer, messages)
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
    return Example(input_ids=ids, labels=labels)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SlackdistError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SlackdistError(f"{path}: cannot read ({e})") from None
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlackdistError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise SlackdistError(f'{path}:{lineno}: expected an object with a "messages" list')
        records.append((lineno, record))
    return records


def load_examples(
    path: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_on: Literal["assistant", "all"],
    max_seq_len: int,
    progress: bool | None = None,
) -> Examples:
    """Tokenize a JSONL file of chat records into examples, dropping those over `max_seq_len`.

    Args:
        path: train.jsonl / validation.jsonl / test.jsonl from `slackdist prepare`.
        tokenizer: tokenizer with our chat template.
        train_on: which tokens carry the loss (see `make_example`).
        max_seq_len: longest example kept, in tokens.
        progress: show a tqdm bar (default: on the main process only, from RANK).

    Returns:
        The examples in file order (an `Examples` list with `num_records`, `num_too_long`).

    Raises:
        SlackdistError: missing file, a line that is not JSON, or a malformed record (file:line).
    """
    from tqdm.auto import tqdm

    path = Path(path)
    records = read_records(path)
    examples = Examples()
    examples.num_records = len(records)
    show = _is_main_process() if progress is None else progress
    for lineno, record in tqdm(records, desc=f"tokenizing {path.name}", unit="conv", disable=not show):
        try:
            example = make_example(tokenizer, record["messages"], train_on=train_on)
        except ValueError as e:
            raise SlackdistError(f"{path}:{lineno}: {e}") from None
        if len(example) > max_seq_len:
            examples.num_too_long += 1
            continue
        examples.append(example)
    if examples.num_too_long:
        logger.warning(
            "%s: dropped %d of %d conversations longer than max_seq_len=%d tokens",
            path,
            examples.num_too_long,
            examples.num_records,
            max_seq_len,
        )
    return examples


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


def _row(examples: list[Example]) -> PackedRow:
    row = PackedRow(input_ids=[], labels=[], position_ids=[], seq_lens=[])
    for ex in examples:
        row.input_ids += ex.input_ids
        row.labels += [IGNORE_INDEX, *ex.labels[1:]]
        row.position_ids += range(len(ex))
        row.seq_lens.append(len(ex))
    return row


def pack(
    examples: list[Example], max_seq_len: int, *, seed: int, epoch: int, packing: bool = True
) -> list[PackedRow]:
    """Shuffle the examples for this epoch and lay them into rows of at most `max_seq_len` tokens.

    Deterministic for a given (seed, epoch); different epochs give different rows and
    order. Packing is best-fit-decreasing over the shuffled examples (nearly full rows),
    then the rows themselves are shuffled.

    Args:
        examples: from `load_examples`.
        max_seq_len: tokens per row.
        seed: run seed.
        epoch: epoch number (0-based).
        packing: False gives one conversation per row (still shuffled).

    Returns:
        The rows, in training order.

    Raises:
        ValueError: an example longer than `max_seq_len`.
    """
    lengths = [len(ex) for ex in examples]
    too_long = [n for n in lengths if n > max_seq_len]
    if too_long:
        raise ValueError(
            f"{len(too_long)} examples are longer than max_seq_len={max_seq_len} (longest {max(too_long)})"
        )
    rng = _rng(seed, epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    if not packing:
        return [_row([examples[i]]) for i in order]
    bins = _bins_best_fit_decreasing(lengths, order, max_seq_len)
    rng.shuffle(bins)
    return [_row([examples[i] for i in b]) for b in bins]


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
        `input_ids`, `labels`, `position_ids` as `[B, T]` long tensors and
        `num_label_tokens` (0-dim long tensor: labels that count after the one-token shift,
        i.e. `labels[:, 1:] != -100`), plus the varlen entries when asked.
    """
    import torch

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
        input_ids[b, :n] = torch.tensor(row.input_ids)
        labels[b, :n] = torch.tensor(row.labels)
        position_ids[b, :n] = torch.tensor(row.position_ids)
        position_ids[b, n:] = torch.arange(width - n)
        seq_lens += row.seq_lens + ([width - n] if width > n else [])
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "num_label_tokens": (labels[:, 1:] != IGNORE_INDEX).sum(),
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
