"""How a training step uses GPU memory: measured at start-up, then the fastest plan that fits.

Two things decide speed at a fixed optimizer step (rows per step = micro-batch x accumulation):
how many of the step's rows go through one forward, and how many decoder layers recompute their
activations in backward (gradient checkpointing). On an H100 the host's work to launch a forward +
backward of the compiled 3B model hardly depends on its length: four 2048-token rows in four
forwards take about three times as long as in one (GPU busy 19% against 67%), while recomputing
every layer costs 30-40% (bench/README.md). So the plan puts as many rows in one forward as fit,
then checkpoints as few layers as it must for them to fit.

The plan never changes what is learned: every plan trains on the same rows per optimizer step and
normalises the loss by the same label tokens, so only the dropout masks' order differs.

Activation memory is measured, not guessed: `measure_footprint` runs forward + backward on two
short packed rows with no layer and with every layer checkpointed and fits
`peak = fixed + per_token x tokens` for each (fixed: the loss chunk's logits, gradients' first
allocation); checkpointing k of L layers sits k/L of the way between them. `choose_plan` then
picks the fastest candidate whose estimate fits the budget: `train.memory_budget_gib`, by default
70% of the GPU (15.6 GiB of a 24 GB card, 56 GiB of an 80 GB one), never beyond 90% of the GPU or
of `train.max_memory_gib`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

GIB = 2**30
AUTO_BUDGET_FRACTION = 0.7
"""Share of the GPU (or of `max_memory_gib`) the plan fills when `memory_budget_gib` is 0."""
GPU_FRACTION = 0.9
"""Share of the GPU (or of `max_memory_gib`) no plan goes beyond, whatever `memory_budget_gib` says."""
SAFETY = 1.15
"""Margin on the measured per-token cost (allocator fragmentation, the longest rows' attention)."""


@dataclass(frozen=True)
class Footprint:
    """Peak memory of one training forward + backward as `fixed + per_token x tokens`, in bytes."""

    fixed: float
    per_token: float

    def estimate(self, tokens: int) -> float:
        """The peak for `tokens` tokens per forward, with the SAFETY margin on the per-token part."""
        return self.fixed + SAFETY * self.per_token * tokens


def partial_footprint(full: Footprint, ckpt: Footprint, share: float) -> Footprint:
    """The footprint with `share` of the decoder layers checkpointed: every layer holds the same
    activations, so the per-token cost moves linearly from `full` (share 0) to `ckpt` (share 1)."""
    if share <= 0:
        return full
    if share >= 1:
        return ckpt
    return Footprint(
        fixed=max(full.fixed, ckpt.fixed),
        per_token=full.per_token + share * (ckpt.per_token - full.per_token),
    )


@dataclass(frozen=True)
class MemoryPlan:
    """How one optimizer step runs: rows per forward, forwards per step, recomputed layers."""

    rows_per_forward: int
    accumulation: int
    checkpointed_layers: int
    layers: int
    estimated_gib: float | None = None
    reason: str = ""

    def describe(self) -> str:
        est = f", estimated peak {self.estimated_gib:.1f} GiB" if self.estimated_gib is not None else ""
        return (
            f"memory plan: {self.rows_per_forward} rows per forward x {self.accumulation} forwards per step, "
            f"gradient checkpointing on {self.checkpointed_layers} of {self.layers} layers{est} ({self.reason})"
        )


def fixed_plan(
    micro_batch_size: int, accumulation: int, gradient_checkpointing: bool, layers: int, reason: str
) -> MemoryPlan:
    """The configured micro-batch size, accumulation and checkpointing (all layers or none), unchanged."""
    return MemoryPlan(
        micro_batch_size, accumulation, layers if gradient_checkpointing else 0, layers, reason=reason
    )


def choose_plan(
    *,
    micro_batch_size: int,
    accumulation: int,
    row_tokens: int,
    layers: int,
    footprint_full: Footprint,
    footprint_ckpt: Footprint,
    budget_bytes: float,
    base_bytes: float = 0.0,
) -> MemoryPlan:
    """The fastest plan whose estimated peak fits `budget_bytes`.

    Candidates, fastest first: the most rows per forward (every divisor of the rows per step,
    largest first), and for each the fewest checkpointed layers that fit. If none fits, the
    configured micro-batch size with every layer checkpointed (the most frugal setting the user
    asked for).

    Args:
        micro_batch_size, accumulation: the configured split of an optimizer step (their product
            is kept).
        row_tokens: tokens in one packed row (max_seq_len; rows are padded to the batch's longest).
        layers: decoder layers that can be checkpointed.
        footprint_full, footprint_ckpt: measured with no layer / every layer checkpointed.
        budget_bytes: what the plan may fill, beyond what is already allocated.
        base_bytes: what is allocated already or reserved (weights, gradients, optimizer states):
            added to the estimates so they are whole-process peaks.
    """
    rows = micro_batch_size * accumulation
    sizes = [n for n in range(rows, 0, -1) if rows % n == 0]
    budget = f"{(budget_bytes + base_bytes) / GIB:.1f} GiB"
    for n in sizes:
        for k in range(layers + 1):
            footprint = partial_footprint(footprint_full, footprint_ckpt, k / layers if layers else 0.0)
            need = footprint.estimate(n * row_tokens)
            if need <= budget_bytes:
                return MemoryPlan(n, rows // n, k, layers, (need + base_bytes) / GIB, f"fits {budget}")
    need = footprint_ckpt.estimate(micro_batch_size * row_tokens)
    return MemoryPlan(
        micro_batch_size,
        accumulation,
        layers,
        layers,
        (need + base_bytes) / GIB,
        f"nothing fits in {budget}; the configured micro-batch with checkpointing",
    )


def fit_footprint(tokens: tuple[int, int], peaks: tuple[float, float]) -> Footprint:
    """`fixed + per_token x tokens` through two measured (tokens, peak) points."""
    (t1, t2), (p1, p2) = tokens, peaks
    per_token = max((p2 - p1) / (t2 - t1), 0.0)
    return Footprint(fixed=max(p1 - per_token * t1, 0.0), per_token=per_token)


def measure_footprint(run_step: Callable[[int], None], device: object, tokens: tuple[int, int]) -> Footprint:
    """Peak memory above the current allocation of `run_step(n)` (forward + backward of an
    n-token packed row, gradients cleared after) at two sizes, fitted to a line. CUDA only."""
    import torch

    peaks = []
    for n in tokens:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run_step(n)
        torch.cuda.synchronize(device)
        peaks.append(float(torch.cuda.max_memory_allocated(device) - before))
    return fit_footprint(tokens, (peaks[0], peaks[1]))


def _cuda_index(device: object) -> int:
    """`torch.device("cuda")` (Accelerate's device on one GPU) has no index; memory calls need one."""
    import torch

    index = getattr(device, "index", None)
    return torch.cuda.current_device() if index is None else index


def budget_target(total_bytes: float, budget_gib: float, max_memory_gib: float) -> float:
    """The whole-process peak the plan aims under, in bytes: `budget_gib` (0: AUTO_BUDGET_FRACTION
    of the cap), never more than GPU_FRACTION of the cap (`max_memory_gib`, else the GPU's memory)."""
    cap = min(max_memory_gib * GIB, total_bytes) if max_memory_gib > 0 else total_bytes
    if budget_gib > 0:
        return min(budget_gib * GIB, GPU_FRACTION * cap)
    return AUTO_BUDGET_FRACTION * cap


def memory_budget(
    device: object, budget_gib: float, max_memory_gib: float, extra_reserved_bytes: float
) -> tuple[float, float]:
    """(bytes the plan may fill, bytes taken already): `budget_target` minus what is allocated now
    and `extra_reserved_bytes` (gradients and optimizer states the first step will allocate)."""
    import torch

    index = _cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    taken = torch.cuda.memory_allocated(index) + extra_reserved_bytes
    return budget_target(total, budget_gib, max_memory_gib) - taken, taken


def apply_memory_cap(device: object, max_memory_gib: float) -> None:
    """Make the caching allocator refuse memory beyond `max_memory_gib` (e.g. to share a GPU or to
    check that a run fits a smaller card). No-op when 0."""
    import torch

    if max_memory_gib <= 0:
        return
    index = _cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(max_memory_gib * GIB / total, 1.0), index)
