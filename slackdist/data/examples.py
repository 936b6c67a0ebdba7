"""Chat records -> token ids with labels, tokenized once and cached by `datasets`.

`tokenize_split` runs `encode_chat` (the encoder chat and serve use too, so training and
`slackdist eval` label the same tokens) over a split of chat records with `Dataset.map`. The
result is an Arrow file in the `datasets` cache named by a fingerprint of everything that decides
its content: the records' own fingerprint (for files: their path, size and modification time), the
tokenizer's vocabulary and chat template, which tokens carry the loss, and the source of the
encoder. A second run over the same data finds that file and skips tokenization; an edited file, a
different tokenizer or an encoder change tokenizes afresh.

`TokenizedSplit` reads conversations from that file through memory-mapped Arrow buffers: only the
lengths (for packing) live in Python, each conversation becomes lists of ints when a row is built,
so memory does not grow with the dataset and a row costs what it cost with in-memory lists.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
from datasets import Dataset, Features, List, Value
from datasets import config as datasets_config

from slackdist.data.sources import BadRecord, DataSource, open_data
from slackdist.errors import SlackdistError
from slackdist.model import chat_formats, families, template
from slackdist.model.loss import IGNORE_INDEX
from slackdist.model.template import encode_chat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TrainOn = Literal["assistant", "all"]
TOKENIZED_FEATURES = Features(
    {"input_ids": List(Value("int32")), "labels": List(Value("int32")), "length": Value("int32")}
)
CACHE_SUBDIR = "slackdist-tokenized"
"""Folder of the tokenized Arrow files inside the `datasets` cache (HF_DATASETS_CACHE)."""
ROWS_PER_WORKER = 20_000
"""Tokenize in one process up to this many conversations, then one more process per as many (up to the cores)."""
_ENCODER_MODULES = (template, chat_formats, families, sys.modules[__name__])


@dataclass(frozen=True)
class Example:
    """One conversation as token ids and labels (-100 where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def make_example(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    train_on: TrainOn,
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


class TokenizedSplit(Sequence[Example]):
    """The conversations of one split that fit `max_seq_len`, read from a tokenized Arrow table.

    Attributes:
        name: where the records came from (a file, or SOURCE (split)), for messages.
        lengths: tokens of each kept conversation, in order.
        num_records: conversations in the split.
        num_too_long: conversations left out for being longer than `max_seq_len`.
    """

    def __init__(
        self, tokenized: Dataset, *, max_seq_len: int, name: str, rows: np.ndarray | None = None
    ) -> None:
        """
        Args:
            tokenized: from `tokenize_split` (no indices mapping).
            max_seq_len: longest conversation kept, in tokens.
            name: where the records came from, for messages.
            rows: the records of `tokenized` this split holds, in order (default: all).
        """
        table = tokenized.data.table  # memory-mapped: nothing below copies a token
        all_lengths = table.column("length").to_numpy()
        rows = np.arange(len(all_lengths)) if rows is None else np.asarray(rows, dtype=np.int64)
        lengths = all_lengths[rows]
        self.name = name
        self.max_seq_len = max_seq_len
        self.num_records = len(rows)
        fits = lengths <= max_seq_len
        self._rows = rows[fits]
        self.lengths: list[int] = lengths[fits].tolist()
        self.num_too_long = self.num_records - len(self._rows)
        self.tokenized = tokenized
        ids, labels = table.column("input_ids"), table.column("labels")
        self._chunk_starts = np.cumsum([0] + [len(c) for c in ids.chunks[:-1]])
        # Per Arrow chunk: list offsets into the flat values (both zero-copy numpy views).
        self._ids = [(c.offsets.to_numpy(), c.values.to_numpy()) for c in ids.chunks]
        self._labels = [(c.offsets.to_numpy(), c.values.to_numpy()) for c in labels.chunks]

    def __len__(self) -> int:
        return len(self.lengths)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...
    def __getitem__(self, i: int | slice) -> Example | list[Example]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = int(self._rows[i])
        chunk = int(np.searchsorted(self._chunk_starts, row, side="right")) - 1
        r = row - int(self._chunk_starts[chunk])
        (id_off, id_val), (lab_off, lab_val) = self._ids[chunk], self._labels[chunk]
        return Example(
            input_ids=id_val[id_off[r] : id_off[r + 1]].tolist(),
            labels=lab_val[lab_off[r] : lab_off[r + 1]].tolist(),
        )

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def describe_dropped(self) -> str:
        """'NAME: N of M conversations are longer than max_seq_len=L tokens; left out' (or '')."""
        if not self.num_too_long:
            return ""
        return (
            f"{self.name}: {self.num_too_long} of {self.num_records} conversations are longer than "
            f"max_seq_len={self.max_seq_len} tokens; left out"
        )


def _encode_batch(
    batch: dict[str, list[Any]], indices: list[int], *, tokenizer: Any, train_on: TrainOn
) -> dict[str, list[Any]]:
    """`Dataset.map` function: a batch of records -> input_ids, labels, length (module level: it is pickled)."""
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": []}
    for index, messages in zip(indices, batch["messages"], strict=True):
        if not isinstance(messages, list):
            raise BadRecord(index, 'expected an object with a "messages" list')
        try:
            example = make_example(tokenizer, messages, train_on=train_on)
        except ValueError as e:
            raise BadRecord(index, str(e)) from None
        out["input_ids"].append(example.input_ids)
        out["labels"].append(example.labels)
        out["length"].append(len(example))
    return out


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides a tokenizer's ids: vocabulary, merges, normalizer (its tokenizer.json),
    special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()


def _encoder_fingerprint() -> str:
    """A hash of the encoder's source (templates, formats, this module): a change re-tokenizes."""
    h = hashlib.sha256()
    for module in _ENCODER_MODULES:
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def tokenized_cache_dir() -> Path:
    """Where the tokenized Arrow files go: HF_DATASETS_CACHE/slackdist-tokenized."""
    return Path(datasets_config.HF_DATASETS_CACHE) / CACHE_SUBDIR


def tokenize_split(
    records: Dataset, tokenizer: PreTrainedTokenizerBase, *, train_on: TrainOn, desc: str
) -> Dataset:
    """Tokenize a split of chat records (a `messages` column) with `Dataset.map`, cached by fingerprint.

    Args:
        records: the split.
        tokenizer: tokenizer with our chat template.
        train_on: which tokens carry the loss (see `make_example`).
        desc: the progress bar's label.

    Returns:
        A memory-mapped dataset with input_ids, labels (int32 lists) and length, one row per record.

    Raises:
        BadRecord: a record without a messages list, or with a malformed message (its row index).
    """
    key = hashlib.sha256(
        "\0".join(
            [records._fingerprint, tokenizer_fingerprint(tokenizer), train_on, _encoder_fingerprint()]
        ).encode()
    ).hexdigest()[:32]
    cache = tokenized_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    workers = min(os.cpu_count() or 1, 1 + len(records) // ROWS_PER_WORKER)
    if workers > 1:
        # Workers are forked after the tokenizer has run: its Rust thread pool must not be inherited.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return records.map(
        _encode_batch,
        batched=True,
        with_indices=True,
        remove_columns=records.column_names,
        features=TOKENIZED_FEATURES,
        fn_kwargs={"tokenizer": tokenizer, "train_on": train_on},
        new_fingerprint=key,
        cache_file_name=str(cache / f"{key}.arrow"),
        num_proc=workers if workers > 1 else None,
        desc=desc,
    )


def load_split(
    source: DataSource,
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_on: TrainOn,
    max_seq_len: int,
) -> TokenizedSplit:
    """Tokenize one split of an opened source and keep the conversations up to `max_seq_len` tokens.

    Args:
        source: from `open_data`.
        split: the split's name.
        tokenizer: tokenizer with our chat template.
        train_on: which tokens carry the loss.
        max_seq_len: longest conversation kept, in tokens.

    Raises:
        SlackdistError: no such split, no messages column, or a malformed record, named by file and line
            (JSON Lines) or split and row.
    """
    records = source.records(split)
    name = source.where(split)
    if records is None:  # an empty file: nothing to tokenize (or to cache)
        empty = Dataset.from_dict({"input_ids": [], "labels": [], "length": []}, features=TOKENIZED_FEATURES)
        return TokenizedSplit(empty, max_seq_len=max_seq_len, name=name)
    try:
        tokenized = tokenize_split(records, tokenizer, train_on=train_on, desc=f"tokenizing {name}")
    except BadRecord as e:
        raise SlackdistError(source.locate(split, e.row, e.problem)) from None
    return TokenizedSplit(tokenized, max_seq_len=max_seq_len, name=name)


def load_examples(
    data: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_on: TrainOn,
    max_seq_len: int,
    split: str = "train",
) -> TokenizedSplit:
    """Tokenized conversations of one split of `data` (anything `open_data` reads; a file is split "train").

    Raises:
        SlackdistError: unreadable data, no such split, or a malformed record (file:line).
    """
    source = open_data(str(data))
    return load_split(source, split, tokenizer, train_on=train_on, max_seq_len=max_seq_len)
