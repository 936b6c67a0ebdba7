"""The output folder of a training run: what goes where, and the saves that write it.

    OUT/adapter_model.safetensors, adapter_config.json   the final adapter (the best-eval one when an
                                                          eval ran, else the last weights)
    OUT/tokenizer.json, chat_template.jinja, ...          the tokenizer with its chat template
    OUT/slackdist_config.yaml, slackdist_inference.json   the resolved config and how to prompt the model
    OUT/trainer_state.json                                where training ended
    OUT/metrics.jsonl, loss.png, runs/                    metrics (`slackdist.train.metrics`), TensorBoard
    OUT/best/                                             the best-eval adapter (+ eval.json)
    OUT/checkpoints/step-000100/                          adapter + `accelerator.save_state` files
                                                          (optimizer, scheduler, every rank's RNG) +
                                                          trainer_state.json, the newest K and the best
    OUT/merged/                                           with train.merge_after_training

Every model folder here (OUT, best/, each checkpoint) carries the tokenizer, the config and
`slackdist_inference.json` (`slackdist.model.info`), so chat, eval and serve load any of them alone.
A run stopped by SIGTERM / SIGUSR1 (`PreemptionFlag`) checkpoints and exits; `--resume auto`
(`resume_point`) continues from the newest complete checkpoint.

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

import copy
import json
import logging
import os
import re
import shutil
import signal
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft import set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slackdist.config import Config, save_config
from slackdist.data.records import format_system_prompt
from slackdist.errors import SlackdistError, first_line
from slackdist.files import write_json_atomic
from slackdist.model.info import (
    CONFIG_FILE,
    DEFAULT_CHANNEL,
    PERSONA_PLACEHOLDER,
    UNKNOWN_WORKSPACE,
    ModelInfo,
    write_model_info,
)
from slackdist.model.template import chat_template_name
from slackdist.train.distributed import Topology, gather_state_dict

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
BEST = "best"
BEST_EVAL = "eval.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
RUNS_DIR = "runs"
MERGED_DIR = "merged"
PREPARE_REPORT = "report.json"
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


def save_adapter(
    accelerator: Accelerator,
    topology: Topology,
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
        topology: how the run is spread (what gathering the weights takes).
        model: the prepared model.
        out_dir: folder for adapter_model.safetensors + adapter_config.json (created).
        base_model: recorded as `base_model_name_or_path` (absolute when it is a local folder).
        trained: at least one optimizer step ran; then every lora_B must be non-zero.

    Returns:
        The adapter weights path on the main process, None elsewhere.

    Raises:
        SlackdistError: the written adapter fails verification.
    """
    full = gather_state_dict(accelerator, topology, model)
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


# ------------------------------------------------------------------ checkpoints and resume


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


def resume_point(cfg: Config) -> Path | None:
    """The checkpoint to resume from (checked before anything heavy loads).

    Raises:
        SlackdistError: `--resume PATH` is not a checkpoint, or a fresh run would mix with an earlier
            run's checkpoints in the same output folder.
    """
    out = Path(cfg.train.output_dir)
    found = resolve_resume(cfg.train.resume, out)
    if found is None and not cfg.train.resume and find_latest_checkpoint(out) is not None:
        raise SlackdistError(
            f"{out / CHECKPOINTS}: checkpoints of an earlier run; continue it with --resume auto, "
            "or train into another --output (or delete that folder)"
        )
    return found


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


def load_checkpoint_state(
    accelerator: Accelerator, topology: Topology, checkpoint: str | os.PathLike[str]
) -> None:
    """`accelerator.load_state` of a checkpoint: adapter (or FSDP / DeepSpeed shards), optimizer, scheduler,
    RNG of every rank and the registered trainer state. Collective.

    Raises:
        SlackdistError: the optimizer state does not fit this run's optimizer (a checkpoint written
            by another slackdist version, optimizer or launch config).
    """
    try:
        accelerator.load_state(str(checkpoint), **topology.load_state_kwargs)
    except (
        ValueError
    ) as e:  # torch.optim: "loaded state dict contains a parameter group that doesn't match..."
        raise SlackdistError(
            f"{checkpoint}: cannot resume: its optimizer state does not fit this run ({first_line(e)}); "
            "it was written by another slackdist version, optimizer or launch config"
        ) from None


def register_adapter_state_hooks(
    accelerator: Accelerator, topology: Topology, model: torch.nn.Module
) -> None:
    """Make `save_state` / `load_state` carry only the LoRA weights, via the checkpoint's adapter file.

    Unsharded, accelerate would write the whole model (4-bit base included, ~2 GB at 3B) into every
    checkpoint. The save hook drops those weights (the adapter is saved next to them anyway); the
    load hook loads the adapter instead. Sharded (FSDP / DeepSpeed), accelerate saves each rank's
    shard itself (these hooks see no weights there) and loads it back.
    """
    if topology.sharded:
        return

    def drop_weights(models: list, weights: list, output_dir: str) -> None:
        weights.clear()

    def load_adapter(models: list, input_dir: str) -> None:
        models.clear()  # the local list load_state builds; accelerator._models is untouched
        load_adapter_weights(accelerator.unwrap_model(model), input_dir)

    accelerator.register_save_state_pre_hook(drop_weights)
    accelerator.register_load_state_pre_hook(load_adapter)


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1; the recipe finishes the current optimizer step, checkpoints and exits 75."""

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


# ------------------------------------------------------------------ model folders


def prepared_workspace(data_dir: str | os.PathLike[str]) -> str | None:
    """The workspace name `prepare` put into the records' system prompts (its report.json), if known."""
    try:
        report = json.loads((Path(data_dir) / PREPARE_REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    workspace = report.get("workspace") if isinstance(report, dict) else None
    return workspace if isinstance(workspace, str) and workspace else None


def model_info(cfg: Config, tokenizer: Any) -> ModelInfo:
    """How the trained model is prompted: training's system prompt for #general (the template and
    persona of `cfg.data`; the workspace of `data.workspace`, else of the prepared data, else "Slack")
    and the chat template its tokenizer renders."""
    workspace = cfg.data.workspace or prepared_workspace(cfg.train.data_dir) or UNKNOWN_WORKSPACE

    def prompt(persona: str | None) -> str:
        return format_system_prompt(
            cfg.data.system_prompt, workspace=workspace, channel=DEFAULT_CHANNEL, persona=persona
        )

    return ModelInfo(
        workspace=workspace,
        system_prompt=prompt(None),
        persona_system_prompt=prompt(PERSONA_PLACEHOLDER),
        persona=cfg.data.persona,
        chat_template=chat_template_name(tokenizer),
    )


class OutputFolder:
    """OUT of one run and the saves into it (module docstring). Saves are collective: every rank
    calls them (weights are gathered, sharded state is written per rank); the main process writes
    the rest, each file or folder under a temporary name first."""

    def __init__(self, cfg: Config, *, accelerator: Accelerator, topology: Topology, tokenizer: Any) -> None:
        self.path = Path(cfg.train.output_dir)
        self.cfg = cfg
        self.accelerator = accelerator
        self.topology = topology
        self.tokenizer = tokenizer
        self.info = model_info(cfg, tokenizer)
        self.metrics_file = self.path / METRICS_FILE
        self.loss_plot = self.path / LOSS_PLOT
        self.best = self.path / BEST
        self.checkpoints = self.path / CHECKPOINTS
        self.merged = self.path / MERGED_DIR

    def create(self) -> None:
        """Make OUT and put the resolved config in it first (main process)."""
        if self.topology.is_main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.path / CONFIG_FILE)

    def _describe(self, folder: Path) -> None:
        """What makes a model folder loadable alone: tokenizer, config, model info (main process)."""
        self.tokenizer.save_pretrained(str(folder))
        save_config(self.cfg, folder / CONFIG_FILE)
        write_model_info(self.info, folder)

    def _adapter(self, model: torch.nn.Module, folder: Path, state: TrainerState) -> None:
        save_adapter(
            self.accelerator,
            self.topology,
            model,
            folder,
            base_model=self.cfg.model.base_model,
            trained=state.updates > 0,
        )

    def save_checkpoint(self, model: torch.nn.Module, state: TrainerState) -> Path:
        """Write OUT/checkpoints/step-N: `save_state` + adapter + tokenizer + config + trainer_state.json.

        Each rank writes its RNG state and, under FSDP / DeepSpeed, its shard. Everything goes into
        a temp folder that the main process renames when complete, so a run killed mid-save leaves
        no half checkpoint for `--resume auto` to pick; then all but the newest
        `train.keep_last_n_checkpoints` (and the best) are deleted.

        Returns:
            The checkpoint folder.
        """
        accelerator, main = self.accelerator, self.topology.is_main_process
        final = checkpoint_dir(self.path, state.global_step)
        tmp = final.with_name(f".tmp-{final.name}")
        if main and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), **self.topology.save_state_kwargs)
        self._adapter(model, tmp, state)
        if main:
            self._describe(tmp)
            write_json_atomic(tmp / TRAINER_STATE, state.state_dict())
        accelerator.wait_for_everyone()
        if main:
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune_checkpoints(self.path, self.cfg.train.keep_last_n_checkpoints, protect=state.best_step)
        accelerator.wait_for_everyone()
        return final

    def save_best(self, model: torch.nn.Module, state: TrainerState, eval_loss: float) -> None:
        """The adapter of a new best eval into OUT/best, with its eval.json."""
        self._adapter(model, self.best, state)
        if self.topology.is_main_process:
            self._describe(self.best)
            write_json_atomic(self.best / BEST_EVAL, {"step": state.global_step, "eval_loss": eval_loss})

    def save_final(self, model: torch.nn.Module, state: TrainerState) -> None:
        """The final adapter at OUT's root, with tokenizer, config, model info and trainer state.

        The root adapter is the best-eval one when an eval ran (as `load_best_model_at_end`),
        else the last weights.
        """
        use_best = (
            state.best_step not in (None, state.global_step) and (self.best / ADAPTER_WEIGHTS).is_file()
        )
        if not use_best:
            self._adapter(model, self.path, state)
        if self.topology.is_main_process:
            if use_best:
                copy_adapter(self.best, self.path)
                logger.warning(
                    "final adapter = best eval (step %d, loss %.4f)", state.best_step, state.best_eval_loss
                )
            self._describe(self.path)
            write_json_atomic(self.path / TRAINER_STATE, state.state_dict())
        self.accelerator.wait_for_everyone()
