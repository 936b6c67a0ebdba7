"""`torch.compile` of each decoder layer (torchtune's `compile: True`, per layer like its recipes).

Compiling layer by layer rather than the whole model keeps the graphs small and shared: every
layer runs the same code, so a handful of graphs serve all of them (9 for the 28 layers of
Llama-3.2-3B as measured on an H100), and the chunked loss, the data pipeline and
PEFT's wrapper stay eager. Inductor fuses what eager runs as separate kernels: RMSNorm, RoPE, SiLU x up, the LoRA
dropout, scaling and add, and the casts between them.

Attention is left out of the graphs (`torch.compiler.disable` on the attention function): the
varlen kernel takes per-batch sequence boundaries, and tracing them would recompile for every new
packing. The layer's inputs change shape with every batch, so after the first recompilation dynamo
marks them dynamic and later batches reuse the graphs. Compiling dynamic from the first step
(`dynamic=True`) compiles each graph once but far more slowly: 92 s for the first step against
22.5 s + 3.8 s static first, on an H100 at 3B from a cold cache (bench/README.md).

A run compiles under a job id of its workload (`compile_job_id`): dynamo then keeps its profile of
which input sizes varied beside inductor's compiled graphs, and the next run of the same workload
compiles once, dynamic from the start, from the compiled graphs on disk. That profile on disk is also
how `compiled_before` tells a warm cache from a cold one (the log says which).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a (PEFT-wrapped) Hugging Face model: modules whose class is in the
    model's `_no_split_modules` (e.g. LlamaDecoderLayer), outermost only."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    layers: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():  # pre-order: a block comes before its children
        if id(module) not in inside and type(module).__name__ in names:
            layers.append(module)
            inside.update(id(m) for m in module.modules())
    return layers


def compile_decoder_layers(model: torch.nn.Module, *, backend: str = "inductor") -> int:
    """Compile every decoder layer of `model` in place; return how many were compiled.

    Args:
        model: a loaded model (PEFT-wrapped or not), before or after `accelerator.prepare`.
        backend: a `torch.compile` backend ("inductor"; tests use "aot_eager" on CPU).
    """
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend)
    if not layers:
        logger.warning("compile: no decoder layers found (no _no_split_modules); running eager")
    return len(layers)


def should_compile(
    setting: str, *, device_type: str, sharded: bool, steps: int = 0, min_steps: int = 0
) -> tuple[bool, str]:
    """`train.compile` decided for one run: (compile or not, why).

    "on" and "off" are obeyed. "auto" compiles an unsharded model on a CUDA GPU when the run has at
    least `min_steps` optimizer steps: compilation is a fixed cost paid at the first steps, and a
    short run (a small workspace's export) finishes sooner eager.
    """
    if setting != "auto":
        return setting == "on", f"train.compile={setting}"
    if device_type != "cuda":
        return False, "not on a CUDA GPU"
    if sharded:
        return False, "FSDP / DeepSpeed"
    if steps < min_steps:
        return False, f"{steps} steps < train.compile_min_steps={min_steps}: eager is sooner done"
    return True, f"{steps} steps >= train.compile_min_steps={min_steps}"


def compile_job_id(model: torch.nn.Module, *, device: torch.device, settings: Mapping[str, Any]) -> str:
    """torch.compile's job id for this workload: what shapes the compiled layers' graphs, hashed.

    Runs with one id share dynamo's profile of which input sizes vary (`torch.compiler.config.job_id`):
    the model's architecture, the settings that change its layers (LoRA, quantization, FP8, the memory
    plan's inputs), the GPU and torch. A user's TORCH_COMPILE_JOB_ID is kept.
    """
    config = getattr(torch.compiler, "config", None)
    if config is not None and config.job_id:
        return config.job_id
    architecture = model.config.to_dict()
    for key in ("_name_or_path", "name_or_path", "transformers_version"):
        architecture.pop(key, None)
    what = {
        "model": architecture,
        "settings": settings,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    return f"slackdist-{digest[:16]}"


def compiled_before(job_id: str) -> bool:
    """Whether a run of `job_id` compiled with this compile cache: dynamo's profile of it is on disk.

    The profile lives in inductor's cache folder (`slackdist.caches.keep_compile_caches`) beside the
    compiled graphs, so emptying that folder makes the next run cold again. False where torch has no
    such profiles (before 2.6).
    """
    try:
        from torch._dynamo import pgo

        with torch.compiler.config.patch(job_id=job_id):
            path = pgo.code_state_path(pgo.get_cache_key())
    except (ImportError, AttributeError):
        return False
    return path is not None and os.path.exists(path)


@contextlib.contextmanager
def compile_job(job_id: str | None) -> Iterator[None]:
    """Compile under `job_id` (None: as torch would anyway) while the block runs."""
    if job_id is None or getattr(torch.compiler, "config", None) is None:
        yield
        return
    with torch.compiler.config.patch(job_id=job_id):
        yield
