"""The output folder of a training run: what goes where, and the saves that write it.

    OUT/adapter_model.safetensors, adapter_config.json   the final adapter (the best-eval one when an
                                                          eval ran, else the last weights)
    OUT/tokenizer.json, chat_template.jinja, ...          the tokenizer with its chat template
    OUT/slackdist_config.yaml, slackdist_inference.json   the resolved config and how to prompt the model
    OUT/trainer_state.json                                where training ended
    OUT/metrics.jsonl, loss.png, runs/                    metrics (`slackdist.train.metrics`), TensorBoard
    OUT/provenance.jsonl                                  whose messages the data holds (`slackdist.data.provenance`)
    OUT/best/                                             the best-eval adapter (+ eval.json), written with
                                                          each checkpoint and at the end
    OUT/checkpoints/step-000100/                          a checkpoint (below): the newest K and the best
    OUT/merged/                                           with train.merge_after_training

While a run runs it writes only its records into OUT (`RUN_RECORDS`: checkpoints/, runs/,
metrics.jsonl, best/, provenance.jsonl), each folder renamed into place whole; an earlier run's final output at OUT's
root stays as it was. At the end the final output (adapter, tokenizer, config, model info, trainer
state, loss plot, merged/) is built in a temporary folder next to OUT, the records are hard-linked
into it, and it replaces OUT by one rename (`OutputFolder.install_final`, `slackdist.files`): OUT
holds one run's model throughout, never a mix of two.

A checkpoint holds what training changes and nothing of the frozen base:

    adapter_model.safetensors, adapter_config.json   the LoRA weights, gathered (loadable by chat/eval/merge)
    trainer_state.json                               step, epoch, rows of the epoch done (the data
                                                      position), best eval, patience
    scheduler.bin, random_states_<rank>.pkl          the LR schedule; every process's RNG (LoRA dropout)
    optimizer.bin                                    single / DDP: the optimizer state (one copy)
    trainable/                                       FSDP1 / FSDP2: torch.distributed.checkpoint, each
                                                      process's shard of the LoRA weights + optimizer state
    pytorch_model/                                   DeepSpeed: its trainable parameters + each process's
                                                      optimizer partition
    tokenizer files, slackdist_config.yaml, slackdist_inference.json
    manifest.json                                    every file's size and hash, written last

(`Topology.checkpoint_layout` says which of the three optimizer layouts a run writes.) Everything
goes into a temporary folder that is renamed when complete. `--resume auto` (`resume_point`) takes
the newest checkpoint whose files all match their manifest (`slackdist.train.manifest`) and says
which newer ones it skipped and why. Single / DDP and FSDP checkpoints resume on any number of
processes; DeepSpeed ones on the number that wrote them. A run stopped by SIGTERM / SIGUSR1
(`PreemptionFlag`) checkpoints and exits.

Every model folder here (OUT, best/, each checkpoint) carries the tokenizer, the config and
`slackdist_inference.json` (`slackdist.model.info`), so chat, eval and serve load any of them alone.

Why the adapter is written by hand (measured with FSDP1 and FSDP2 + 4-bit on a GPU):
peft 0.21 picks adapter keys by walking the live module tree and strips only a *leading*
`_fsdp_wrapped_module.`, so under FSDP1 a stock `save_pretrained(state_dict=...)` silently
drops every layer's LoRA and writes an (almost) empty adapter. `accelerator.get_state_dict`
itself is correct under FSDP1/FSDP2/ZeRO-3 (a collective: every rank calls it), so we take the
`lora_A` / `lora_B` entries from it, name them as PEFT does, write them with safetensors and
write `adapter_config.json` with `peft_config.save_pretrained`. Only LoRA tensors are kept,
which is `save_embedding_layers=False`: no copy of the (tied) embedding in every checkpoint
(+788 MB at Llama-3.2-3B size). Every save is checked (`slackdist.model.adapter`): lora_A and
lora_B of every LoRA module, and after training no `lora_B` may be all zeros; the number of
updates goes into the file's metadata so that loading it later checks the same.

The adapter is one safetensors file, not shards: peft 0.21's `load_peft_weights` reads only
`adapter_model.safetensors` (a 3B r=64 adapter on every projection + lm_head is ~420 MB in
fp32). Merged models are sharded (`slackdist.train.merge`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import signal
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.checkpointing import load_accelerator_state, save_accelerator_state
from accelerate.utils import set_seed
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from slackdist.config import Config, save_config
from slackdist.data.provenance import PROVENANCE_FILE, copy_provenance
from slackdist.data.records import format_system_prompt, persona_label, persona_names
from slackdist.errors import SlackdistError, first_line
from slackdist.files import (
    Stage,
    check_output_dir,
    install_dir,
    link_into,
    signals_deferred,
    staged_dir,
    write_json_atomic,
)
from slackdist.model.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    UPDATES_METADATA,
    check_adapter_file,
    clean_key,
    lora_module_names,
)
from slackdist.model.info import (
    CONFIG_FILE,
    DEFAULT_CHANNEL,
    INFO_FILE,
    PERSONA_PLACEHOLDER,
    UNKNOWN_WORKSPACE,
    ModelInfo,
    write_model_info,
)
from slackdist.model.template import chat_template_name
from slackdist.train.distributed import (
    Topology,
    gather_state_dict,
    load_sharded_trainable,
    log_main,
    save_sharded_trainable,
)
from slackdist.train.manifest import (
    MANIFEST,
    InvalidCheckpoint,
    Manifest,
    read_manifest,
    verify_checkpoint,
    write_manifest,
)
from slackdist.train.merge import merge_adapter
from slackdist.train.metrics import plot_losses

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
TRAINABLE_DIR = "trainable"
CHECKPOINTS = "checkpoints"
BEST = "best"
BEST_EVAL = "eval.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
RUNS_DIR = "runs"
MERGED_DIR = "merged"
PREPARE_REPORT = "report.json"
RNG_STATE = "random_states_{rank}.pkl"
"""accelerate's name for one process's RNG state file."""
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where training is: saved with every checkpoint as trainer_state.json."""

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


@dataclass
class AdapterSnapshot:
    """The LoRA weights of one step, gathered onto the main process's CPU (`tensors` is None on the
    other processes): what `write_adapter` writes, now or later."""

    step: int
    """The optimizer step whose weights these are."""
    updates: int
    """`TrainerState.updates` at that step (recorded in the file; after one, every lora_B is non-zero)."""
    tensors: dict[str, torch.Tensor] | None


def snapshot_adapter(
    accelerator: Accelerator, topology: Topology, model: torch.nn.Module, state: TrainerState
) -> AdapterSnapshot:
    """The current LoRA weights of a (possibly FSDP / DeepSpeed wrapped) PEFT model as CPU copies,
    named as PEFT saves them. Collective: every rank must call it (it gathers the full state dict)."""
    full = gather_state_dict(accelerator, topology, model)
    tensors = None
    if accelerator.is_main_process:
        adapter_name = getattr(accelerator.unwrap_model(model), "active_adapter", "default")
        tensors = adapter_state_dict(full, adapter_name)
    return AdapterSnapshot(step=state.global_step, updates=state.updates, tensors=tensors)


def write_adapter(
    snapshot: AdapterSnapshot,
    peft_model: torch.nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    base_model: str,
) -> Path:
    """Write a snapshot as adapter_model.safetensors + adapter_config.json, PEFT-loadable, and check it
    (main process). `out_dir` is the stage of a checkpoint, best/ or the final output (created if
    missing); `base_model` is recorded as `base_model_name_or_path` (absolute when a local folder).

    Raises:
        SlackdistError: the written adapter fails its check (`slackdist.model.adapter`).
    """
    if snapshot.tensors is None:
        raise RuntimeError("write_adapter: this process holds no adapter weights (not the main process)")
    adapter_name = getattr(peft_model, "active_adapter", "default")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", UPDATES_METADATA: str(snapshot.updates)}
    save_file(snapshot.tensors, str(out / ADAPTER_WEIGHTS), metadata=metadata)
    check_adapter_file(out / ADAPTER_WEIGHTS, lora_module_names(peft_model), trained=snapshot.updates > 0)
    peft_config = copy.deepcopy(peft_model.peft_config[adapter_name])
    peft_config.inference_mode = True
    peft_config.base_model_name_or_path = _base_reference(base_model)
    peft_config.save_pretrained(str(out))
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


def link_adapter(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """adapter_model.safetensors + adapter_config.json of one folder into a stage as hard links (a
    saved file is never written again, so no data need be copied; copies where the file system has
    no hard links)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        link_into(src / name, dst / name)


# ------------------------------------------------------------------ training state (optimizer, scheduler, RNG)


def save_training_state(
    accelerator: Accelerator,
    topology: Topology,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    folder: str | os.PathLike[str],
) -> None:
    """What resuming needs besides the adapter file and trainer_state.json, into a checkpoint folder
    (collective; `Topology.checkpoint_layout` says what goes where).

    DeepSpeed: `accelerator.save_state`, whose engine writes the trainable parameters and each
    process's optimizer partition (the frozen base left out: `save_state_kwargs`), the scheduler
    and the RNG states. Elsewhere accelerate's `save_state` would write the whole model, the
    frozen 4-bit base included (under FSDP 4.36 GiB per checkpoint at 3B), so the model's trainable
    part is written here: single / DDP need nothing more than the adapter file; FSDP writes each
    process's shard of the LoRA weights and their optimizer state to `trainable/` (DCP). The rest
    is accelerate's own writer of what `save_state` saves beside the model: `optimizer.bin`
    (single / DDP, main process), `scheduler.bin`, the GradScaler of fp16 runs and
    `random_states_<rank>.pkl` of every process.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layout = topology.checkpoint_layout
    with torch_save_without_crc():
        if layout == "deepspeed":
            accelerator.save_state(str(folder), **topology.save_state_kwargs)
            return
        if layout == "dcp":
            save_sharded_trainable(topology, model, optimizer, folder / TRAINABLE_DIR)
        save_accelerator_state(
            str(folder),
            model_states=[],
            optimizers=[optimizer] if layout == "adapter" else [],
            schedulers=[scheduler],
            dataloaders=[],
            process_index=topology.rank,
            step=accelerator.step,
            scaler=accelerator.scaler,
        )


def torch_save_without_crc() -> contextlib.AbstractContextManager[Any]:
    """`torch.save` without the CRC-32 of every record in its zip file (torch >= 2.6; else a no-op).

    The checkpoint's manifest already hashes every byte (BLAKE2b) and is checked before resuming, so
    the CRC adds no protection, and computing it took most of the write: a 712 MB optimizer state
    took 0.65-0.97 s with it and 0.23-0.26 s without it (2-core CPU, to /dev/shm). `torch.load`
    reads such files as usual.
    """
    try:
        from torch.utils.serialization import config
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(config.save, "compute_crc32"):
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": False})


def load_training_state(
    accelerator: Accelerator,
    topology: Topology,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    checkpoint: str | os.PathLike[str],
    *,
    seed: int,
) -> None:
    """Load what `save_training_state` and the adapter file of a checkpoint hold. Collective.

    A process the saving run did not have (resuming on more processes) finds no RNG state of its
    own and is seeded with `seed + rank`, as a fresh run seeds it.

    Raises:
        SlackdistError: the optimizer state does not fit this run's optimizer (a checkpoint written
            by another slackdist version, optimizer or launch config).
    """
    checkpoint = Path(checkpoint)
    layout = topology.checkpoint_layout
    try:
        if layout == "deepspeed":
            accelerator.load_state(str(checkpoint), **topology.load_state_kwargs)
            return
        if layout == "dcp":
            load_sharded_trainable(topology, model, optimizer, checkpoint / TRAINABLE_DIR)
        else:
            load_adapter_weights(accelerator.unwrap_model(model), checkpoint)
        load_accelerator_state(
            str(checkpoint),
            models=[],
            optimizers=[optimizer] if layout == "adapter" else [],
            schedulers=[scheduler],
            dataloaders=[],
            process_index=topology.rank,
            scaler=accelerator.scaler,
            map_location="on_device" if topology.world_size > 1 and topology.on_gpu else "cpu",
        )
    except (
        ValueError
    ) as e:  # torch.optim: "loaded state dict contains a parameter group that doesn't match..."
        raise SlackdistError(
            f"{checkpoint}: cannot resume: its optimizer state does not fit this run ({first_line(e)}); "
            "it was written by another slackdist version, optimizer or launch config"
        ) from None
    # Checkpoints are written between optimizer steps, so the next micro-batch starts a step: with
    # the counter at 0, `accelerator.accumulate` syncs after `accumulation` micro-batches whatever
    # the accumulation of the run that saved it (it changes with the number of processes).
    accelerator.step = 0
    if not (checkpoint / RNG_STATE.format(rank=topology.rank)).is_file():
        set_seed(seed + topology.rank)


# ------------------------------------------------------------------ checkpoints and resume


def checkpoint_dir(out_dir: str | os.PathLike[str], step: int) -> Path:
    """OUT/checkpoints/step-000100."""
    return Path(out_dir) / CHECKPOINTS / f"step-{step:06d}"


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def list_checkpoints(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint folders of a run (`step-N`), oldest first, valid or not; the temporary folders of an
    unfinished save (`.tmp-step-N`) are not among them."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) >= 0), key=_step_of)


def _is_main_rank() -> bool:
    """Before the Accelerator exists: the main process of torchrun / accelerate launch (or no launcher)."""
    return os.environ.get("RANK", "0") == "0"


def newest_valid_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint of OUT whose files match its manifest; each newer one is skipped with a
    one-line warning saying why (main process). None when OUT has no checkpoint.

    Raises:
        SlackdistError: there are checkpoints and none of them verifies.
    """
    checkpoints = list_checkpoints(out_dir)
    for path in reversed(checkpoints):
        try:
            verify_checkpoint(path)
        except InvalidCheckpoint as e:
            if _is_main_rank():
                logger.warning("resume: skipped %s", e)
            continue
        return path
    if checkpoints:
        raise SlackdistError(
            f"{Path(out_dir) / CHECKPOINTS}: none of its {len(checkpoints)} checkpoints matches its manifest "
            "(reasons above); delete the folder to start over, or train into another --output"
        )
    return None


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in (MANIFEST, TRAINER_STATE))


def resolve_resume(resume: str | None, out_dir: str | os.PathLike[str]) -> Path | None:
    """`--resume auto` -> the newest valid checkpoint in OUT (None when there is none); a run's output
    folder -> its newest valid checkpoint; a checkpoint folder -> that one, if it verifies.

    Raises:
        SlackdistError: the path is not a checkpoint, or does not match its manifest, or no checkpoint
            of the folder does.
    """
    if not resume:
        return None
    if resume == "auto":
        return newest_valid_checkpoint(out_dir)
    path = Path(resume)
    if not _is_checkpoint(path) and (path / CHECKPOINTS).is_dir():  # a run's output folder
        return newest_valid_checkpoint(path)
    if not _is_checkpoint(path):
        raise SlackdistError(
            f"{resume}: not a checkpoint (no {MANIFEST}); expected OUT/checkpoints/step-N or a run's OUT"
        )
    verify_checkpoint(path)
    return path


def resume_point(cfg: Config) -> Path | None:
    """The checkpoint to resume from, verified against its manifest before anything heavy loads.

    Raises:
        SlackdistError: `--resume PATH` is not a valid checkpoint, no checkpoint verifies, or a fresh
            run would mix with an earlier run's checkpoints in the same output folder.
    """
    out = Path(cfg.train.output_dir)
    if not cfg.train.resume and list_checkpoints(out):
        raise SlackdistError(
            f"{out / CHECKPOINTS}: checkpoints of an earlier run; continue it with --resume auto, "
            "or train into another --output (or delete that folder)"
        )
    return resolve_resume(cfg.train.resume, out)


def check_resumable(manifest: Manifest, topology: Topology, checkpoint: str | os.PathLike[str]) -> None:
    """A checkpoint's layout fits this run (before any collective load starts).

    Raises:
        SlackdistError: written by a run with another optimizer-state layout, or by DeepSpeed on a
            different number of processes.
    """
    if manifest.layout != topology.checkpoint_layout:
        raise SlackdistError(
            f"{checkpoint}: written by a {manifest.backend} run, whose optimizer state ({manifest.layout}) a "
            f"{topology.backend} run cannot read; resume it with the launch config that wrote it"
        )
    if manifest.layout == "deepspeed" and manifest.world_size != topology.world_size:
        raise SlackdistError(
            f"{checkpoint}: written by {manifest.world_size} DeepSpeed processes; DeepSpeed resumes its "
            f"optimizer partitions only on as many (this run has {topology.world_size}); use that number"
        )


def prune_checkpoints(
    out_dir: str | os.PathLike[str], keep_last: int, *, protect: int | None = None, newest: int | None = None
) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, never the one of step `protect` (the best),
    and every checkpoint after step `newest`: those belong to a timeline a resume went back from
    (a newer checkpoint that did not verify, or a resume from an older one).

    Returns:
        The deleted folders.
    """
    checkpoints = list_checkpoints(out_dir)
    current = [p for p in checkpoints if newest is None or _step_of(p) <= newest]
    keep = set(current[-keep_last:]) if keep_last > 0 else set()
    if protect is not None:
        keep.add(checkpoint_dir(out_dir, protect))
    removed = [path for path in checkpoints if path not in keep]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


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


def _prepared(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        report = json.loads((Path(data_dir) / PREPARE_REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def prepared_workspace(data_dir: str | os.PathLike[str]) -> str | None:
    """The workspace name `prepare` put into the records' system prompts (its report.json), if known."""
    workspace = _prepared(data_dir).get("workspace")
    return workspace if isinstance(workspace, str) and workspace else None


def prepared_persona(data_dir: str | os.PathLike[str]) -> str | None:
    """The ``--as`` that `prepare` made the records with (its report.json), if any."""
    config = _prepared(data_dir).get("config")
    persona = config.get("persona") if isinstance(config, dict) else None
    return persona if isinstance(persona, str) and persona else None


def model_info(cfg: Config, tokenizer: Any) -> ModelInfo:
    """How the trained model is prompted: training's system prompt for #general (the template and
    persona of `cfg.data`; the workspace of `data.workspace`, else of the prepared data, else "Slack";
    the persona(s) of `data.persona`, else of the prepared data) and the chat template its tokenizer
    renders."""
    workspace = cfg.data.workspace or prepared_workspace(cfg.train.data_dir) or UNKNOWN_WORKSPACE
    personas = persona_names(cfg.data.persona or prepared_persona(cfg.train.data_dir))

    def prompt(persona: str | None) -> str:
        return format_system_prompt(
            cfg.data.system_prompt, workspace=workspace, channel=DEFAULT_CHANNEL, persona=persona
        )

    return ModelInfo(
        workspace=workspace,
        system_prompt=prompt(None),
        persona_system_prompt=prompt(PERSONA_PLACEHOLDER),
        persona=persona_label(personas) or None,
        chat_template=chat_template_name(tokenizer),
        personas=personas,
    )


RUN_RECORDS = (CHECKPOINTS, RUNS_DIR, METRICS_FILE, BEST, PROVENANCE_FILE)
"""What a run writes into OUT while it runs (and a resumed run continues); the rest of OUT is the
final output, installed with them in one rename at the end (`OutputFolder.install_final`)."""
OUTPUT_MARKERS = (CHECKPOINTS, CONFIG_FILE, INFO_FILE, METRICS_FILE, RUNS_DIR, BEST)
"""A folder holding one of these is a training output (`check_output`)."""


def check_output(cfg: Config, *, overwrite: bool = False) -> None:
    """OUT may be trained into: new, empty, an earlier training output, or `overwrite`; never the
    current folder or one holding the training data or base model (the final install replaces OUT
    whole). Read-only: every rank may call it.

    Raises:
        SlackdistError: one line naming OUT (`slackdist.files.check_output_dir`).
    """
    check_output_dir(
        cfg.train.output_dir,
        markers=OUTPUT_MARKERS,
        what="a training output folder",
        overwrite=overwrite,
        inputs=[cfg.train.data_dir, cfg.model.base_model],
    )


class OutputFolder:
    """OUT of one run and the saves into it (module docstring). Saves are collective: every rank
    calls them (weights are gathered, sharded state is written per rank); the main process writes
    the rest. Every folder is built under a temporary name and renamed into place whole: each
    checkpoint, best/, and at the end OUT itself (`install_final`)."""

    def __init__(self, cfg: Config, *, accelerator: Accelerator, topology: Topology, tokenizer: Any) -> None:
        self.path = Path(cfg.train.output_dir)
        self.cfg = cfg
        self.accelerator = accelerator
        self.topology = topology
        self.tokenizer = tokenizer
        self.info = model_info(cfg, tokenizer)
        self.metrics_file = self.path / METRICS_FILE
        self.best = self.path / BEST
        self.checkpoints = self.path / CHECKPOINTS
        self.merged = self.path / MERGED_DIR
        self.final: Stage | None = None
        """The final output being built (main process, from `save_final` to `install_final`)."""
        self.best_saved_step: int | None = None
        """The step whose adapter this process last wrote to best/ (the same on every rank)."""
        self.pending_best: tuple[AdapterSnapshot, float] | None = None
        """A new best eval's adapter and loss not yet in best/ (`save_best`, `flush_best`)."""

    def create(self) -> None:
        """Make OUT (main process) and copy the data's provenance into it: from the first checkpoint
        on, OUT says whose messages it is trained on. An earlier run's final output at its root stays
        whole until this run's replaces it (`install_final`); each checkpoint carries this run's config."""
        if self.topology.is_main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            copy_provenance(Path(self.cfg.train.data_dir) / PROVENANCE_FILE, self.path)

    def _describe(self, folder: Path) -> None:
        """What makes a model folder loadable alone: tokenizer, config, model info (main process)."""
        self.tokenizer.save_pretrained(str(folder))
        save_config(self.cfg, folder / CONFIG_FILE)
        write_model_info(self.info, folder)

    def _adapter(self, model: torch.nn.Module, folder: Path, state: TrainerState) -> None:
        """The adapter's current weights into `folder` (collective). When best/ was written at this
        very step (an eval improved at the last step, the usual end of a run), its files are linked
        instead: the same weights, not gathered and written again."""
        if self.best_saved_step == state.global_step:
            if self.topology.is_main_process:
                link_adapter(self.best, folder)
            return
        snapshot = snapshot_adapter(self.accelerator, self.topology, model, state)
        if self.topology.is_main_process:
            self._write(snapshot, model, folder)

    def _write(self, snapshot: AdapterSnapshot, model: torch.nn.Module, folder: Path) -> None:
        peft_model = self.accelerator.unwrap_model(model)
        write_adapter(snapshot, peft_model, folder, base_model=self.cfg.model.base_model)

    def save_checkpoint(
        self, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: TrainerState
    ) -> Path:
        """Write OUT/checkpoints/step-N (module docstring): the training state, the adapter, tokenizer,
        config, trainer_state.json, and last the manifest.

        Each rank writes its RNG state and, under FSDP / DeepSpeed, its shard. Everything goes into
        a temp folder that the main process renames once the manifest is written, so a run killed
        mid-save leaves no half checkpoint for `--resume auto` to pick; then all but the newest
        `train.keep_last_n_checkpoints` (and the best) are deleted.

        Returns:
            The checkpoint folder.
        """
        accelerator, topology = self.accelerator, self.topology
        self.flush_best(model)  # best/ on disk is the best eval this checkpoint's trainer state names
        final = checkpoint_dir(self.path, state.global_step)
        tmp = final.with_name(f".tmp-{final.name}")  # every rank writes into it: a name all of them know
        if topology.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        try:
            save_training_state(accelerator, topology, model, optimizer, scheduler, tmp)
            self._adapter(model, tmp, state)
            if topology.is_main_process:
                self._describe(tmp)
                write_json_atomic(tmp / TRAINER_STATE, state.state_dict())
            accelerator.wait_for_everyone()  # every rank's files are in tmp
            if topology.is_main_process:
                write_manifest(
                    tmp,
                    step=state.global_step,
                    backend=topology.backend,
                    world_size=topology.world_size,
                    layout=topology.checkpoint_layout,
                )
                # a folder of the same step (saved again after a resume) is replaced whole
                install_dir(tmp, final)
        except BaseException:  # an error or Ctrl-C mid-save: no half checkpoint folder left behind
            if topology.is_main_process:
                with signals_deferred():
                    shutil.rmtree(tmp, ignore_errors=True)
            raise
        if topology.is_main_process:
            prune_checkpoints(
                self.path,
                self.cfg.train.keep_last_n_checkpoints,
                protect=state.best_step,
                newest=state.global_step,
            )
        accelerator.wait_for_everyone()
        return final

    def load_checkpoint(
        self, checkpoint: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: TrainerState
    ) -> None:
        """Resume from a checkpoint `resume_point` verified: LoRA weights, optimizer, scheduler, every
        rank's RNG, trainer state (the data position included). Collective.

        Raises:
            SlackdistError: the checkpoint's layout or optimizer state does not fit this run.
        """
        manifest = read_manifest(checkpoint)
        check_resumable(manifest, self.topology, checkpoint)
        load_training_state(
            self.accelerator, self.topology, model, optimizer, scheduler, checkpoint, seed=self.cfg.train.seed
        )
        state.load_state_dict(json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8")))
        if manifest.world_size != self.topology.world_size:
            log_main(
                self.topology,
                f"resume: {checkpoint.name} was written by {manifest.world_size} processes, this run has "
                f"{self.topology.world_size}",
            )

    def save_best(self, model: torch.nn.Module, state: TrainerState, eval_loss: float) -> None:
        """Keep the adapter of a new best eval in memory (collective: its weights are gathered) until
        the next checkpoint or the end of the run writes it to best/ (`flush_best`). Runs whose eval
        improves at every eval write best/ once per checkpoint instead of once per eval, and best/
        never holds a step newer than the checkpoint a resume starts from."""
        self.pending_best = (snapshot_adapter(self.accelerator, self.topology, model, state), eval_loss)

    def flush_best(self, model: torch.nn.Module) -> None:
        """Write the pending best adapter (`save_best`) as OUT/best, with its eval.json: built in a
        temporary folder on the main process, then renamed over the previous best/. Every rank calls
        it (each keeps `best_saved_step`); nothing is gathered."""
        if self.pending_best is None:
            return
        snapshot, eval_loss = self.pending_best
        self.best_saved_step = None  # best/ is being replaced: its files are not this step's yet
        if self.topology.is_main_process:
            with staged_dir(self.best) as folder:
                self._write(snapshot, model, folder)
                self._describe(folder)
                write_json_atomic(folder / BEST_EVAL, {"step": snapshot.step, "eval_loss": eval_loss})
        self.pending_best = None
        self.best_saved_step = snapshot.step

    def save_final(self, model: torch.nn.Module, state: TrainerState) -> None:
        """Build the final output in a temporary folder next to OUT (`self.final`): the adapter with
        tokenizer, config, model info, trainer state and the loss plot. `install_final` puts it in
        place; `discard_final` removes it when the run ends otherwise.

        The adapter is the best-eval one when an eval ran (as `load_best_model_at_end`), else the
        last weights.
        """
        main = self.topology.is_main_process
        self.flush_best(model)
        if main:
            self.final = Stage(self.path)
            self.final.create()
        folder = self.final.path if self.final is not None and self.final.path is not None else self.path
        use_best = (
            state.best_step not in (None, state.global_step) and (self.best / ADAPTER_WEIGHTS).is_file()
        )
        if not use_best:
            self._adapter(model, folder, state)
        if main:
            if use_best:
                link_adapter(self.best, folder)
                logger.warning(
                    "final adapter = best eval (step %d, loss %.4f)", state.best_step, state.best_eval_loss
                )
            self._describe(folder)
            write_json_atomic(folder / TRAINER_STATE, state.state_dict())
            if self.metrics_file.is_file():
                plot_losses(self.metrics_file, folder / LOSS_PLOT)
        self.accelerator.wait_for_everyone()

    def install_final(self, *, keep_best: bool) -> None:
        """With `train.merge_after_training`, merge the final adapter into merged/ of the stage; then
        put the final output in OUT's place by one rename (main process, after the run's last write:
        trackers closed).

        The new OUT = the final output + the run's records (`RUN_RECORDS`), hard-linked from the old
        OUT (no data copied, and the old OUT stays whole until the rename). Anything else the old
        OUT held (an earlier run's adapter files, merged/, eval/ and gguf/ outputs made from it) is
        replaced: it described an earlier adapter. best/ is kept only when this run (or the one it
        resumed) had a best eval (`keep_best`); else it is an earlier run's.
        """
        stage = self.final
        if stage is None or stage.path is None:
            raise RuntimeError("install_final before save_final")
        for name in RUN_RECORDS:
            source = self.path / name
            if (source.exists() or source.is_symlink()) and (name != BEST or keep_best):
                link_into(source, stage.path / name)
        if self.cfg.train.merge_after_training:  # after the records: merged/ takes the provenance
            merge_adapter(stage.path, stage.path / MERGED_DIR, max_shard_size=self.cfg.train.max_shard_size)
        stage.install()
        self.final = None

    def discard_final(self) -> None:
        """Remove a final output that was not installed (an error, Ctrl-C, SIGTERM after the last step)."""
        if self.final is not None:
            self.final.discard()
            self.final = None
