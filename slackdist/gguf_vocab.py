"""The tokenizer half of a GGUF file: what llama.cpp needs to tokenize exactly as transformers does.

Byte-level BPE only (Llama 3, Qwen2, SmolLM, GPT-2 style): the token strings and types for every id of the
embedding (the converter's `get_vocab_base`), the merges and special ids (read by gguf's `SpecialVocab`, the
converter's reader), `tokenizer.ggml.pre` naming the pre-tokenizer llama.cpp re-implements, and the chat
template without the `{% generation %}` markers only transformers knows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slackdist.errors import SlackdistError
from slackdist.model.tiny import LLAMA3_SPLIT_PATTERN

if TYPE_CHECKING:
    import gguf
    from transformers import PreTrainedTokenizerBase

QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `{% generation %}` / `{% endgeneration %}` mark assistant tokens for transformers' masks; other Jinja
# engines (llama.cpp's, Jinja2 in llama-cpp-python) reject the unknown tag, and it renders nothing anyway.
_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


def import_gguf() -> Any:
    """The gguf package, or a one-line error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise SlackdistError(
            "the gguf package is not installed: pip install 'slackdist[gguf]' (or pip install gguf)"
        ) from None
    return gguf


def strip_generation_markers(template: str) -> str:
    """The chat template without `{% generation %}` / `{% endgeneration %}` (they render nothing)."""
    return _GENERATION_TAG.sub("", template)


def bpe_pre_tokenizer(tokenizer_json: dict[str, Any], source: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a byte-level BPE tokenizer.json.

    llama.cpp does not read the split regex from the file: it compiles a fixed list of pre-tokenizers and
    picks one by this name. The converter picks it by hashing the tokenization of a test string with known
    vocabularies; a fine-tuned or locally built tokenizer has no known hash, so the name is chosen here from
    the pre-tokenizer itself.

    Raises:
        SlackdistError: not byte-level BPE, or a split llama.cpp does not implement under a known name.
    """
    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if model.get("type") != "BPE" or not byte_level:
        raise SlackdistError(
            f"{source}: only byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM, GPT-2 style) can be exported; "
            f"this one is {model.get('type', '?')} with pre-tokenizer {pre.get('type', 'none')} "
            "(SentencePiece vocabularies need llama.cpp's convert_hf_to_gguf.py)"
        )
    splits = [(p.get("pattern") or {}).get("Regex") for p in parts if p.get("type") == "Split"]
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts)
    uses_regex = bool(byte_level[0].get("use_regex", True))
    if splits == [LLAMA3_SPLIT_PATTERN]:
        return "llama-bpe"
    if splits == [QWEN2_SPLIT_PATTERN]:
        return "qwen2"
    if not splits and uses_regex and digits and len(parts) == 2:
        return "smollm"
    if not splits and uses_regex and len(parts) == 1:
        return "gpt-2"
    raise SlackdistError(
        f"{source}: pre-tokenizer {json.dumps(pre)[:120]} is not one llama.cpp implements under a known name"
    )


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding plain text prepends the begin-of-text token (llama.cpp's `add_bos_token`)."""
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def vocab_entries(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..vocab_size-1 (the converter's `get_vocab_base`).

    Ids the tokenizer does not use (the embedding is padded to a round size) become `[PADi]`, UNUSED.

    Raises:
        SlackdistError: the tokenizer has ids beyond the model's vocab_size.
    """
    g = import_gguf()
    reverse = {i: tok for tok, i in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise SlackdistError(
            f"tokenizer has token id {max(reverse)} but the model's vocab_size is {vocab_size}"
        )
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(g.TokenType.UNUSED)
            continue
        if token in added:
            info = decoder[i]
            if not info.normalized:  # llama.cpp expects added tokens in their normalized form
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            kind = g.TokenType.CONTROL if info.special or _looks_special(token) else g.TokenType.USER_DEFINED
        else:
            kind = g.TokenType.NORMAL
        tokens.append(token)
        types.append(kind)
    return tokens, types


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """Tokenizer metadata: model, pre-tokenizer, tokens, types, merges, special ids, flags, chat template."""
    from slackdist.model.load import load_tokenizer

    g = import_gguf()
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise SlackdistError(f"{folder}: no tokenizer.json (a fast tokenizer is needed)")
    tokenizer = load_tokenizer(str(folder))
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise SlackdistError(f"{folder}: the tokenizer is not a fast (tokenizers) one")
    # The pre-tokenizer transformers really runs: its tokenizer class can replace tokenizer.json's (a Qwen2
    # folder gets Qwen2's digit split whatever the file says).
    pre = bpe_pre_tokenizer(json.loads(tokenizer.backend_tokenizer.to_str()), path)
    tokens, types = vocab_entries(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # gguf's SpecialVocab is the converter's reader of merges, special ids and add-bos/eos flags. It warns
    # about the pair template (`bos A bos B`) of Llama 3 tokenizers, which llama.cpp never uses.
    with _quiet_logger("gguf.vocab"):
        special = g.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise SlackdistError(f"{path}: no BPE merges")
    vocab = tokenizer.get_vocab()
    for kind, token in (
        ("bos", tokenizer.bos_token),
        ("eos", tokenizer.eos_token),
        ("pad", tokenizer.pad_token),
    ):
        if token is not None and token in vocab:
            special.special_token_ids[kind] = vocab[token]
    for end_of_turn in ("<|eot_id|>", "<|im_end|>"):
        if end_of_turn in vocab:
            special.special_token_ids.setdefault("eot", vocab[end_of_turn])
            break
    # What the tokenizer does, not what its config files say (older gguf versions miss the post-processor)
    ids = tokenizer("x")["input_ids"]
    special.add_special_token["bos"] = adds_bos(tokenizer)
    special.add_special_token["eos"] = bool(ids) and ids[-1] == tokenizer.eos_token_id
    template = getattr(tokenizer, "chat_template", None)
    special.chat_template = strip_generation_markers(template) if isinstance(template, str) else None
    special.add_to_gguf(writer, quiet=True)
