"""Causal-LM loss that never materialises the full `[B, T, vocab]` logits.

With a 128k vocabulary, fp32 logits for one 8192-token row take 4 GB, and their
gradient as much again. `chunked_lm_loss` first keeps only the positions that carry a
label (with assistant-only loss most tokens don't), then runs `lm_head` + fp32
cross-entropy over chunks of those positions, each chunk under non-reentrant
activation checkpointing: the forward keeps no logits, the backward recomputes one
chunk at a time. Peak extra memory is one chunk's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def logit_softcap(model: torch.nn.Module) -> float | None:
    """The model's final logit soft-cap (Gemma 2: 30.0), which its forward applies after lm_head; else None."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "final_logit_softcapping", None)


def _chunk_loss(
    lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    logits = lm_head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int,
    *,
    softcap: float | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, computed in chunks.

    Position t predicts `labels[:, t + 1]` (the one-token shift happens here); positions
    whose shifted label is -100 are skipped before `lm_head` runs.

    Args:
        hidden: final hidden states `[B, T, H]` (after the last norm).
        lm_head: the output projection (a LoRA-wrapped Linear is fine).
        labels: `[B, T]` token ids, -100 where no loss is taken.
        chunk_size: labelled positions per chunk; 0 = all at once without checkpointing
            (the plain path).
        softcap: `logit_softcap(model)`: cap the logits at +-softcap with tanh, as the model's own
            forward does after lm_head.
        positions: the flat indices `b * T + t` of the positions whose next label counts
            (`collate`'s `label_positions`, counted on the CPU). Without them they are found here
            on the device, which waits for the forward to finish (a GPU sync) before the loss and
            the backward can be queued.

    Returns:
        (loss_sum, n_tokens): fp32 scalar sum over labelled tokens (divide by the token
        count of the whole optimizer step, across accumulation and ranks), and the number of
        labelled tokens here.
    """
    if positions is None:
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        selected = hidden[:, :-1][keep]  # [N, H]
        targets = targets[keep]  # [N]
    else:
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        targets = labels.reshape(-1).index_select(0, positions + 1)  # b*T + t + 1 is labels[b, t + 1]
    n_tokens = targets.numel()
    if n_tokens == 0:
        # Keep the graph connected so backward() and DDP gradient hooks still run.
        return hidden.sum().float() * 0.0, 0
    if chunk_size <= 0:
        return _chunk_loss(lm_head, selected, targets, softcap), n_tokens
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n_tokens, chunk_size):
        end = start + chunk_size
        total = total + checkpoint(
            _chunk_loss, lm_head, selected[start:end], targets[start:end], softcap, use_reentrant=False
        )
    return total, n_tokens
