"""How a training step uses GPU memory: measured at start-up, then the fastest plan that fits.

Two things decide speed at a fixed optimizer step (rows per step = micro-batch x accumulation):
whether activations are recomputed (gradient checkpointing) and how many of the step's rows go
through one forward. On an H100 an eager step is launch-bound below ~8k tokens per forward, and
recomputation costs about a third of the step, so the fastest plan is "no checkpointing, the whole
step in one forward" whenever its activations fit (../shared/gpu/README.md, feasibility table).

The plan never changes what is learned: every plan trains on the same rows per optimizer step and
normalises the loss by the same label tokens, so only the dropout masks' order differs.

Activation memory is measured, not guessed: `measure_footprint` runs forward + backward on two
short packed rows with and without checkpointing and fits `peak = fixed + per_token x tokens`
for each (fixed: the loss chunk's logits, gradients' first allocation). `choose_plan` then picks
the fastest candidate whose estimate fits the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

GIB = 2**30
AUTO_BUDGET_FRACTION = 0.7
"""Share of the GPU (or of `max_memory_gib`) the auto plan may fill: 15.6 GiB of a 24 GB card."""
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


@dataclass(frozen=True)
class MemoryPlan:
    """How one optimizer step runs: rows per forward, forwards per step, recomputation."""

    rows_per_forward: int
    accumulation: int
    gradient_checkpointing: bool
    estimated_gib: float | None = None
    reason: str = ""

    def describe(self) -> str:
        ckpt = "on" if self.gradient_checkpointing else "off"
        est = f", estimated peak {self.estimated_gib:.1f} GiB" if self.estimated_gib is not None else ""
        return (
            f"memory plan: {self.rows_per_forward} rows per forward x {self.accumulation} forwards per step, "
            f"gradient checkpointing {ckpt}{est} ({self.reason})"
        )


def fixed_plan(
    micro_batch_size: int, accumulation: int, gradient_checkpointing: bool, reason: str
) -> MemoryPlan:
    """The configured micro-batch size, accumulation and checkpointing, unchanged."""
    return MemoryPlan(micro_batch_size, accumulation, gradient_checkpointing, reason=reason)


def choose_plan(
    *,
    micro_batch_size: int,
    accumulation: int,
    row_tokens: int,
    footprint_full: Footprint,
    footprint_ckpt: Footprint,
    budget_bytes: float,
    base_bytes: float = 0.0,
) -> MemoryPlan:
    """The fastest plan whose estimated peak fits `budget_bytes`.

    Candidates, fastest first: no checkpointing with the most rows per forward (every divisor of
    the rows per step, largest first), then checkpointing likewise. If none fits, the configured
    micro-batch size with checkpointing (the most frugal setting the user asked for).

    Args:
        micro_batch_size, accumulation: the configured split of an optimizer step (their product
            is kept).
        row_tokens: tokens in one packed row (max_seq_len; rows are padded to the batch's longest).
        footprint_full, footprint_ckpt: measured without / with checkpointing.
        budget_bytes: what the plan may fill, beyond what is already allocated.
        base_bytes: what is allocated already or reserved (weights, gradients, optimizer states):
            added to the estimates so they are whole-process peaks.
    """
    rows = micro_batch_size * accumulation
    sizes = [n for n in range(rows, 0, -1) if rows % n == 0]
    for ckpt, footprint in ((False, footprint_full), (True, footprint_ckpt)):
        for n in sizes:
            need = footprint.estimate(n * row_tokens)
            if need <= budget_bytes:
                return MemoryPlan(
                    n,
                    rows // n,
                    ckpt,
                    estimated_gib=(need + base_bytes) / GIB,
                    reason=f"fits {(budget_bytes + base_bytes) / GIB:.1f} GiB",
                )
    need = footprint_ckpt.estimate(micro_batch_size * row_tokens)
    return MemoryPlan(
        micro_batch_size,
        accumulation,
        True,
        estimated_gib=(need + base_bytes) / GIB,
        reason=f"nothing fits {(budget_bytes + base_bytes) / GIB:.1f} GiB; the configured micro-batch with checkpointing",
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


def memory_budget(device: object, max_memory_gib: float, extra_reserved_bytes: float) -> tuple[float, float]:
    """(bytes the plan may fill, bytes taken already): AUTO_BUDGET_FRACTION of the cap (max_memory_gib,
    else the GPU's total memory) minus what is allocated now and `extra_reserved_bytes` (gradients
    and optimizer states that the first step will allocate); and those two together."""
    import torch

    index = _cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    cap = min(max_memory_gib * GIB, total) if max_memory_gib > 0 else total
    taken = torch.cuda.memory_allocated(index) + extra_reserved_bytes
    return AUTO_BUDGET_FRACTION * cap - taken, taken


def apply_memory_cap(device: object, max_memory_gib: float) -> None:
    """Make the caching allocator refuse memory beyond `max_memory_gib` (e.g. to share a GPU or to
    check that a run fits a smaller card). No-op when 0."""
    import torch

    if max_memory_gib <= 0:
        return
    index = _cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(max_memory_gib * GIB / total, 1.0), index)
