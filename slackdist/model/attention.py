"""Variable-length (packed-row) attention for transformers models, without the flash-attn package.

`register_varlen_attention()` registers the attention implementation "slackdist_varlen"
with transformers' `AttentionInterface`. It runs `torch.nn.attention.varlen.varlen_attn`
(torch >= 2.10, FlashAttention-2 kernel inside torch, CUDA only) over the sequences of a
packed batch: a row `[B, T]` holding several conversations is flattened to one varlen
batch whose boundaries come from `position_ids` (a new sequence starts where the position
does not continue by +1, e.g. restarts at 0) or from `cu_seq_lens_q` / `max_length_q`
passed to the model call. No token attends across a boundary and no work is spent on
the cross-conversation blocks that SDPA's dense block mask would still compute.

No mask function is registered for "slackdist_varlen" on purpose: transformers'
`masking_utils._preprocess_mask_arguments` returns `None` for an implementation that is
not in `ALL_MASK_ATTENTION_FUNCTIONS`, so no dense `[B, 1, T, T]` mask is built and no
packed-sequence detection runs (it would sync the GPU every layer). The flip side: a 2D
`attention_mask` is ignored, so rows must be right-padded with padding as its own
sequence (what `slackdist.train.packing.collate` does). This implementation is for
training; generation with a KV cache falls back to SDPA.

On CPU the torch kernel does not exist; the module imports fine and the same function
runs a per-sequence SDPA reference instead (used by the CPU tests).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

VARLEN_ATTENTION = "slackdist_varlen"


def varlen_available(device: torch.device | str | None = None) -> bool:
    """Whether torch's fused varlen kernel can run on `device` (CUDA, torch >= 2.10)."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.is_available() and _varlen_kernel() is not None


@functools.cache
def _varlen_kernel() -> Callable[..., torch.Tensor] | None:
    """`torch.nn.attention.varlen.varlen_attn`, or None before torch 2.10 (so imported here only)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sequence starts of a (packed) batch, flattened row by row.

    A sequence starts at the beginning of every row and wherever a position is not the
    previous position + 1 (packing restarts positions at 0 for each conversation).

    Args:
        position_ids: `[B, T]` or `[T]` integer positions.

    Returns:
        (cu_seqlens, max_len): int32 tensor `[N + 1]` on the same device, starting at 0 and
        ending at `B * T`; and the longest sequence length as a Python int.
    """
    pos = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
    batch, length = pos.shape
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    idx = starts.reshape(-1).nonzero().flatten()
    total = torch.tensor([batch * length], device=pos.device, dtype=idx.dtype)
    cu = torch.cat([idx, total]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item())
    return cu, max_len


def varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """Model-call kwargs with the sequence boundaries, computed once per batch (not per layer).

    `model(input_ids=..., position_ids=..., **varlen_kwargs(position_ids))`; transformers
    passes them down to the attention function untouched (the flash-attention names).
    """
    cu, max_len = cu_seqlens_from_position_ids(position_ids)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}


# One-entry memo: every layer of one forward (and its recomputation under checkpointing)
# sees the same position_ids tensor; compute the boundaries (a GPU sync) once. The memo
# holds the tensor itself so its memory cannot be reused by a later batch with the same
# address, which would make the key match stale boundaries.
_memo: dict[str, Any] = {"key": None, "tensor": None, "value": None}


def _boundaries(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    key = (
        position_ids.data_ptr(),
        tuple(position_ids.shape),
        position_ids.stride(),
        position_ids._version,
        str(position_ids.device),
    )
    if _memo["key"] != key:
        _memo.update(key=key, tensor=position_ids, value=cu_seqlens_from_position_ids(position_ids))
    return _memo["value"]


_gqa_state = {"native": True}


@functools.cache
def _kernel_takes_gqa() -> bool:
    return "enable_gqa" in inspect.signature(_varlen_kernel()).parameters


def _reference_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """Causal attention per sequence with SDPA: the CPU stand-in for the fused kernel. q/k/v: [N, H, D]."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def _fused_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float | None
) -> torch.Tensor:
    """torch's FlashAttention-2 varlen kernel, causal, over q `[N, Hq, D]`, k/v `[N, Hkv, D]`."""
    varlen_attn = _varlen_kernel()

    def run(k: torch.Tensor, v: torch.Tensor, **extra: Any) -> torch.Tensor:
        # window_size=(-1, 0) is causal: this kernel has no is_causal flag
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0), **extra)

    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return run(k, v)
    if _kernel_takes_gqa():
        return run(k, v, enable_gqa=True)
    # torch 2.11's kernel has no enable_gqa flag but takes fewer kv heads as they are (measured
    # on an H100: same output as repeating them, a little faster, no copies). Should a torch
    # version refuse them, expand the kv heads from then on.
    if _gqa_state["native"]:
        try:
            return run(k, v)
        except RuntimeError:
            _gqa_state["native"] = False
    return run(k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1))


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q `[B, Hq, T, D]`, k/v `[B, Hkv, T, D]` -> `[B, T, Hq, D]`.

    Raises:
        ValueError: attention dropout > 0 (the kernel has none; Llama uses 0).
    """
    batch, heads, length, head_dim = query.shape
    if key.shape[2] != length or attention_mask is not None:
        # A KV cache (generation) or an explicit mask: not the packed-training case.
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError(f"{VARLEN_ATTENTION} attention has no dropout (got attention_dropout={dropout})")

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu, max_len = cu.to(query.device, non_blocking=True), int(kwargs["max_length_q"])
    elif kwargs.get("position_ids") is not None:
        cu, max_len = _boundaries(kwargs["position_ids"].expand(batch, -1))
    else:  # one sequence per row
        cu = torch.arange(0, (batch + 1) * length, length, device=query.device, dtype=torch.int32)
        max_len = length

    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(batch * length, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * length, kv_heads, head_dim)
    v = value.transpose(1, 2).reshape(batch * length, kv_heads, head_dim)
    if query.device.type == "cuda":
        out = _fused_varlen(q, k, v, cu, max_len, scaling)
    else:
        if kv_heads != heads:
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        out = _reference_varlen(q, k, v, cu, scaling)
    return out.view(batch, length, heads, head_dim), None


def register_varlen_attention() -> str:
    """Register "slackdist_varlen" with transformers (idempotent) and return its name.

    Pass the name as `attn_implementation` to `from_pretrained` or set it on a loaded
    model with `model.set_attn_implementation(name)`.
    """
    # Outside any compiled graph: the sequence boundaries change with every batch
    # (slackdist.model.compilation).
    AttentionInterface.register(VARLEN_ATTENTION, torch.compiler.disable(varlen_attention_forward))
    return VARLEN_ATTENTION
