"""Adapter saves, checkpoints and resume for the training loop.

Layout (see COMMON.md): OUT/adapter_model.safetensors + adapter_config.json (final adapter),
OUT/best/ (best-eval adapter), OUT/checkpoints/step-000100/ (adapter + tokenizer +
slackdist_config.yaml + trainer_state.json + `accelerator.save_state` files).

Why the adapter is written by hand (workaround B of ../shared/notes/fsdp_qlora_measured.md):
peft 0.21 picks adapter keys by walking the live module tree and strips only a *leading*
`_fsdp_wrapped_module.`, so under FSDP1 a stock `save_pretrained(state_dict=...)` silently
drops every layer's LoRA and writes an (almost) empty adapter. `accelerator.get_state_dict`
itself is correct under FSDP1/FSDP2/ZeRO-3 (a collective: every rank calls it), so we take the
`lora_A` / `lora_B` entries from it, name them as PEFT does, write them with safetensors and
write `adapter_config.json` with `peft_config.save_pretrained`. Only LoRA tensors are kept,
which is `save_embedding_layers=False`: no copy of the (tied) embedding in every checkpoint
(+788 MB at Llama-3.2-3B size). Every save is verified: 2 tensors per LoRA-wrapped module,
and after training no `lora_B` may be all zeros.

The adapter is one safetensors file, not shards: peft 0.21's `load_peft_weights` reads only
`adapter_model.safetensors` (a 3B r=64 adapter on every projection + lm_head is ~420 MB in
fp32). Merged models are sharded (`slackdist.train.merge`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slackdist.errors import SlackdistError, first_line
from slackdist.files import write_json_atomic

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from slackdist.config import Config

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "slackdist_config.yaml"
CHECKPOINTS = "checkpoints"
BEST = "best"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Wrapper names that FSDP / activation checkpointing / torch.compile / DDP put into parameter names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass
class TrainerState:
    """Where training is: saved with every checkpoint (`register_for_checkpointing` + trainer_state.json)."""

    global_step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch (0-based)."""
    step_in_epoch: int = 0
    """Optimizer steps done in `epoch`."""
    rows_done_in_epoch: int = 0
    """Packed rows of `epoch` already trained on: resume starts at the next one."""
    best_eval_loss: float | None = None
    """Lowest eval loss so far (per label token)."""
    best_step: int | None = None
    """Step of `best_eval_loss`."""
    last_eval_step: int | None = None
    """Step of the most recent evaluation."""
    evals_without_improvement: int = 0
    """Early-stopping patience counter."""
    tokens_seen: int = 0
    """Real (non-padding) input tokens trained on, all ranks."""
    updates: int = 0
    """Optimizer steps taken with a learning rate > 0 (the first warmup step has lr 0): after one,
    every lora_B must be non-zero."""
    stopped_early: bool = False
    """Early stopping fired."""
    finished: bool = False
    """Training reached its end (epochs, max_steps or early stopping)."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        for key, value in state.items():
            if key in names:
                setattr(self, key, value)


# ------------------------------------------------------------------ adapter


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA adapter (works through DDP/FSDP wrappers)."""
    from peft.tuners.lora import LoraLayer

    return [clean_key(name) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def clean_key(key: str) -> str:
    """A parameter name without FSDP / checkpoint / compile / DDP wrapper parts."""
    for part in _WRAPPER_PARTS:
        key = key.replace(part, "")
    return key.removeprefix("module.")


def adapter_state_dict(
    state_dict: dict[str, torch.Tensor], adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a full model state dict, named as PEFT saves them.

    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight` becomes
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; tensors are moved to the CPU
    as contiguous copies (safetensors needs both, and refuses tensors that share memory).
    """
    out = {}
    # lora_A/lora_B of Linear layers (`...lora_A.default.weight`) and, when an embedding is targeted
    # (e.g. by PEFT's ensure_weight_tying), lora_embedding_A/B (`...lora_embedding_A.default`).
    marker = re.compile(rf"\.(lora_(?:embedding_)?[AB])\.{re.escape(adapter_name)}(\.|$)")
    for key, tensor in state_dict.items():
        key = clean_key(key)
        if marker.search(key):
            out[marker.sub(r".\1\2", key)] = tensor.detach().to("cpu", copy=True).contiguous()
    return out


def verify_adapter(path: str | os.PathLike[str], expected_modules: int, *, trained: bool) -> int:
    """Check a written adapter: 2 tensors per LoRA module, and no all-zero lora_B after training.

    Returns:
        The number of tensors.

    Raises:
        SlackdistError: missing tensors (the silent FSDP1 adapter loss) or untrained lora_B.
    """
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        b_keys = [k for k in keys if re.search(r"\.lora_(embedding_)?B\b", k)] if trained else []
        zero_b = [k for k in b_keys if not f.get_tensor(k).any()]
    if len(keys) != 2 * expected_modules:
        raise SlackdistError(
            f"{path}: {len(keys)} tensors, expected {2 * expected_modules} (lora_A and lora_B of "
            f"{expected_modules} modules): the adapter lost layers while saving"
        )
    if zero_b:
        raise SlackdistError(
            f"{path}: {len(zero_b)} lora_B tensors are all zeros after training (first: {zero_b[0]})"
        )
    return len(keys)


def gather_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict on the main process (collective: every rank calls it).

    Under DeepSpeed ZeRO-3 only the LoRA parameters are gathered: `get_state_dict` would
    consolidate every partitioned tensor of the 4-bit base too, which at Llama-3.2-3B size had not
    finished after minutes (H100). Other ranks get an empty dict there.
    """
    from accelerate.utils import DistributedType

    plugin = accelerator.state.deepspeed_plugin
    if accelerator.distributed_type != DistributedType.DEEPSPEED or plugin.zero_stage != 3:
        return accelerator.get_state_dict(model)
    import deepspeed

    named = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if ".lora_" in n]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        if not accelerator.is_main_process:
            return {}
        return {n: p.detach().to("cpu", copy=True) for n, p in named}


def save_adapter(
    accelerator: Accelerator,
    model: torch.nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    base_model: str,
    trained: bool,
) -> Path | None:
    """Write the LoRA adapter of a (possibly FSDP / DeepSpeed wrapped) PEFT model, PEFT-loadable.

    Collective: every rank must call it (it gathers the full state dict); only the main process
    writes. Files are written under temporary names and moved into `out_dir`.

    Args:
        accelerator: the run's accelerator.
        model: the prepared model.
        out_dir: folder for adapter_model.safetensors + adapter_config.json (created).
        base_model: recorded as `base_model_name_or_path` (absolute when it is a local folder).
        trained: at least one optimizer step ran; then every lora_B must be non-zero.

    Returns:
        The adapter weights path on the main process, None elsewhere.

    Raises:
        SlackdistError: the written adapter fails verification.
    """
    import copy

    from safetensors.torch import save_file

    full = gather_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    peft_model = accelerator.unwrap_model(model)
    adapter_name = getattr(peft_model, "active_adapter", "default")
    tensors = adapter_state_dict(full, adapter_name)
    del full
    expected = len(lora_module_names(peft_model))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-tmp-", dir=out))
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        verify_adapter(tmp / ADAPTER_WEIGHTS, expected, trained=trained)
        peft_config = copy.deepcopy(peft_model.peft_config[adapter_name])
        peft_config.inference_mode = True
        peft_config.base_model_name_or_path = _base_reference(base_model)
        peft_config.save_pretrained(str(tmp))
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / ADAPTER_WEIGHTS


def _base_reference(base_model: str) -> str:
    path = Path(base_model)
    return str(path.resolve()) if path.is_dir() else base_model


def load_adapter_weights(model: torch.nn.Module, adapter_dir: str | os.PathLike[str]) -> None:
    """Load adapter_model.safetensors into a PEFT model's active adapter (resume, non-sharded runs).

    Raises:
        SlackdistError: the file is missing or does not fit the model.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise SlackdistError(f"{path}: missing; cannot resume from {adapter_dir}")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing_lora = [k for k in (getattr(result, "missing_keys", []) or []) if ".lora_" in k]
    if unexpected or missing_lora:
        raise SlackdistError(
            f"{path}: does not match the model ({len(unexpected)} unexpected, {len(missing_lora)} missing LoRA tensors)"
        )


def copy_adapter(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy adapter_model.safetensors + adapter_config.json from one folder to another (atomically per file)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        tmp = dst / f".{name}.tmp"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, dst / name)


# ------------------------------------------------------------------ checkpoints


def checkpoint_dir(out_dir: str | os.PathLike[str], step: int) -> Path:
    """OUT/checkpoints/step-000100."""
    return Path(out_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp folders of an interrupted save are skipped)."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in OUT/checkpoints, or None."""
    checkpoints = list_checkpoints(out_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(resume: str | None, out_dir: str | os.PathLike[str]) -> Path | None:
    """`--resume auto` -> newest checkpoint in OUT (None when there is none); a path -> that checkpoint.

    Raises:
        SlackdistError: the given path is not a checkpoint folder.
    """
    if not resume:
        return None
    if resume == "auto":
        return find_latest_checkpoint(out_dir)
    path = Path(resume)
    if path.is_dir() and not (path / TRAINER_STATE).is_file():
        latest = find_latest_checkpoint(path)  # a run's output folder
        if latest is not None:
            return latest
    if not (path / TRAINER_STATE).is_file():
        raise SlackdistError(
            f"{resume}: not a checkpoint (no {TRAINER_STATE}); expected OUT/checkpoints/step-N"
        )
    return path


def load_trainer_state(checkpoint: str | os.PathLike[str]) -> TrainerState:
    """Read trainer_state.json of a checkpoint.

    Raises:
        SlackdistError: missing or unreadable file.
    """
    path = Path(checkpoint) / TRAINER_STATE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SlackdistError(f"{path}: cannot read trainer state ({e})") from None
    state = TrainerState()
    state.load_state_dict(data)
    return state


def prune_checkpoints(
    out_dir: str | os.PathLike[str], keep_last: int, *, protect: int | None = None
) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, never the one of step `protect` (the best).

    Returns:
        The deleted folders.
    """
    checkpoints = list_checkpoints(out_dir)
    keep = set(checkpoints[-keep_last:]) if keep_last > 0 else set()
    if protect is not None:
        keep.add(checkpoint_dir(out_dir, protect))
    removed = [path for path in checkpoints if path not in keep]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def save_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    *,
    out_dir: str | os.PathLike[str],
    state: TrainerState,
    cfg: Config,
    tokenizer: Any,
    keep_last: int,
) -> Path:
    """Write OUT/checkpoints/step-N: `save_state` + adapter + tokenizer + config + trainer_state.json.

    Collective (every rank calls it; each writes its RNG state and, under FSDP/DeepSpeed, its shard).
    Everything goes into a temp folder that the main process renames when complete, so a run killed
    mid-save leaves no half checkpoint for `--resume auto` to pick.

    Returns:
        The checkpoint folder.
    """
    from slackdist.config import save_config

    final = checkpoint_dir(out_dir, state.global_step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), **_deepspeed_kwargs(accelerator, "save"))
    save_adapter(accelerator, model, tmp, base_model=cfg.model.base_model, trained=state.updates > 0)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(str(tmp))
        save_config(cfg, tmp / CONFIG_FILE)
        write_json_atomic(tmp / TRAINER_STATE, state.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(out_dir, keep_last, protect=state.best_step)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint_state(accelerator: Accelerator, checkpoint: str | os.PathLike[str]) -> None:
    """`accelerator.load_state` of a checkpoint: adapter (or FSDP / DeepSpeed shards), optimizer, scheduler,
    RNG of every rank and the registered trainer state. Collective.

    Raises:
        SlackdistError: the optimizer state does not fit this run's optimizer (a checkpoint written
            by another slackdist version, optimizer or launch config).
    """
    try:
        accelerator.load_state(str(checkpoint), **_deepspeed_kwargs(accelerator, "load"))
    except (
        ValueError
    ) as e:  # torch.optim: "loaded state dict contains a parameter group that doesn't match..."
        raise SlackdistError(
            f"{checkpoint}: cannot resume: its optimizer state does not fit this run ({first_line(e)}); "
            "it was written by another slackdist version, optimizer or launch config"
        ) from None


def _deepspeed_kwargs(accelerator: Accelerator, mode: str) -> dict[str, Any]:
    """DeepSpeed writes the whole module state dict, including bitsandbytes' quant_state entries
    (`...weight.absmax`, `...weight.quant_map`), which a strict load rejects as unexpected keys. The frozen
    base comes from the model files at startup anyway: save only trainable parameters, load non-strictly
    (the LoRA weights come back through the optimizer's fp32 partitions)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return {}
    return {"exclude_frozen_parameters": True} if mode == "save" else {"load_module_strict": False}


def register_adapter_state_hooks(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Make `save_state` / `load_state` carry only the LoRA weights, via the checkpoint's adapter file.

    Without FSDP/DeepSpeed, accelerate would write the whole model (4-bit base included, ~2 GB at
    3B) into every checkpoint. The save hook drops those weights (the adapter is saved next to them
    anyway); the load hook loads the adapter instead. Under FSDP/DeepSpeed accelerate saves each
    rank's shard itself (these hooks see no weights there) and loads it back.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return

    def drop_weights(models: list, weights: list, output_dir: str) -> None:
        weights.clear()

    def load_adapter(models: list, input_dir: str) -> None:
        models.clear()  # the local list load_state builds; accelerator._models is untouched
        load_adapter_weights(accelerator.unwrap_model(model), input_dir)

    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(load_adapter)
