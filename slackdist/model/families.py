"""Which chat format and which LoRA module names a model gets, from its family.

`model.chat_template` chooses the format:

- `auto` (the default): the tokenizer's own template when it has generation markers (so it can say
  which tokens the assistant wrote: a model folder slackdist wrote has ours), else the format of the
  model's family, from `config.json`'s `model_type` (`llama` is Llama 3 or ChatML, told apart by the
  vocabulary: SmolLM2 is a Llama with ChatML tokens). A model of no family we know gets the format
  its vocabulary points to, or the plain-text `generic` one, with a warning that names the key.
- `llama3`, `chatml`, `mistral`, `gemma`, `phi3`: that format (the tokenizer must have its tokens).
- `tokenizer`: the tokenizer's own template, which must have generation markers.

LoRA targets are written with Llama's module names (`q_proj`, ..., `down_proj`, `lm_head`);
families that fuse projections get the fused module instead (Phi-3: `qkv_proj`, `gate_up_proj`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoConfig

from slackdist.model.chat_formats import (
    CHAT_FORMATS,
    CHATML,
    GEMMA,
    GENERIC,
    LLAMA3,
    MISTRAL,
    PHI3,
    ChatFormat,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_KEY = "model.chat_template"

FORMATS_BY_MODEL_TYPE: dict[str, tuple[ChatFormat, ...]] = {
    "llama": (LLAMA3, CHATML),
    "qwen2": (CHATML,),
    "qwen2_moe": (CHATML,),
    "qwen3": (CHATML,),
    "qwen3_moe": (CHATML,),
    "mistral": (MISTRAL,),
    "mixtral": (MISTRAL,),
    "gemma": (GEMMA,),
    "gemma2": (GEMMA,),
    "gemma3": (GEMMA,),
    "gemma3_text": (GEMMA,),
    "phi3": (PHI3,),
}
"""Candidate formats of each model type, in order; the first whose tokens the vocabulary has wins."""

FUSED_LORA_TARGETS: dict[str, dict[str, str]] = {
    "phi3": {
        "q_proj": "qkv_proj",
        "k_proj": "qkv_proj",
        "v_proj": "qkv_proj",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
    },
}
"""Llama module names -> the module that holds them, for families that fuse projections."""


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def read_model_type(name_or_path: str) -> str | None:
    """`model_type` of a model folder's config.json (a hub id: through transformers' cache), or None."""
    config = Path(name_or_path) / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None
    if Path(name_or_path).exists():  # a local folder without config.json (a tokenizer alone)
        return None
    try:
        return getattr(AutoConfig.from_pretrained(name_or_path), "model_type", None)
    except (OSError, ValueError):
        return None


def has_generation_markers(template: object) -> bool:
    """Whether a chat template can mark assistant tokens (`{% generation %}` ... `{% endgeneration %}`)."""
    return isinstance(template, str) and bool(_GENERATION_TAG.search(template))


def missing_tokens(fmt: ChatFormat, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The format's control tokens that are not single tokens of this tokenizer."""
    vocab = tokenizer.get_vocab()
    return [tok for tok in fmt.control_tokens if tok not in vocab]


def _fits(fmt: ChatFormat, tokenizer: PreTrainedTokenizerBase) -> bool:
    return not missing_tokens(fmt, tokenizer)


def _by_vocabulary(tokenizer: PreTrainedTokenizerBase) -> ChatFormat | None:
    """The one family format whose tokens the vocabulary has (Mistral's `<s>` / `</s>` prove nothing)."""
    fits = [fmt for fmt in (LLAMA3, CHATML, GEMMA, PHI3) if _fits(fmt, tokenizer)]
    return fits[0] if len(fits) == 1 else None


def resolve_chat_format(
    choice: str, tokenizer: PreTrainedTokenizerBase, model_type: str | None, *, source: str = "model"
) -> ChatFormat | None:
    """The format a model trains and chats with; None keeps the tokenizer's own template.

    Args:
        choice: `model.chat_template` (see the module docstring).
        tokenizer: the model's tokenizer.
        model_type: `config.json`'s `model_type` (`read_model_type`), or None when unknown.
        source: the model's name, for messages.

    Returns:
        The chosen format, or None for the tokenizer's own template.

    Raises:
        ValueError: an unknown choice, a format whose tokens the tokenizer lacks, or `tokenizer`
            for a template without generation markers.
    """
    own = getattr(tokenizer, "chat_template", None)
    if choice == "tokenizer":
        if not has_generation_markers(own):
            raise ValueError(
                f"{CHAT_TEMPLATE_KEY}=tokenizer: the tokenizer of {source} has no chat template with "
                "{% generation %} markers; choose one of "
                + ", ".join(sorted(set(CHAT_FORMATS) - {"generic"}))
            )
        return None
    if choice != "auto":
        fmt = CHAT_FORMATS.get(choice)
        if fmt is None:
            raise ValueError(f"{CHAT_TEMPLATE_KEY}={choice!r}: unknown chat template")
        missing = missing_tokens(fmt, tokenizer)
        if missing:
            raise ValueError(
                f"{CHAT_TEMPLATE_KEY}={choice}: the tokenizer of {source} has no {', '.join(missing)} token"
            )
        return fmt
    if has_generation_markers(own):
        return None
    candidates = FORMATS_BY_MODEL_TYPE.get(model_type or "", ())
    for fmt in candidates:
        if _fits(fmt, tokenizer):
            return fmt
    guess = _by_vocabulary(tokenizer)
    if candidates:  # e.g. a Llama 2 vocabulary: model type llama, neither Llama 3 nor ChatML tokens
        names = " or ".join(f.name for f in candidates)
        unknown = f"{source}: model type {model_type!r}, but the vocabulary lacks the tokens of {names}"
    elif model_type:
        unknown = f"{source}: model type {model_type!r} is not a family slackdist knows"
    else:
        unknown = f"{source}: no config.json says which family the model is"
    if guess is not None:
        logger.warning(
            "%s; its vocabulary has %s's tokens, so it gets the %s chat template (set %s to choose another)",
            unknown,
            guess.name,
            guess.name,
            CHAT_TEMPLATE_KEY,
        )
        return guess
    if tokenizer.eos_token is None:
        raise ValueError(
            f"{unknown}, its vocabulary has no family's tokens and no eos token; set {CHAT_TEMPLATE_KEY}"
        )
    logger.warning(
        "%s and its vocabulary has no family's tokens; using a plain-text template ('### role:' turns ending "
        "with %s). Set %s to one of llama3, chatml, mistral, gemma, phi3, tokenizer if the model has one",
        unknown,
        tokenizer.eos_token,
        CHAT_TEMPLATE_KEY,
    )
    return GENERIC


def lora_targets(model_type: str | None, targets: list[str]) -> list[str]:
    """LoRA target module names for this family: Llama names mapped to fused modules where the family fuses them.

    Args:
        model_type: `config.model_type`.
        targets: `lora.target_modules` (Llama names, or the family's own).

    Returns:
        The names, each once, in order.
    """
    fused = FUSED_LORA_TARGETS.get(model_type or "", {})
    out: list[str] = []
    for name in targets:
        mapped = fused.get(name, name)
        if mapped not in out:
            out.append(mapped)
    return out
