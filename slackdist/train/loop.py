"""`slackdist train`: the QLoRA training loop, on `accelerate.Accelerator`.

Reads top to bottom as setup -> train -> save -> cleanup (the shape of Accelerate's examples and
torchtune's LoRA recipe). The same code runs under

    python -m slackdist train --data DIR --output OUT
    accelerate launch --config_file launch_configs/<cpu|single_gpu|ddp|fsdp|fsdp_offload|deepspeed_zero3>.yaml \
        -m slackdist train --data DIR --output OUT
    torchrun --nproc_per_node N -m slackdist train ...   (ACCELERATE_USE_CPU=1 for DDP over gloo on CPUs)

Hardware (processes, FSDP, DeepSpeed, mixed precision) comes from the launch config; every
hyperparameter from the slackdist config.

Data: each epoch the conversations are packed afresh (deterministic in seed and epoch); one
optimizer step takes `micro_batch_size x gradient_accumulation_steps x num_processes` packed rows
and each rank takes its own micro-batches of them. Rows do not divide evenly: the last step's
missing micro-batches are filler rows with no label tokens, so nothing is dropped or seen twice and
the result does not depend on the number of processes. Resuming starts at the first packed row of
the epoch not yet trained on.

Loss: summed over label tokens and divided by the label tokens of the whole optimizer step (all
micro-batches, all ranks), so every token weighs the same however rows fall into micro-batches.

Exit codes: 0 done, 2 bad input, 75 (EX_TEMPFAIL) preempted by SIGTERM/SIGUSR1 after writing a
checkpoint: run again with `--resume auto` (the SLURM scripts requeue on it).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slackdist.config import Config, save_config
from slackdist.errors import SlackdistError
from slackdist.files import write_json_atomic, write_text_atomic
from slackdist.train import checkpoint as ckpt
from slackdist.train.memory import MemoryPlan

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from slackdist.train.flat import FlatParameters
    from slackdist.train.packing import Example, PackedRow

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "try again later"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
RUNS_DIR = "runs"
MERGED_DIR = "merged"


@dataclass
class TrainResult:
    """What a `train()` call did."""

    output_dir: Path
    global_step: int
    losses: dict[int, float] = field(default_factory=dict)
    """Loss per label token of each optimizer step run in this call."""
    eval_losses: dict[int, float] = field(default_factory=dict)
    """Eval loss per label token, by step, of this call."""
    best_eval_loss: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    preempted: bool = False
    tokens_per_s: float = 0.0
    """Real input tokens (no padding) per second of training steps, all ranks."""
    peak_mem_gib: float = 0.0
    """Peak GPU memory allocated (GPU) or peak resident memory (CPU) of the main process."""
    resumed_from: Path | None = None


@dataclass
class Batches:
    """One rank's share of an epoch: per optimizer step, its micro-batches (row indices; empty = filler)."""

    steps: list[list[list[int]]]

    def __len__(self) -> int:
        return len(self.steps)


def shard_rows(
    num_rows: int,
    *,
    micro_batch_size: int,
    accumulation: int,
    num_processes: int,
    rank: int,
    first_row: int = 0,
) -> Batches:
    """Split packed rows [first_row, num_rows) into optimizer steps and give rank `rank` its micro-batches.

    Step s covers rows first_row + [s*R, (s+1)*R) with R = micro_batch_size * accumulation * num_processes;
    micro-batch j of rank r is the r-th slice of the j-th group of `micro_batch_size * num_processes`.
    Past the last row a micro-batch is empty (the loop feeds a filler row with no label tokens), so
    every rank runs the same number of forwards (FSDP and DDP need that) and no row is dropped.
    """
    per_step = micro_batch_size * accumulation * num_processes
    steps = []
    for s in range(math.ceil(max(num_rows - first_row, 0) / per_step)):
        micro = []
        for j in range(accumulation):
            start = first_row + s * per_step + (j * num_processes + rank) * micro_batch_size
            micro.append([i for i in range(start, start + micro_batch_size) if i < num_rows])
        steps.append(micro)
    return Batches(steps)


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1; the loop finishes the current optimizer step, checkpoints and exits 75."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                return

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def set(self) -> bool:
        return self.signal is not None


# ====================================================================== setup


def _mixed_precision(cfg: Config) -> str | None:
    """Precision of autocast: the launch config's when launched by accelerate, else from model.dtype."""
    import torch

    from slackdist.model.load import resolve_dtype

    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        return None  # accelerate launch / the launch config decided
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available():
        return "no"
    dtype = resolve_dtype(cfg.model.dtype, "cuda")
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's Accelerator. Created before the model: DeepSpeed ZeRO-3 must be configured before
    `from_pretrained` so the weights load partitioned (peft#2014)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.train.output_dir)
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        logger.warning("tensorboard is not installed: metrics go to %s only", out / METRICS_FILE)
    return Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=_mixed_precision(cfg),
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / RUNS_DIR)),
        # One scheduler step per optimizer step, whatever the number of processes (by default
        # Accelerate steps the scheduler num_processes times per optimizer step).
        step_scheduler_with_optimizer=False,
    )


def _is_sharded(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _fsdp_version(accelerator: Accelerator) -> int | None:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) or 1)


def _params_offloaded(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        offload = accelerator.state.fsdp_plugin.cpu_offload
        return bool(getattr(offload, "offload_params", offload))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        devices = [zero.get(k, {}).get("device", "none") for k in ("offload_param", "offload_optimizer")]
        return any(d not in (None, "none") for d in devices)
    return False


def load_data(cfg: Config, tokenizer: Any, accelerator: Accelerator) -> tuple[list[Example], list[Example]]:
    """Tokenize train.jsonl and validation.jsonl (validation may be absent or empty).

    Raises:
        SlackdistError: no train.jsonl, a bad record, or no usable training conversation.
    """
    from slackdist.train.packing import load_examples

    data = Path(cfg.train.data_dir)
    t = cfg.train
    with accelerator.main_process_first():
        train = load_examples(data / "train.jsonl", tokenizer, train_on=t.train_on, max_seq_len=t.max_seq_len)
        val_path = data / "validation.jsonl"
        val = (
            load_examples(val_path, tokenizer, train_on=t.train_on, max_seq_len=t.max_seq_len)
            if val_path.is_file()
            else []
        )
    if not train:
        raise SlackdistError(f"{data / 'train.jsonl'}: no conversation fits max_seq_len={t.max_seq_len}")
    if not val:
        logger.warning("%s: no validation conversations; no eval and no early stopping", val_path)
    return train, val


def load_model(cfg: Config, accelerator: Accelerator) -> Any:
    """Base model (4-bit unless disabled or impossible) + LoRA adapters, on this rank's device.

    No device_map under FSDP / DeepSpeed (they place and shard the weights; bitsandbytes puts a
    4-bit model on the current CUDA device); elsewhere {"": this process's device}.
    """
    from slackdist.model.load import add_lora, load_base_model, resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype, accelerator.device)
    device_map = None if _is_sharded(accelerator) else {"": accelerator.device}
    model = load_base_model(cfg.model, dtype=dtype, device_map=device_map)
    return add_lora(model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config, accelerator: Accelerator) -> Any:
    """Paged AdamW 32-bit where it can run (bitsandbytes, CUDA, params on the GPU, not FSDP2),
    else torch AdamW (fused on CUDA and for CPU-offloaded params)."""
    import torch

    t = cfg.train
    on_cuda = accelerator.device.type == "cuda"
    offloaded = _params_offloaded(accelerator)
    if t.optimizer == "paged_adamw_32bit":
        reason = None
        if not on_cuda:
            # bitsandbytes' paged memory exists only on CUDA (on CPU it warns and runs unpaged);
            # torch AdamW is the same update and runs fused/foreach on the CPU.
            reason = "not on CUDA"
        elif offloaded:
            reason = "parameters are offloaded to CPU (paged AdamW cannot step them)"
        elif _fsdp_version(accelerator) == 2:
            reason = "FSDP2 shards parameters as DTensors, which paged AdamW cannot step (torchtune#1856)"
        else:
            try:
                from bitsandbytes.optim import PagedAdamW32bit
            except Exception as e:  # ImportError or a broken native library
                reason = f"bitsandbytes is not importable ({e})"
        if reason is None:
            return PagedAdamW32bit(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        _log_main(accelerator, f"optimizer: torch AdamW instead of paged_adamw_32bit ({reason})")
    fused = t.optimizer != "adamw_torch" and (on_cuda or offloaded)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=fused or None)


def build_scheduler(optimizer: Any, cfg: Config, total_steps: int) -> Any:
    """Warmup (ratio of all steps) then cosine / linear decay, or constant."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)
    if cfg.train.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    make = (
        get_cosine_schedule_with_warmup
        if cfg.train.lr_scheduler == "cosine"
        else get_linear_schedule_with_warmup
    )
    return make(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


PROBE_SEGMENT = 256
"""Conversation length in the memory probe's packed rows."""


def _probe_step(
    model: Any, tokens: int, *, accelerator: Accelerator, cfg: Config, pad_id: int, varlen: bool
) -> None:
    """Forward + backward of one packed row of random tokens (conversations of PROBE_SEGMENT), then
    drop the gradients: what one training micro-batch of `tokens` tokens allocates."""
    import torch

    from slackdist.train.packing import IGNORE_INDEX, PackedRow

    ids = torch.randint(0, model.config.vocab_size, (tokens,)).tolist()
    positions = [i % PROBE_SEGMENT for i in range(tokens)]
    labels = [IGNORE_INDEX if p == 0 else t for p, t in zip(positions, ids, strict=True)]
    lens = [min(PROBE_SEGMENT, tokens - i) for i in range(0, tokens, PROBE_SEGMENT)]
    row = PackedRow(input_ids=ids, labels=labels, position_ids=positions, seq_lens=lens)
    batch = make_step_inputs([row], [[0]], pad_id=pad_id, device=accelerator.device, varlen=varlen).batches[0]
    with accelerator.autocast():
        loss = forward_loss(model, batch, accelerator=accelerator, chunk_size=cfg.train.loss_chunk_size)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _measure(model: Any, probe: Any, device: Any, tokens: tuple[int, int]) -> Any:
    """`measure_footprint`, or an infinite footprint when the probe itself runs out of memory."""
    import torch

    from slackdist.train.memory import Footprint, measure_footprint

    try:
        return measure_footprint(probe, device, tokens)
    except torch.cuda.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return Footprint(math.inf, math.inf)


def plan_memory(
    model: Any, cfg: Config, accelerator: Accelerator, *, pad_id: int, varlen: bool
) -> MemoryPlan:
    """How each optimizer step runs (`slackdist.train.memory`); sets the model's checkpointing to match.

    Called before `prepare` (no DDP hooks yet). Each rank measures its own GPU; all ranks adopt
    the most cautious figures so they run the same plan.
    """
    import torch

    from slackdist.model.load import checkpoint_layers, checkpointable_layers
    from slackdist.train.memory import Footprint, choose_plan, fixed_plan, memory_budget

    t = cfg.train
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = len(checkpointable_layers(base))
    why = None
    if t.memory_plan == "fixed":
        why = "train.memory_plan=fixed"
    elif _is_sharded(accelerator):
        why = "FSDP / DeepSpeed"
    elif accelerator.device.type != "cuda":
        why = "not on a GPU"
    if why is not None:
        return fixed_plan(
            t.micro_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing, layers, why
        )

    def probe(n: int) -> None:
        _probe_step(model, n, accelerator=accelerator, cfg=cfg, pad_id=pad_id, varlen=varlen)

    device = accelerator.device
    sizes = (max(1024, t.loss_chunk_size), 2 * max(1024, t.loss_chunk_size))
    model.train()
    with torch.random.fork_rng(devices=[device]):  # the probe must not shift the run's dropout masks
        checkpoint_layers(base, 0)
        full = _measure(model, probe, device, sizes)
        checkpoint_layers(base, layers)
        ckpt_fp = _measure(model, probe, device, sizes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # fp32 gradients, their flat copy for the optimizer and AdamW's two fp32 states: what the first
    # optimizer step allocates
    budget, taken = memory_budget(
        device, t.memory_budget_gib, t.max_memory_gib, extra_reserved_bytes=16 * trainable
    )
    figures = torch.tensor(
        [full.fixed, full.per_token, ckpt_fp.fixed, ckpt_fp.per_token, -budget, taken], device=device
    )
    if accelerator.num_processes > 1:
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


def prepare(
    accelerator: Accelerator, model: Any, cfg: Config, total_steps: int
) -> tuple[Any, Any, Any, FlatParameters | None]:
    """Wrap model, optimizer and scheduler for the launch config's topology.

    DeepSpeed and FSDP2: model and optimizer in one `prepare` call (accelerate requires it);
    DeepSpeed's micro-batch size and clipping come from the slackdist config. Elsewhere the model is
    wrapped first and the optimizer built on the wrapped parameters: under FSDP1 it must see FSDP's
    flat parameters (and PEFT's wrap policy gives each LoRA leaf its own unit, so fp32 adapters and
    bf16/4-bit base weights never share one: "Must flatten tensors with uniform dtype"); unsharded,
    the LoRA weights are laid out in one flat parameter that the optimizer steps
    (`slackdist.train.flat`; after wrapping, because moving the model to its device may replace
    parameter data). That `FlatParameters` is returned last (None when not flattened).
    """
    from accelerate.utils import DistributedType

    from slackdist.train.flat import FlatParameters

    def trainable(m: Any) -> list:
        return [p for p in m.parameters() if p.requires_grad]

    if accelerator.distributed_type == DistributedType.DEEPSPEED or _fsdp_version(accelerator) == 2:
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            ds = accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
            if ds.get("gradient_clipping", "auto") == "auto":
                ds["gradient_clipping"] = cfg.train.max_grad_norm
        optimizer = build_optimizer(trainable(model), cfg, accelerator)
        scheduler = build_scheduler(optimizer, cfg, total_steps)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        return model, optimizer, scheduler, None
    if _fsdp_version(accelerator) == 1:
        from peft.utils.other import fsdp_auto_wrap_policy

        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    model = accelerator.prepare(model)
    params = trainable(model)
    flat = None
    if not _is_sharded(accelerator) and FlatParameters.possible(params):
        flat = FlatParameters(params)
        params = [flat.flat]
    optimizer = build_optimizer(params, cfg, accelerator)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    return model, optimizer, scheduler, flat


# ====================================================================== steps


def _filler_row(pad_id: int) -> PackedRow:
    from slackdist.train.packing import IGNORE_INDEX, PackedRow

    return PackedRow(input_ids=[pad_id], labels=[IGNORE_INDEX], position_ids=[0], seq_lens=[1])


@dataclass
class StepInputs:
    """The micro-batches of one optimizer step on this rank, as tensors on the device."""

    batches: list[dict[str, Any]]
    label_tokens: int
    input_tokens: int


def make_step_inputs(
    rows: list[PackedRow], micro_batches: list[list[int]], *, pad_id: int, device: Any, varlen: bool
) -> StepInputs:
    from slackdist.train.packing import collate

    batches, input_tokens = [], 0
    for idx in micro_batches:
        chunk = [rows[i] for i in idx] or [_filler_row(pad_id)]
        input_tokens += sum(len(rows[i]) for i in idx)
        batch = collate(chunk, pad_id, varlen_kwargs=varlen)
        batches.append({k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()})
    label_tokens = sum(int(b["num_label_tokens"]) for b in batches)
    return StepInputs(batches, label_tokens, input_tokens)


def forward_loss(
    model: Any, batch: dict[str, Any], *, accelerator: Accelerator, chunk_size: int
) -> torch.Tensor:
    """Summed next-token loss of one micro-batch (fp32 scalar).

    Chunked (lm_head + cross-entropy per chunk of label positions, no full logits) when
    `chunk_size > 0` and the model is not sharded. Under FSDP / ZeRO-3 the model computes its own
    logits: lm_head's weight is only gathered (unsharded) inside the root module's forward, and
    calling lm_head afterwards would use a resharded, empty parameter.
    """
    import torch.nn.functional as F

    from slackdist.train.loss import chunked_lm_loss

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_label_tokens")}
    if chunk_size > 0 and not _is_sharded(accelerator):
        # logits_to_keep=1: the model's own lm_head runs on one position only; the last hidden
        # state (after the final norm) feeds the chunked loss.
        out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        lm_head = accelerator.unwrap_model(model).get_output_embeddings()
        with accelerator.autocast():
            if int(batch["num_label_tokens"]) == 0:
                # A filler micro-batch: zero loss, but through lm_head too, so every LoRA parameter
                # gets a (zero) gradient and DDP's reducer does not wait for lm_head's.
                return lm_head(hidden[:, :1]).float().sum() * 0.0
            loss_sum, _ = chunked_lm_loss(hidden, lm_head, labels, chunk_size)
        return loss_sum
    logits = model(**inputs, use_cache=False).logits
    targets = labels[:, 1:]
    keep = targets != -100
    # Only labelled positions are upcast to fp32 (a [B, T, 128k] fp32 copy would be GBs). Over no
    # label at all the sum is 0 with a (zero) gradient into every parameter, as DDP needs.
    return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")


@dataclass
class StepStats:
    loss: float
    lr: float
    grad_norm: float | None
    label_tokens: int
    input_tokens: int
    stop_requested: bool


def train_step(
    accelerator: Accelerator,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    inputs: StepInputs,
    *,
    cfg: Config,
    stop_requested: bool,
    flat: FlatParameters | None = None,
) -> StepStats:
    """One optimizer step over this rank's micro-batches.

    With flat parameters (`prepare`), the gradients are gathered into the flat one before clipping.

    Each micro-batch's loss sum is scaled by (accumulation x processes / label tokens of the whole
    step): accelerate divides by the accumulation steps and DDP/FSDP average over processes, so the
    gradient is d(sum of token losses) / (all label tokens of the step).
    """
    import torch

    device = accelerator.device
    counts = torch.tensor([inputs.label_tokens], device=device, dtype=torch.long)
    global_tokens = int(accelerator.reduce(counts, reduction="sum").item())
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / max(global_tokens, 1)
    loss_total = torch.zeros((), device=device, dtype=torch.float32)
    grad_norm = None
    lr = scheduler.get_last_lr()[0]  # the rate this step applies (the scheduler steps after it)
    for batch in inputs.batches:
        with accelerator.accumulate(model):
            loss_sum = forward_loss(
                model, batch, accelerator=accelerator, chunk_size=cfg.train.loss_chunk_size
            )
            accelerator.backward(loss_sum * scale)
            if accelerator.sync_gradients:
                params = model.parameters()
                if flat is not None:
                    flat.collect_grads()
                    params = [flat.flat]
                grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if flat is not None and accelerator.sync_gradients:
                flat.zero_grad()
        loss_total += loss_sum.detach().float()
    if not getattr(optimizer, "step_was_skipped", False):  # fp16 overflow skips the step
        scheduler.step()
    # One reduction for the logged numbers and the stop flag (a signal may reach one rank only).
    stats = torch.stack(
        [
            loss_total,
            torch.tensor(float(inputs.input_tokens), device=device),
            torch.tensor(float(stop_requested), device=device),
        ]
    )
    stats = accelerator.reduce(stats, reduction="sum")
    return StepStats(
        loss=float(stats[0]) / max(global_tokens, 1),
        lr=lr,
        grad_norm=None if grad_norm is None else float(grad_norm),
        label_tokens=global_tokens,
        input_tokens=int(stats[1]),
        stop_requested=bool(stats[2] > 0),
    )


def evaluate(
    accelerator: Accelerator,
    model: Any,
    rows: list[PackedRow],
    *,
    cfg: Config,
    pad_id: int,
    varlen: bool,
    rows_per_forward: int,
) -> float:
    """Loss per label token over the validation rows, summed across ranks."""
    import torch

    shards = shard_rows(
        len(rows),
        micro_batch_size=rows_per_forward,
        accumulation=1,
        num_processes=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    steps = shards.steps[: cfg.train.eval_max_batches] if cfg.train.eval_max_batches > 0 else shards.steps
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for micro in steps:
            inputs = make_step_inputs(rows, micro, pad_id=pad_id, device=accelerator.device, varlen=varlen)
            for batch in inputs.batches:
                loss = forward_loss(
                    model, batch, accelerator=accelerator, chunk_size=cfg.train.loss_chunk_size
                )
                totals[0] += loss.double()
                totals[1] += float(batch["num_label_tokens"])
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1].clamp(min=1))


# ====================================================================== logging


def peak_memory_gib(device: Any) -> float:
    """Peak GPU memory allocated on `device`, or the process's peak resident memory on CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def reserved_memory_gib(device: Any) -> dict[str, float]:
    """{"peak_reserved_gib": what the CUDA caching allocator held at most} on a GPU, else {}:
    what the card must have, allocator fragmentation included."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return {}
    return {"peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


class MetricsLog:
    """TensorBoard (through accelerate's tracker) and OUT/metrics.jsonl, main process only."""

    def __init__(self, accelerator: Accelerator, out_dir: Path, *, resume_step: int | None) -> None:
        self.accelerator = accelerator
        self.path = out_dir / METRICS_FILE
        if accelerator.is_main_process and self.path.exists():
            self._keep_until(0 if resume_step is None else resume_step)

    def _keep_until(self, step: int) -> None:
        """Drop entries after `step` (a resumed run logs them again) and a line cut by a kill."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("step", 0) <= step:
                kept.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, values: dict[str, Any], step: int) -> None:
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


def _log_main(accelerator: Accelerator, message: str) -> None:
    if accelerator.is_main_process:
        logger.warning(message)


def _flat_config(cfg: Config) -> dict[str, Any]:
    """The config as flat scalars for TensorBoard's hparams view."""
    from slackdist.config import config_to_dict

    flat = {}
    for section in ("model", "lora", "train"):
        for key, value in config_to_dict(cfg)[section].items():
            flat[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return {k: ("" if v is None else v) for k, v in flat.items()}


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    """Training loss (and eval loss) per step from metrics.jsonl into a PNG (skipped without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no %s", out_path.name)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = {}, {}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if "loss" in entry:
            train[entry["step"]] = entry["loss"]
        if "eval_loss" in entry:
            evals[entry["step"]] = entry["eval_loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train loss")
    if evals:
        ax.plot(sorted(evals), [evals[s] for s in sorted(evals)], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per label token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)


# ====================================================================== the run


def epoch_lengths(examples: list[Example], cfg: Config, num_processes: int) -> list[int]:
    """Optimizer steps of each epoch (packing differs per epoch, so row counts can too)."""
    from slackdist.train.packing import pack

    t = cfg.train
    per_step = t.micro_batch_size * t.gradient_accumulation_steps * num_processes
    return [
        math.ceil(len(pack(examples, t.max_seq_len, seed=t.seed, epoch=e, packing=t.packing)) / per_step)
        for e in range(t.num_epochs)
    ]


def resume_point(cfg: Config) -> Path | None:
    """The checkpoint to resume from (checked before anything heavy loads).

    Raises:
        SlackdistError: `--resume PATH` is not a checkpoint, or a fresh run would mix with an earlier
            run's checkpoints in the same output folder.
    """
    out = Path(cfg.train.output_dir)
    found = ckpt.resolve_resume(cfg.train.resume, out)
    if found is None and not cfg.train.resume and ckpt.find_latest_checkpoint(out) is not None:
        raise SlackdistError(
            f"{out / ckpt.CHECKPOINTS}: checkpoints of an earlier run; continue it with --resume auto, "
            "or train into another --output (or delete that folder)"
        )
    return found


class LoRARecipe:
    """One training run: `setup()` -> `fit()` -> `save()` -> `cleanup()` (torchtune's recipe shape)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.t = cfg.train
        self.out = Path(cfg.train.output_dir)
        self.preemption = PreemptionFlag()
        self.state = ckpt.TrainerState()
        self.last_saved_step: int | None = None

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        """Accelerator, data, model + LoRA, optimizer, scheduler, trackers; resume if asked.

        Raises:
            SlackdistError: see `train`.
        """
        from accelerate.utils import set_seed

        from slackdist.model.load import load_tokenizer
        from slackdist.train.compilation import compile_decoder_layers, should_compile
        from slackdist.train.memory import apply_memory_cap
        from slackdist.train.packing import pack

        cfg, t = self.cfg, self.t
        resume_from = resume_point(cfg)
        self.preemption.install()
        self.accelerator = accelerator = make_accelerator(cfg)
        if accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / ckpt.CONFIG_FILE)
        set_seed(t.seed)  # the same LoRA init on every rank
        self.tokenizer = load_tokenizer(cfg.model.base_model, trust_remote_code=cfg.model.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id
        self.train_examples, val_examples = load_data(cfg, self.tokenizer, accelerator)
        self.total_steps = sum(epoch_lengths(self.train_examples, cfg, accelerator.num_processes))
        if t.max_steps >= 0:
            self.total_steps = min(t.max_steps, self.total_steps)
        self.val_rows = (
            pack(val_examples, t.max_seq_len, seed=t.seed, epoch=0, packing=t.packing) if val_examples else []
        )

        if accelerator.device.type == "cuda":
            apply_memory_cap(accelerator.device, t.max_memory_gib)
        model = load_model(cfg, accelerator)
        self.varlen = getattr(model.config, "_attn_implementation", "") in (
            "slackdist_varlen",
            "flash_attention_2",
        )
        self.plan = plan_memory(model, cfg, accelerator, pad_id=self.pad_id, varlen=self.varlen)
        accelerator.gradient_accumulation_steps = self.plan.accumulation
        _log_main(accelerator, self.plan.describe())
        if should_compile(t.compile, device_type=accelerator.device.type, sharded=_is_sharded(accelerator)):
            compiled = compile_decoder_layers(model)
            _log_main(
                accelerator, f"compile: {compiled} decoder layers with torch.compile (first steps compile)"
            )
        self.model, self.optimizer, self.scheduler, self.flat = prepare(
            accelerator, model, cfg, self.total_steps
        )
        ckpt.register_adapter_state_hooks(accelerator, self.model)
        accelerator.register_for_checkpointing(self.state)
        if resume_from is not None:
            # adapter (or FSDP/DeepSpeed shards), optimizer, scheduler, RNG of every rank, trainer state
            ckpt.load_checkpoint_state(accelerator, resume_from)
            self.last_saved_step = self.state.global_step
            _log_main(accelerator, f"resumed from {resume_from} at step {self.state.global_step}")
        else:
            set_seed(t.seed + accelerator.process_index)  # different dropout masks on each rank
        self.result = TrainResult(
            output_dir=self.out, global_step=self.state.global_step, resumed_from=resume_from
        )
        accelerator.init_trackers("slackdist", config=_flat_config(cfg))
        self.metrics = MetricsLog(
            accelerator, self.out, resume_step=self.state.global_step if resume_from else None
        )
        params = [p for p in accelerator.unwrap_model(self.model).parameters() if p.requires_grad]
        # ZeRO-3 partitions parameters: ds_numel is the full size
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        accelerator.print(
            f"training {cfg.model.base_model} on {len(self.train_examples)} conversations: {self.total_steps} steps of "
            f"{accelerator.num_processes} x {self.plan.rows_per_forward} x {self.plan.accumulation} rows "
            f"(processes x micro-batch x accumulation), {trainable / 1e6:.2f}M trainable parameters, "
            f"{accelerator.distributed_type.value}, mixed precision {accelerator.mixed_precision}"
        )

    # ------------------------------------------------------------ train
    def fit(self) -> None:
        """Epochs of optimizer steps, with eval, early stopping, checkpoints and preemption."""
        import torch
        from tqdm.auto import tqdm

        from slackdist.train.packing import pack

        t, state, accelerator = self.t, self.state, self.accelerator
        self.model.train()
        self.window: list[tuple[float, int, float]] = []  # (loss, input tokens, seconds) since the last log
        self.train_seconds, self.train_tokens = 0.0, 0
        bar = tqdm(
            total=self.total_steps,
            initial=state.global_step,
            desc="training",
            disable=not accelerator.is_main_process,
        )
        while not state.finished and state.epoch < t.num_epochs:
            rows = pack(self.train_examples, t.max_seq_len, seed=t.seed, epoch=state.epoch, packing=t.packing)
            # Start at the first row not yet trained on (a resume; right also when the process count changed).
            plan = shard_rows(
                len(rows),
                micro_batch_size=self.plan.rows_per_forward,
                accumulation=self.plan.accumulation,
                num_processes=accelerator.num_processes,
                rank=accelerator.process_index,
                first_row=state.rows_done_in_epoch,
            )
            rows_per_step = t.micro_batch_size * t.gradient_accumulation_steps * accelerator.num_processes
            for micro_batches in plan.steps:
                start = time.perf_counter()
                inputs = make_step_inputs(
                    rows, micro_batches, pad_id=self.pad_id, device=accelerator.device, varlen=self.varlen
                )
                stats = train_step(
                    accelerator,
                    self.model,
                    self.optimizer,
                    self.scheduler,
                    inputs,
                    cfg=self.cfg,
                    stop_requested=self.preemption.set,
                    flat=self.flat,
                )
                state.global_step += 1
                state.updates += stats.lr > 0
                state.step_in_epoch += 1
                state.rows_done_in_epoch = min(state.rows_done_in_epoch + rows_per_step, len(rows))
                state.tokens_seen += stats.input_tokens
                self.log_step(stats, time.perf_counter() - start)
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.4f}")
                if self.after_step(stats):
                    break
            if self.result.preempted:
                break
            if state.rows_done_in_epoch >= len(rows):  # the epoch is complete
                if self.val_rows and state.last_eval_step != state.global_step and not state.finished:
                    self.evaluate()
                state.epoch += 1
                state.step_in_epoch = state.rows_done_in_epoch = 0
                state.finished = state.finished or state.epoch >= t.num_epochs
                if t.clear_cache_between_epochs:
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
        bar.close()

    def after_step(self, stats: StepStats) -> bool:
        """Eval, early stopping, preemption and periodic checkpoints after a step; True to stop training."""
        t, state = self.t, self.state
        state.finished = state.global_step >= self.total_steps
        if self.val_rows and t.eval_every_n_steps > 0 and state.global_step % t.eval_every_n_steps == 0:
            self.evaluate()  # may set state.finished (early stopping)
        if stats.stop_requested:
            self.save_checkpoint()
            self.result.preempted = True
            return True
        if t.save_every_n_steps > 0 and state.global_step % t.save_every_n_steps == 0 and not state.finished:
            self.save_checkpoint()  # the final checkpoint is written by save()
        return state.finished

    def log_step(self, stats: StepStats, seconds: float) -> None:
        """Record a step; every `log_every_n_steps`, log the window's means to TensorBoard and metrics.jsonl."""
        step = self.state.global_step
        self.result.losses[step] = stats.loss
        self.train_seconds += seconds
        self.train_tokens += stats.input_tokens
        self.window.append((stats.loss, stats.input_tokens, seconds))
        if step % self.t.log_every_n_steps:
            return
        losses, tokens, times = zip(*self.window, strict=True)
        self.window = []
        self.metrics.log(
            {
                "loss": sum(losses) / len(losses),
                "lr": stats.lr,
                "grad_norm": stats.grad_norm,
                "tokens_per_s": sum(tokens) / max(sum(times), 1e-9),
                "input_tokens": sum(tokens),
                "step_seconds": sum(times),
                "peak_mem_gib": peak_memory_gib(self.accelerator.device),
                **reserved_memory_gib(self.accelerator.device),
                "label_tokens": stats.label_tokens,
                "epoch": self.state.epoch,
            },
            step=step,
        )

    def evaluate(self) -> None:
        """Eval loss on validation; keep the best adapter in OUT/best; early stopping (sets `finished`)."""
        state, t = self.state, self.t
        loss = evaluate(
            self.accelerator,
            self.model,
            self.val_rows,
            cfg=self.cfg,
            pad_id=self.pad_id,
            varlen=self.varlen,
            rows_per_forward=self.plan.rows_per_forward,
        )
        state.last_eval_step = state.global_step
        self.result.eval_losses[state.global_step] = loss
        self.metrics.log({"eval_loss": loss, "epoch": state.epoch}, step=state.global_step)
        if state.best_eval_loss is None or loss < state.best_eval_loss - t.early_stopping_min_delta:
            state.best_eval_loss, state.best_step, state.evals_without_improvement = (
                loss,
                state.global_step,
                0,
            )
            best = self.out / ckpt.BEST
            ckpt.save_adapter(
                self.accelerator,
                self.model,
                best,
                base_model=self.cfg.model.base_model,
                trained=state.updates > 0,
            )
            if self.accelerator.is_main_process:
                write_json_atomic(best / "eval.json", {"step": state.global_step, "eval_loss": loss})
        else:
            state.evals_without_improvement += 1
        if 0 < t.early_stopping_patience <= state.evals_without_improvement:
            _log_main(
                self.accelerator,
                f"early stopping at step {state.global_step}: no eval improvement in "
                f"{state.evals_without_improvement} evals (best {state.best_eval_loss:.4f} at step {state.best_step})",
            )
            state.finished = state.stopped_early = True

    def save_checkpoint(self) -> None:
        ckpt.save_checkpoint(
            self.accelerator,
            self.model,
            out_dir=self.out,
            state=self.state,
            cfg=self.cfg,
            tokenizer=self.tokenizer,
            keep_last=self.t.keep_last_n_checkpoints,
        )
        self.last_saved_step = self.state.global_step

    # ------------------------------------------------------------ save
    def save(self) -> None:
        """After the last step: final eval and checkpoint, the final adapter at OUT's root, the loss plot.

        The root adapter is the best-eval one when an eval ran (as `load_best_model_at_end`), else the
        last weights; tokenizer, chat template, config and trainer state go next to it.
        """
        state, accelerator = self.state, self.accelerator
        state.finished = True
        if self.val_rows and state.last_eval_step != state.global_step and state.global_step > 0:
            self.evaluate()
        if self.last_saved_step != state.global_step:
            self.save_checkpoint()
        best = self.out / ckpt.BEST
        use_best = (
            state.best_step not in (None, state.global_step) and (best / ckpt.ADAPTER_WEIGHTS).is_file()
        )
        if not use_best:
            trained = state.updates > 0
            ckpt.save_adapter(
                accelerator, self.model, self.out, base_model=self.cfg.model.base_model, trained=trained
            )
        if accelerator.is_main_process:
            if use_best:
                ckpt.copy_adapter(best, self.out)
                logger.warning(
                    "final adapter = best eval (step %d, loss %.4f)", state.best_step, state.best_eval_loss
                )
            self.tokenizer.save_pretrained(str(self.out))
            save_config(self.cfg, self.out / ckpt.CONFIG_FILE)
            write_json_atomic(self.out / ckpt.TRAINER_STATE, state.state_dict())
            if (self.out / METRICS_FILE).is_file():
                plot_losses(self.out / METRICS_FILE, self.out / LOSS_PLOT)
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------ cleanup
    def cleanup(self) -> TrainResult:
        """Fill in the result, print the summary, close trackers, restore signal handlers."""
        state, result, accelerator = self.state, self.result, self.accelerator
        result.global_step = state.global_step
        result.best_eval_loss, result.best_step = state.best_eval_loss, state.best_step
        result.stopped_early = state.stopped_early
        result.tokens_per_s = self.train_tokens / self.train_seconds if self.train_seconds else 0.0
        result.peak_mem_gib = peak_memory_gib(accelerator.device)
        if result.preempted:
            accelerator.print(
                f"preempted ({self.preemption.signal}): checkpoint at step {state.global_step} in "
                f"{self.out / ckpt.CHECKPOINTS}; exit {PREEMPTED_EXIT_CODE}, continue with --resume auto"
            )
        else:
            best = (
                f" (best eval loss {state.best_eval_loss:.4f} at step {state.best_step})"
                if state.best_step
                else ""
            )
            accelerator.print(
                f"done: {state.global_step} steps, {result.tokens_per_s:,.0f} tokens/s, peak memory "
                f"{result.peak_mem_gib:.2f} GiB; adapter in {self.out}{best}"
            )
        accelerator.wait_for_everyone()
        accelerator.end_training()
        self.preemption.restore()
        return result


def train(cfg: Config) -> TrainResult:
    """Fine-tune `cfg.model.base_model` with LoRA on `cfg.train.data_dir`; write `cfg.train.output_dir`.

    Raises:
        SlackdistError: bad data, a model that cannot load, a resume path that is not a checkpoint,
            an output folder holding another run's checkpoints, or an adapter that fails verification.
    """
    recipe = LoRARecipe(cfg)
    recipe.setup()
    recipe.fit()
    if not recipe.result.preempted:
        recipe.save()
    result = recipe.cleanup()
    if cfg.train.merge_after_training and not result.preempted and recipe.accelerator.is_main_process:
        from slackdist.train.merge import merge_adapter

        merged = merge_adapter(
            result.output_dir, result.output_dir / MERGED_DIR, max_shard_size=cfg.train.max_shard_size
        )
        print(f"merged model in {merged}")
    return result


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist train`: 0 when done, 75 (EX_TEMPFAIL) when preempted after checkpointing."""
    logging.basicConfig(level=logging.INFO if os.environ.get("SLACKDIST_VERBOSE") else logging.WARNING)
    # Packed batches change shape every step; growable segments keep the allocator from fragmenting
    # (reserved stays close to allocated, which is what lets the plan's budget hold on a small card).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    result = train(cfg)
    return PREEMPTED_EXIT_CODE if result.preempted else 0
