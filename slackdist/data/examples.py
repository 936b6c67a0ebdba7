"""Prepared JSONL files -> chat records -> token ids with labels.

`read_records` reads train.jsonl / validation.jsonl / test.jsonl as `slackdist prepare` writes them;
`load_examples` turns their conversations into `Example`s through `encode_chat`, the encoder chat and
serve use too, so training (`slackdist.train`) and `slackdist eval` label the same tokens.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tqdm.auto import tqdm

from slackdist.errors import SlackdistError
from slackdist.model.loss import IGNORE_INDEX
from slackdist.model.template import encode_chat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One conversation as token ids and labels (-100 where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


class Examples(list):
    """`list[Example]` that also says how many records were read and how many were too long."""

    num_records: int = 0
    num_too_long: int = 0


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The records of a JSONL file with their line numbers (blank lines skipped).

    Raises:
        SlackdistError: missing or unreadable file, a line that is not JSON, or a record without a
            "messages" list (file:line).
    """
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
