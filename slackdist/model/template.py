"""The Llama 3 chat template and the one function that turns messages into token ids.

Training (labels), chat, serve and eval all build ids through `encode_chat`, so the
prompt a tuned model sees at inference is byte-for-byte the prefix it was trained on.

The template renders exactly like Meta's Llama 3 template for plain system / user /
assistant messages (`<|begin_of_text|>`, `<|start_header_id|>role<|end_header_id|>` +
two real newlines, the trimmed content, `<|eot_id|>`), without the 3.1+ "Cutting
Knowledge Date" / tools boilerplate, and marks each assistant turn's content and its
closing `<|eot_id|>` with `{% generation %}` so transformers can return the mask of
tokens that carry the loss.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
)
LLAMA3_PAD_TOKEN = "<|finetune_right_pad_id|>"
LLAMA3_EOT_TOKEN = "<|eot_id|>"

# Jinja string literals unescape "\n", so the rendered text holds real newlines.
# `| trim` is what Meta's template does to every message's content.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)

# For base models whose tokenizer has no Llama 3 header tokens: same shape, plain-text
# headers, the model's own eos closes each turn. Nothing here is a Llama token.
GENERIC_CHAT_TEMPLATE = (
    "{{- bos_token if bos_token else '' -}}"
    "{%- for message in messages -%}"
    "{{- '### ' + message['role'] + ':\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] | trim + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] | trim + eos_token -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '### assistant:\\n' -}}"
    "{%- endif -%}"
)


def has_llama3_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether every token the Llama 3 template writes is a single special token of this tokenizer."""
    vocab = tokenizer.get_vocab()
    return all(tok in vocab for tok in LLAMA3_SPECIAL_TOKENS[:5])


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer our chat template (with generation markers) and a pad token.

    A tokenizer that already has a template with `{% generation %}` markers keeps it
    (a model we trained and saved). Any other template is replaced: Llama 3 tokenizers
    get `LLAMA3_CHAT_TEMPLATE`, others `GENERIC_CHAT_TEMPLATE` (with a warning). The pad
    token is `<|finetune_right_pad_id|>` where the vocabulary has it, else eos.

    Args:
        tokenizer: a Hugging Face fast tokenizer; changed in place.

    Returns:
        The same tokenizer.

    Raises:
        ValueError: the tokenizer has neither a Llama 3 vocabulary nor an eos token.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not (isinstance(template, str) and "generation" in template and "endgeneration" in template):
        if has_llama3_tokens(tokenizer):
            if tokenizer.bos_token != "<|begin_of_text|>":
                tokenizer.bos_token = "<|begin_of_text|>"
            tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
        else:
            if tokenizer.eos_token is None:
                raise ValueError(
                    "tokenizer has no Llama 3 special tokens and no eos token: cannot build chats"
                )
            logger.warning(
                "tokenizer has no Llama 3 header tokens; using a plain-text chat template ('### role:') "
                "ending each turn with %s",
                tokenizer.eos_token,
            )
            tokenizer.chat_template = GENERIC_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = LLAMA3_PAD_TOKEN if LLAMA3_PAD_TOKEN in vocab else tokenizer.eos_token
    return tokenizer


def chat_template_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """Which template the tokenizer renders: "llama3", "generic", or "own" (one it brought itself)."""
    names = {LLAMA3_CHAT_TEMPLATE: "llama3", GENERIC_CHAT_TEMPLATE: "generic"}
    template = getattr(tokenizer, "chat_template", None)
    return names.get(template, "own") if isinstance(template, str) else "own"


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a reply: eos, and `<|eot_id|>` / `<|end_of_text|>` where the vocabulary has them."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for tok in (LLAMA3_EOT_TOKEN, "<|end_of_text|>"):
        if tok in vocab and vocab[tok] not in ids:
            ids.append(vocab[tok])
    return ids


def _check_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': str}}, got {m!r:.80}"
            )
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and the mask of tokens an assistant wrote.

    The one function training, chat, serve and eval use to build ids. The mask is 1 on
    each assistant turn's content and its closing end-of-turn token, 0 on the begin
    token, headers, system and user turns and the generation prompt.

    Args:
        tokenizer: a fast tokenizer with a chat template that has generation markers
            (see `ensure_chat_template`).
        messages: `[{"role": "system"|"user"|"assistant", "content": str}, ...]`; extra keys are ignored.
        add_generation_prompt: append the assistant header, for generating the next reply.

    Returns:
        (input_ids, assistant_mask), two lists of the same length.

    Raises:
        ValueError: a message without a known role or string content, or a template without
            generation markers.
    """
    out = tokenizer.apply_chat_template(
        _check_messages(messages),
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def build_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[int]:
    """Ids of a chat prompt ending with the assistant header, ready for `generate`.

    Raises:
        ValueError: as `encode_chat`.
    """
    return encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
