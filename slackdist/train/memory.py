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

Activation memory is measured, not guessed: the probe (`probe_footprints`) runs forward +
backward on two short packed rows of random tokens with no layer and with every layer
checkpointed and fits `peak = fixed + per_token x tokens` for each (fixed: the loss chunk's
logits, gradients' first allocation); checkpointing k of L layers sits k/L of the way between
them. A probe that runs out of memory (e.g. beyond `train.max_memory_gib`, which the allocator
enforces) counts as an infinite footprint, so that setting never wins. `choose_plan` then picks
the fastest candidate whose estimate fits the budget: `train.memory_budget_gib`, by default 70% of
the GPU (15.6 GiB of a 24 GB card, 56 GiB of an 80 GB one), never beyond 90% of the GPU or of
`train.max_memory_gib`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator

from slackdist.caches import cache_dir
from slackdist.config import Config
from slackdist.files import write_json_atomic
from slackdist.model.fp8 import FP8_HOLDS, uses_fp8
from slackdist.model.load import checkpoint_layers, checkpointable_layers
from slackdist.model.loss import IGNORE_INDEX
from slackdist.train.distributed import Topology, log_main
from slackdist.train.packing import PackedRow
from slackdist.train.step import forward_loss, make_step_inputs

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


class PeakMeter(Protocol):
    """Measures one step: `with meter: step()`, then `meter.peak_bytes` is the peak memory the step
    allocated beyond what was allocated when it started."""

    peak_bytes: float

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...


class CudaPeak:
    """`PeakMeter` from the CUDA caching allocator's statistics."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0.0
        self._before = 0

    def __enter__(self) -> CudaPeak:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)
        self.peak_bytes = float(torch.cuda.max_memory_allocated(self.device) - self._before)


def measure_footprint(
    run_step: Callable[[int], None], meter: PeakMeter, tokens: tuple[int, int]
) -> Footprint:
    """`run_step(n)` (forward + backward of an n-token packed row, gradients cleared after) at two
    sizes, its peaks fitted to a line.

    Raises:
        torch.cuda.OutOfMemoryError: the step ran out of memory.
    """
    peaks = []
    for n in tokens:
        with meter:
            run_step(n)
        peaks.append(meter.peak_bytes)
    return fit_footprint(tokens, (peaks[0], peaks[1]))


PROBE_SEGMENT = 256
"""Conversation length in the memory probe's packed rows."""


def probe_step(
    model: Any, tokens: int, *, accelerator: Accelerator, pad_id: int, varlen: bool, chunk_size: int
) -> None:
    """Forward + backward of one packed row of random tokens (conversations of PROBE_SEGMENT), then
    drop the gradients: what one training micro-batch of `tokens` tokens allocates."""
    ids = torch.randint(0, model.config.vocab_size, (tokens,)).tolist()
    positions = [i % PROBE_SEGMENT for i in range(tokens)]
    labels = [IGNORE_INDEX if p == 0 else t for p, t in zip(positions, ids, strict=True)]
    lens = [min(PROBE_SEGMENT, tokens - i) for i in range(0, tokens, PROBE_SEGMENT)]
    row = PackedRow(input_ids=ids, labels=labels, position_ids=positions, seq_lens=lens)
    batch = make_step_inputs([[row]], pad_id=pad_id, device=accelerator.device, varlen=varlen).batches[0]
    with accelerator.autocast():
        loss = forward_loss(model, batch, accelerator=accelerator, chunk_size=chunk_size)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _measure(
    model: Any, run_step: Callable[[int], None], meter: PeakMeter, tokens: tuple[int, int]
) -> Footprint:
    """`measure_footprint`, or an infinite footprint when the probe itself runs out of memory."""
    try:
        return measure_footprint(run_step, meter, tokens)
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError, whichever device refused
        model.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return Footprint(math.inf, math.inf)


def probe_footprints(
    model: Any, run_step: Callable[[int], None], meter: PeakMeter, tokens: tuple[int, int]
) -> tuple[Footprint, Footprint]:
    """The footprints with no decoder layer and with every layer checkpointed (infinite where the
    probe ran out of memory). Leaves every layer checkpointed; the run's RNG is left as it was,
    so the probe does not shift the run's dropout masks."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = len(checkpointable_layers(base))
    device = next(model.parameters()).device
    model.train()
    footprints = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for count in (0, layers):
            checkpoint_layers(base, count)
            footprints.append(_measure(model, run_step, meter, tokens))
    return footprints[0], footprints[1]


def _cuda_index(device: object) -> int:
    """`torch.device("cuda")` (Accelerate's device on one GPU) has no index; memory calls need one."""
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
    index = _cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    taken = torch.cuda.memory_allocated(index) + extra_reserved_bytes
    return budget_target(total, budget_gib, max_memory_gib) - taken, taken


def apply_memory_cap(device: object, max_memory_gib: float) -> None:
    """Make the caching allocator refuse memory beyond `max_memory_gib` (e.g. to share a GPU or to
    check that a run fits a smaller card). No-op when 0."""
    if max_memory_gib <= 0:
        return
    index = _cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(max_memory_gib * GIB / total, 1.0), index)


def plan_memory(
    model: Any, cfg: Config, accelerator: Accelerator, topology: Topology, *, pad_id: int, varlen: bool
) -> MemoryPlan:
    """How each optimizer step runs; sets the model's checkpointing to match.

    The fixed plan (the config as given) with `train.memory_plan=fixed`, under FSDP / DeepSpeed and
    off the GPU; else the probe. Called before wrapping (no DDP hooks yet). Each rank measures its
    own GPU; all ranks adopt the most cautious figures so they run the same plan.
    """
    t = cfg.train
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = len(checkpointable_layers(base))
    why = None
    if t.memory_plan == "fixed":
        why = "train.memory_plan=fixed"
    elif topology.sharded:
        why = "FSDP / DeepSpeed"
    elif not topology.on_gpu:
        why = "not on a GPU"
    if why is not None:
        return fixed_plan(
            t.micro_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing, layers, why
        )

    def run_step(n: int) -> None:
        probe_step(
            model, n, accelerator=accelerator, pad_id=pad_id, varlen=varlen, chunk_size=t.loss_chunk_size
        )

    device = topology.device
    sizes = (max(1024, t.loss_chunk_size), 2 * max(1024, t.loss_chunk_size))
    key = probe_key(model, cfg, device, sizes, varlen) if t.memory_plan_cache else None
    cached = read_probe_cache(key) if key else None
    if cached is not None:
        full, ckpt = cached
        log_main(
            topology, f"memory plan: the probe's figures for this model, LoRA and GPU from {_cache_file()}"
        )
    else:
        full, ckpt = probe_footprints(model, run_step, CudaPeak(device), sizes)
        if key and topology.is_main_process:
            write_probe_cache(key, full, ckpt)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # fp32 gradients, their flat copy for the optimizer and AdamW's two fp32 states: what the first
    # optimizer step allocates
    budget, taken = memory_budget(
        device, t.memory_budget_gib, t.max_memory_gib, extra_reserved_bytes=16 * trainable
    )
    figures = torch.tensor(
        [full.fixed, full.per_token, ckpt.fixed, ckpt.per_token, -budget, taken], device=device
    )
    if topology.world_size > 1:
        torch.distributed.all_reduce(figures, op=torch.distributed.ReduceOp.MAX)
    f = figures.tolist()
    plan = choose_plan(
        micro_batch_size=t.micro_batch_size,
        accumulation=t.gradient_accumulation_steps,
        row_tokens=t.max_seq_len,
        layers=layers,
        footprint_full=Footprint(f[0], f[1]),
        footprint_ckpt=Footprint(f[2], f[3]),
        budget_bytes=-f[4],
        base_bytes=f[5],
    )
    checkpoint_layers(base, plan.checkpointed_layers)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)  # the logged peak is training's, not the probe's
    return plan


# ---------------------------------------------------------------- the probe's cache
# The probe costs ~2 s of every start (bench/time_to_model.py). Its figures depend only on the model,
# the LoRA and loss settings, the GPU and the library versions, so they are kept per such key.


def _versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = ""
    return found


def probe_key(model: Any, cfg: Config, device: torch.device, sizes: tuple[int, int], varlen: bool) -> str:
    """What the probe's figures depend on, hashed: the model's config (architecture, quantization,
    attention), FP8 base matmuls or not, the LoRA settings, the loss chunking, the probe's sizes, the
    GPU and the libraries."""
    what = {
        "model": model.config.to_json_string(use_diff=False),
        "lora": asdict(cfg.lora),
        "loss_chunk_size": cfg.train.loss_chunk_size,
        # what the layers hold and autograd keeps differs (train.fp8_matmul=auto decides per run)
        "fp8": FP8_HOLDS if uses_fp8(model) else None,
        "sizes": sizes,
        "varlen": varlen,
        "gpu": [torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory]
        if device.type == "cuda"
        else str(device),
        "versions": _versions(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _cache_file() -> Path:
    return cache_dir() / "memory_probe.json"


def read_probe_cache(key: str) -> tuple[Footprint, Footprint] | None:
    """The footprints measured earlier under `key`, or None (also for an unreadable cache)."""
    try:
        entry = json.loads(_cache_file().read_text(encoding="utf-8"))[key]
        return Footprint(*entry["full"]), Footprint(*entry["ckpt"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_probe_cache(key: str, full: Footprint, ckpt: Footprint) -> None:
    """Add the footprints under `key` (a failure to write only costs the next run the probe)."""
    try:
        entries = json.loads(_cache_file().read_text(encoding="utf-8"))
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = {"full": [full.fixed, full.per_token], "ckpt": [ckpt.fixed, ckpt.per_token]}
    try:
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(_cache_file(), entries)
    except OSError:
        pass
