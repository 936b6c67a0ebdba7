"""Fold a LoRA adapter into its base weights in memory (`slackdist merge` writes the result; chat,
serve and eval use it directly for the fast decode path).

Tied embeddings (Llama 3.2 1B/3B): with a LoRA on `lm_head`, the merged output projection is
embedding + delta while the input embedding must stay the base embedding. So the merge unties
first: lm_head gets its own copy of the embedding and `tie_word_embeddings` becomes False. Without
a LoRA on lm_head or the embedding the tie is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraLayer


def untie_adapted_embeddings(peft_model: Any) -> bool:
    """Give lm_head its own copy of a tied embedding when a LoRA sits on either of them; True if untied.

    Done after the adapter is loaded and before merging, on the base layer under the LoRA wrapper:
    merging into a still-shared tensor would apply the delta to both the input embedding and
    lm_head (and with PEFT's `ensure_weight_tying`, where lm_head's LoRA is the embedding's LoRA
    transposed, it would apply it twice; peft 0.21 does exactly that).
    """
    base = peft_model.get_base_model()
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if not getattr(config, "tie_word_embeddings", False):
        return False
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    if out is None or not any(isinstance(m, LoraLayer) for m in (inp, out)):
        return False
    target = out.get_base_layer() if isinstance(out, LoraLayer) else out
    target.weight = torch.nn.Parameter(target.weight.detach().clone(), requires_grad=False)
    config.tie_word_embeddings = False
    base.config.tie_word_embeddings = False
    return True


def _retie_if_equal(model: Any) -> None:
    """Tie the embeddings again when the merge left them equal (PEFT's `ensure_weight_tying` adapters)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if torch.equal(inp.weight, out.weight):
        out.weight = inp.weight
        model.config.tie_word_embeddings = True
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = True


def merge_lora(peft_model: Any) -> Any:
    """The plain model with the adapter folded into its (16-bit or fp32) weights; the PEFT wrapper is gone.

    Never call it on a 4-bit base: merging into NF4 weights would re-quantize the sum and lose most
    of the adapter.
    """
    untied = untie_adapted_embeddings(peft_model)
    merged = peft_model.merge_and_unload(safe_merge=True)
    if untied:
        _retie_if_equal(merged)
    return merged
