"""Where a run trains: its `Topology`, read once, and every step that differs between topologies.

The launch config (`accelerate launch --config_file launch_configs/<name>.yaml`, or torchrun)
decides the topology; `Topology.of(accelerator)` reads it from the Accelerator once. Everything
else asks the Topology (`sharded`, `device_map`, `loss_chunk_size`, ...) instead of looking at
Accelerate's distributed type, so a new backend touches this file only. Here too: the
Accelerator and its precision, wrapping the model, and building the optimizer and the scheduler
for the topology.

Backends:
- single: one process, CPU or one GPU.
- ddp: several processes, each with the whole model (DistributedDataParallel; gloo on CPUs).
- fsdp1, fsdp2: Accelerate's FSDP plugin, version 1 or 2; parameters sharded over the processes.
- deepspeed: DeepSpeed ZeRO (the stage comes from the launch config).

What a checkpoint holds differs with them too (`Topology.checkpoint_layout`); under FSDP it is
written here, with torch.distributed.checkpoint (`save_sharded_trainable`).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType, ProjectConfiguration
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, StateDictType
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from slackdist.config import Config
from slackdist.errors import SlackdistError, first_line
from slackdist.model.adapter import clean_key, is_lora_key
from slackdist.model.load import resolve_dtype
from slackdist.train.flat import FlatParameters

logger = logging.getLogger(__name__)

Backend = Literal["single", "ddp", "fsdp1", "fsdp2", "deepspeed"]
CheckpointLayout = Literal["adapter", "dcp", "deepspeed"]


@dataclass(frozen=True)
class Topology:
    """How this run is spread over processes and devices (from the launch config)."""

    backend: Backend
    world_size: int
    """Training processes, all nodes."""
    rank: int
    """This process's index among them."""
    device: torch.device
    """Where this process computes."""
    offload_params: bool = False
    """FSDP / DeepSpeed keep parameters (or optimizer states) on the CPU."""
    zero_stage: int = 0
    """DeepSpeed's ZeRO stage (0 for other backends)."""

    @classmethod
    def of(cls, accelerator: Accelerator) -> Topology:
        """The topology the Accelerator was launched with."""
        state, offload, zero = accelerator.state, False, 0
        backend: Backend
        if accelerator.distributed_type == DistributedType.FSDP:
            plugin = state.fsdp_plugin
            backend = "fsdp2" if int(getattr(plugin, "fsdp_version", 1) or 1) == 2 else "fsdp1"
            offload = bool(getattr(plugin.cpu_offload, "offload_params", plugin.cpu_offload))
        elif accelerator.distributed_type == DistributedType.DEEPSPEED:
            backend = "deepspeed"
            plugin = state.deepspeed_plugin
            zero_cfg = plugin.deepspeed_config.get("zero_optimization", {})
            devices = [
                zero_cfg.get(k, {}).get("device", "none") for k in ("offload_param", "offload_optimizer")
            ]
            offload = any(d not in (None, "none") for d in devices)
            zero = int(plugin.zero_stage or 0)
        elif accelerator.distributed_type == DistributedType.NO:
            backend = "single"
        else:  # MULTI_GPU, MULTI_CPU (gloo), and the other data-parallel kinds
            backend = "ddp"
        return cls(
            backend, accelerator.num_processes, accelerator.process_index, accelerator.device, offload, zero
        )

    @property
    def sharded(self) -> bool:
        """Parameters are split over the processes (FSDP, DeepSpeed)."""
        return self.backend in ("fsdp1", "fsdp2", "deepspeed")

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def device_map(self) -> dict[str, torch.device] | None:
        """`from_pretrained`'s device_map: this process's device; none when sharded (FSDP and DeepSpeed
        place and shard the weights; bitsandbytes puts a 4-bit model on the current CUDA device)."""
        return None if self.sharded else {"": self.device}

    def loss_chunk_size(self, configured: int) -> int:
        """`train.loss_chunk_size`, or 0 (the model computes its own logits) when sharded: lm_head's
        weight is only gathered inside the root module's forward under FSDP / ZeRO-3, and calling
        lm_head afterwards would use a resharded, empty parameter."""
        return 0 if self.sharded else configured

    @property
    def checkpoint_layout(self) -> CheckpointLayout:
        """How a checkpoint holds the trained weights and their optimizer state (never the frozen base):

        - adapter (single, ddp): the LoRA weights are the checkpoint's adapter file, the optimizer
          state one `optimizer.bin` (every process holds the same); resumes on any number of processes.
        - dcp (fsdp1, fsdp2): `trainable/`, a torch.distributed.checkpoint folder where each process
          writes its shard of the LoRA weights and their optimizer state; DCP reshards on load, so it
          resumes on any number of processes.
        - deepspeed: DeepSpeed's own files (the trainable parameters, each process's optimizer
          partition); DeepSpeed resumes them on the same number of processes only.
        """
        if self.backend in ("fsdp1", "fsdp2"):
            return "dcp"
        return "deepspeed" if self.backend == "deepspeed" else "adapter"

    @property
    def save_state_kwargs(self) -> dict[str, Any]:
        """For `accelerator.save_state`. DeepSpeed writes the whole module state dict, bitsandbytes'
        quant_state entries (`...weight.absmax`) included, which a strict load rejects: save only the
        trainable parameters (the frozen base comes from the model files at start-up)."""
        return {"exclude_frozen_parameters": True} if self.backend == "deepspeed" else {}

    @property
    def load_state_kwargs(self) -> dict[str, Any]:
        """For `accelerator.load_state`: non-strict under DeepSpeed (see `save_state_kwargs`; the LoRA
        weights come back through the optimizer's fp32 partitions)."""
        return {"load_module_strict": False} if self.backend == "deepspeed" else {}

    def describe(self) -> str:
        offload = ", parameters offloaded to CPU" if self.offload_params else ""
        return f"{self.backend} x {self.world_size} on {self.device.type}{offload}"


def log_main(topology: Topology, message: str) -> None:
    """A warning-level log line from the main process only."""
    if topology.is_main_process:
        logger.warning(message)


def _mixed_precision(cfg: Config) -> str | None:
    """Precision of autocast: the launch config's when launched by accelerate, else from model.dtype."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        return None  # accelerate launch / the launch config decided
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available():
        return "no"
    dtype = resolve_dtype(cfg.model.dtype, "cuda")
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def make_accelerator(cfg: Config, *, logging_dir: Path, metrics_file: Path) -> Accelerator:
    """The run's Accelerator, TensorBoard logs in `logging_dir`. Created before the model: DeepSpeed
    ZeRO-3 must be configured before `from_pretrained` so the weights load partitioned (peft#2014)."""
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        logger.warning("tensorboard is not installed: metrics go to %s only", metrics_file)
    return Accelerator(
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        mixed_precision=_mixed_precision(cfg),
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=cfg.train.output_dir, logging_dir=str(logging_dir)),
        # One scheduler step per optimizer step, whatever the number of processes (by default
        # Accelerate steps the scheduler num_processes times per optimizer step).
        step_scheduler_with_optimizer=False,
    )


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: Config, topology: Topology
) -> torch.optim.Optimizer:
    """Paged AdamW 32-bit where it can run (bitsandbytes, CUDA, params on the GPU, not FSDP2),
    else torch AdamW (fused on CUDA and for CPU-offloaded params)."""
    t = cfg.train
    if t.optimizer == "paged_adamw_32bit":
        reason = None
        if not topology.on_gpu:
            # bitsandbytes' paged memory exists only on CUDA (on CPU it warns and runs unpaged);
            # torch AdamW is the same update and runs fused/foreach on the CPU.
            reason = "not on CUDA"
        elif topology.offload_params:
            reason = "parameters are offloaded to CPU (paged AdamW cannot step them)"
        elif topology.backend == "fsdp2":
            reason = "FSDP2 shards parameters as DTensors, which paged AdamW cannot step (torchtune#1856)"
        else:
            try:  # optional (the [gpu] extra), and a broken native library raises at import
                from bitsandbytes.optim import PagedAdamW32bit
            except Exception as e:
                reason = f"bitsandbytes is not importable ({e})"
        if reason is None:
            return PagedAdamW32bit(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        log_main(topology, f"optimizer: torch AdamW instead of paged_adamw_32bit ({reason})")
    fused = t.optimizer != "adamw_torch" and (topology.on_gpu or topology.offload_params)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int) -> Any:
    """Warmup (ratio of all steps) then cosine / linear decay, or constant."""
    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)
    if cfg.train.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    make = (
        get_cosine_schedule_with_warmup
        if cfg.train.lr_scheduler == "cosine"
        else get_linear_schedule_with_warmup
    )
    return make(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@dataclass
class Wrapped:
    """The model, optimizer and scheduler as `accelerator.prepare` returned them."""

    model: Any
    optimizer: Any
    scheduler: Any
    flat: FlatParameters | None
    """The LoRA weights as one flat parameter the optimizer steps (unsharded runs), else None."""


def wrap(accelerator: Accelerator, topology: Topology, model: Any, cfg: Config, total_steps: int) -> Wrapped:
    """Wrap model, optimizer and scheduler for the topology.

    DeepSpeed and FSDP2: model and optimizer in one `prepare` call (accelerate requires it);
    DeepSpeed's micro-batch size and clipping come from the slackdist config. Elsewhere the model is
    wrapped first and the optimizer built on the wrapped parameters: under FSDP1 it must see FSDP's
    flat parameters (and PEFT's wrap policy gives each LoRA leaf its own unit, so fp32 adapters and
    bf16/4-bit base weights never share one: "Must flatten tensors with uniform dtype"); unsharded,
    the LoRA weights are laid out in one flat parameter that the optimizer steps
    (`slackdist.train.flat`; after wrapping, because moving the model to its device may replace
    parameter data).
    """

    def trainable(m: Any) -> list[torch.nn.Parameter]:
        return [p for p in m.parameters() if p.requires_grad]

    if topology.backend in ("deepspeed", "fsdp2"):
        if topology.backend == "deepspeed":
            ds = accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
            if ds.get("gradient_clipping", "auto") == "auto":
                ds["gradient_clipping"] = cfg.train.max_grad_norm
        optimizer = build_optimizer(trainable(model), cfg, topology)
        scheduler = build_scheduler(optimizer, cfg, total_steps)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        return Wrapped(model, optimizer, scheduler, None)
    if topology.backend == "fsdp1":
        accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    model = accelerator.prepare(model)
    params = trainable(model)
    flat = None
    if not topology.sharded and FlatParameters.possible(params):
        flat = FlatParameters(params)
        params = [flat.flat]
    optimizer = build_optimizer(params, cfg, topology)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    return Wrapped(model, optimizer, scheduler, flat)


def trainable_parameters(accelerator: Accelerator, model: torch.nn.Module) -> int:
    """Trainable parameters of the wrapped model, counted in full (ZeRO-3 partitions them: `ds_numel`)."""
    params = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]
    return sum(getattr(p, "ds_numel", p.numel()) for p in params)


def gather_state_dict(
    accelerator: Accelerator, topology: Topology, model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """The model's full state dict on the main process (collective: every rank calls it).

    Under DeepSpeed ZeRO-3 only the LoRA parameters are gathered: `get_state_dict` would
    consolidate every partitioned tensor of the 4-bit base too, which at Llama-3.2-3B size had not
    finished after minutes (H100). Other ranks get an empty dict there.
    """
    if topology.zero_stage != 3:
        reshard_fsdp2(topology, model)
        return accelerator.get_state_dict(model)
    import deepspeed  # only installed where a DeepSpeed launch config is used

    named = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if ".lora_" in n]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        if not topology.is_main_process:
            return {}
        return {n: p.detach().to("cpu", copy=True) for n, p in named}


# ------------------------------------------------------------------ FSDP checkpoints (torch.distributed.checkpoint)


def _plain_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper: torch's optimizer state-dict functions step an
    optimizer once to build an empty state, which through the wrapper would also step an fp16 GradScaler."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _sharded_lora_weights(topology: Topology, model: torch.nn.Module) -> dict[str, Any]:
    """This process's shard of every LoRA matrix, by parameter name (collective under FSDP1).

    FSDP2 keeps each parameter as a DTensor holding this process's shard, so the parameters
    themselves go to DCP (which then loads into them in place). FSDP1 with flat parameters has no
    per-matrix tensors: its sharded state dict builds one ShardedTensor per original parameter (under
    NO_SHARD, i.e. one process, a full tensor), gathering each FSDP unit in turn. In both cases only
    the LoRA tensors are kept: not the frozen 4-bit base, nor the quantization state bitsandbytes adds
    to a state dict. (torch's `get_model_state_dict` is not used: it looks up every state-dict key
    as an attribute path, and bitsandbytes' `weight.absmax`-style keys are not attributes.)
    """
    if topology.backend == "fsdp2":
        return {clean_key(n): p.detach() for n, p in model.named_parameters() if p.requires_grad}
    with FullyShardedDataParallel.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        state = model.state_dict()
    return {clean_key(k): v for k, v in state.items() if is_lora_key(k)}


def reshard_fsdp2(topology: Topology, model: torch.nn.Module) -> None:
    """Register FSDP2's sharded parameters again where a forward left them unsharded.

    FSDP2 swaps a module's parameters for unsharded ones during forward and backward, and the root
    module stays unsharded after a forward (its backward comes next). After a forward without a
    backward (an eval pass), `named_parameters()` therefore yields unsharded tensors for the root's
    parameters (lm_head's LoRA here) that the optimizer does not know: the state-dict functions fail
    on them (KeyError in torch's optimizer state dict) or would save them unsharded.
    """
    if topology.backend == "fsdp2":
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def _sharded_trainable_state(topology: Topology, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """{"model": LoRA weight shards, "optimizer": their optimizer state shards}, keyed by parameter
    name (collective). The optimizer part comes from torch's `get_optimizer_state_dict`, which
    names states by parameter and shards them as the parameters are (and first gives a fresh
    optimizer its empty state with one zero-learning-rate step, so a load has shapes to fill)."""
    reshard_fsdp2(topology, model)
    return {
        "model": _sharded_lora_weights(topology, model),
        "optimizer": get_optimizer_state_dict(model, _plain_optimizer(optimizer)),
    }


def save_sharded_trainable(
    topology: Topology, model: torch.nn.Module, optimizer: Any, path: str | os.PathLike[str]
) -> None:
    """Write the LoRA weights and their optimizer state with torch.distributed.checkpoint: each
    process writes its own shard (`__<rank>_0.distcp`), the main process `.metadata`. Collective."""
    dcp.save(_sharded_trainable_state(topology, model, optimizer), checkpoint_id=str(path))


def load_sharded_trainable(
    topology: Topology, model: torch.nn.Module, optimizer: Any, path: str | os.PathLike[str]
) -> None:
    """Load what `save_sharded_trainable` wrote, on any number of processes: each process asks DCP
    for the part of every tensor it holds now, whatever the sharding that wrote it. Collective.

    Raises:
        SlackdistError: the checkpoint does not fit this run (other LoRA modules, another optimizer).
    """
    state = _sharded_trainable_state(topology, model, optimizer)  # the shapes and shards to fill
    try:
        dcp.load(state, checkpoint_id=str(path))
    except CheckpointException as e:  # a BaseException: one entry per failing rank
        raise SlackdistError(
            f"{path}: cannot resume: it does not fit this run's LoRA weights or optimizer ({first_line(e)})"
        ) from None
    if topology.backend == "fsdp1":
        # FSDP1 warns once per frozen parameter that the (LoRA-only) state dict lacks.
        fsdp_log = logging.getLogger("torch.distributed.fsdp._state_dict_utils")
        level = fsdp_log.level
        fsdp_log.setLevel(logging.ERROR)
        try:
            with FullyShardedDataParallel.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
                model.load_state_dict(state["model"], strict=False)
        finally:
            fsdp_log.setLevel(level)
    set_optimizer_state_dict(model, _plain_optimizer(optimizer), state["optimizer"])
