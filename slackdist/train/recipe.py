"""`slackdist train`: the QLoRA fine-tuning recipe, on `accelerate.Accelerator`.

Reads top to bottom as setup -> fit -> save -> cleanup (the shape of Accelerate's examples and
torchtune's LoRA recipe); each concern it uses lives in one module of `slackdist.train`:
`distributed` (the topology and what differs per topology), `batches` (data), `memory` (the
memory plan), `step` (one optimizer step, one eval pass), `metrics` (logging), `checkpoint`
(the output folder). The same code runs under

    python -m slackdist train --data DIR --output OUT
    accelerate launch --config_file launch_configs/<cpu|single_gpu|ddp|fsdp|fsdp_offload|deepspeed_zero3>.yaml \
        -m slackdist train --data DIR --output OUT
    torchrun --nproc_per_node N -m slackdist train ...   (ACCELERATE_USE_CPU=1 for DDP over gloo on CPUs)

Hardware (processes, FSDP, DeepSpeed, mixed precision) comes from the launch config; every
hyperparameter from the slackdist config.

Exit codes: 0 done, 2 bad input, 75 (EX_TEMPFAIL) preempted by SIGTERM/SIGUSR1 after writing a
checkpoint: run again with `--resume auto` (the SLURM scripts requeue on it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from slackdist.config import Config
from slackdist.model.adapter import ADAPTER_WEIGHTS
from slackdist.model.compilation import (
    compile_decoder_layers,
    compile_job,
    compile_job_id,
    compiled_before,
    should_compile,
)
from slackdist.model.fp8 import should_use_fp8, use_fp8_base
from slackdist.model.load import add_lora, check_model_source, load_base_model, load_tokenizer, resolve_dtype
from slackdist.model.shared_lora import share_lora_inputs
from slackdist.train.batches import (
    Epoch,
    check_training_data,
    load_training_examples,
    rank_steps,
    validation_rows,
)
from slackdist.train.checkpoint import (
    METRICS_FILE,
    RUNS_DIR,
    TRAINER_STATE,
    OutputFolder,
    PreemptionFlag,
    TrainerState,
    check_output,
    resolve_resume,
    resume_point,
)
from slackdist.train.distributed import Topology, log_main, make_accelerator, trainable_parameters, wrap
from slackdist.train.memory import apply_memory_cap, plan_memory
from slackdist.train.metrics import MetricsLog, Phases, peak_memory_gib
from slackdist.train.packing import PackedRow
from slackdist.train.step import StepStats, eval_loss, make_step_inputs, train_step

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "try again later"
VARLEN_ATTENTIONS = ("slackdist_varlen", "flash_attention_2")
"""Attention implementations that take packed rows as sequence boundaries (no dense mask)."""


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


class LoRARecipe:
    """One training run: `setup()` -> `fit()` -> `save()` -> `cleanup()` (torchtune's recipe shape)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.t = cfg.train
        self.preemption = PreemptionFlag()
        self.state = TrainerState()
        self.last_saved_step: int | None = None
        self.phases = Phases()
        self.compile_job: str | None = None
        """torch.compile's job id when the layers are compiled (`compile_job_id`)."""

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        """Accelerator, data, model + LoRA, memory plan, optimizer, scheduler, trackers; resume if asked.

        Raises:
            SlackdistError: see `train`.
        """
        cfg, t = self.cfg, self.t
        # A wrong --model or --data is one line before anything is created or loaded.
        check_model_source(cfg.model.base_model)
        check_training_data(t)
        resume_from = resume_point(cfg)
        self.preemption.install()
        out = Path(t.output_dir)
        self.accelerator = accelerator = make_accelerator(
            cfg, logging_dir=out / RUNS_DIR, metrics_file=out / METRICS_FILE
        )
        self.topology = topology = Topology.of(accelerator)
        set_seed(t.seed)  # the same LoRA init on every rank
        phases = self.phases
        with phases.timed("data"):
            self.tokenizer = load_tokenizer(
                cfg.model.base_model,
                trust_remote_code=cfg.model.trust_remote_code,
                chat_template=cfg.model.chat_template,
            )
            self.pad_id = self.tokenizer.pad_token_id
            self.out = OutputFolder(cfg, accelerator=accelerator, topology=topology, tokenizer=self.tokenizer)
            self.out.create()

            # Data: every epoch packed once, now (the schedule needs the step count of all of them).
            train_examples, val_examples = load_training_examples(t, self.tokenizer, accelerator)
            self.epochs = [Epoch(train_examples, index=e, t=t) for e in range(t.num_epochs)]
            self.val_rows = validation_rows(val_examples, t)
        self.rows_per_step = t.micro_batch_size * t.gradient_accumulation_steps * topology.world_size
        self.total_steps = sum(epoch.num_steps(self.rows_per_step) for epoch in self.epochs)
        if t.max_steps >= 0:
            self.total_steps = min(t.max_steps, self.total_steps)

        # Model: the 4-bit (or plain) base + LoRA, placed as the topology needs.
        if topology.on_gpu:
            apply_memory_cap(topology.device, t.max_memory_gib)
        dtype = resolve_dtype(cfg.model.dtype, topology.device)
        compile_layers, why = should_compile(
            t.compile,
            device_type=topology.device.type,
            sharded=topology.sharded,
            steps=self.total_steps,
            min_steps=t.compile_min_steps,
        )
        fp8, fp8_why = should_use_fp8(
            t.fp8_matmul, device=topology.device, sharded=topology.sharded, compiled=compile_layers
        )
        with phases.timed("load"):
            model = load_base_model(cfg.model, dtype=dtype, device_map=topology.device_map)
            model = add_lora(model, cfg.lora, gradient_checkpointing=t.gradient_checkpointing)
            if cfg.lora.share_inputs and not topology.sharded:  # ZeRO-3 gathers a weight as its module runs
                blocks = share_lora_inputs(model)
                log_main(
                    topology, f"LoRA: {blocks} blocks share one dropout and A matmul (lora.share_inputs)"
                )
            fp8_done = f"{use_fp8_base(model)} base projections run in FP8" if fp8 else "off"
            log_main(topology, f"FP8: {fp8_done} ({fp8_why})")
        self.varlen = getattr(model.config, "_attn_implementation", "") in VARLEN_ATTENTIONS
        self.chunk_size = topology.loss_chunk_size(t.loss_chunk_size)
        with phases.timed("plan"):
            self.plan = plan_memory(model, cfg, accelerator, topology, pad_id=self.pad_id, varlen=self.varlen)
        accelerator.gradient_accumulation_steps = self.plan.accumulation
        log_main(topology, self.plan.describe())
        if compile_layers:
            compiled = compile_decoder_layers(model)
            self.compile_job = compile_job_id(
                model, device=topology.device, settings=compile_settings(cfg, topology)
            )
            cache = (
                "compiled before: each graph once, from the cache"
                if compiled_before(self.compile_job)
                else "first steps compile"
            )
            log_main(topology, f"compile: {compiled} decoder layers with torch.compile ({why}; {cache})")
        else:
            log_main(topology, f"compile: off ({why})")

        # Optimizer and scheduler, on the wrapped model; then the state a checkpoint carries.
        with phases.timed("wrap"):
            w = wrap(accelerator, topology, model, cfg, self.total_steps)
        self.model, self.optimizer, self.scheduler, self.flat = w.model, w.optimizer, w.scheduler, w.flat
        if resume_from is not None:
            # LoRA weights, optimizer, scheduler, RNG of every rank, trainer state (data position)
            self.out.load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler, self.state)
            self.last_saved_step = self.state.global_step
            log_main(topology, f"resumed from {resume_from} at step {self.state.global_step}")
        else:
            set_seed(t.seed + topology.rank)  # different dropout masks on each rank
        self.result = TrainResult(
            output_dir=out, global_step=self.state.global_step, resumed_from=resume_from
        )
        self.metrics = MetricsLog(
            accelerator,
            cfg,
            self.out.metrics_file,
            resume_step=self.state.global_step if resume_from else None,
        )
        trainable = trainable_parameters(accelerator, self.model)
        accelerator.print(
            f"training {cfg.model.base_model} on {len(train_examples)} conversations: {self.total_steps} steps of "
            f"{topology.world_size} x {self.plan.rows_per_forward} x {self.plan.accumulation} rows "
            f"(processes x micro-batch x accumulation), {trainable / 1e6:.2f}M trainable parameters, "
            f"{topology.describe()}, mixed precision {accelerator.mixed_precision}"
        )

    # ------------------------------------------------------------ fit
    def fit(self) -> None:
        """Epochs of optimizer steps, with eval, early stopping, checkpoints and preemption."""
        t, state = self.t, self.state
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=state.global_step,
            desc="training",
            disable=not self.topology.is_main_process,
        )
        while not state.finished and state.epoch < t.num_epochs:
            epoch = self.epochs[state.epoch]
            # Start at the first row not yet trained on (a resume; right also when the process count changed).
            steps = rank_steps(
                epoch,
                rows_per_forward=self.plan.rows_per_forward,
                accumulation=self.plan.accumulation,
                topology=self.topology,
                first_row=state.rows_done_in_epoch,
            )
            for micro_batches in steps:
                stats = self.step(micro_batches)
                state.rows_done_in_epoch = min(state.rows_done_in_epoch + self.rows_per_step, len(epoch))
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.4f}")
                if self.after_step(stats):
                    break
            if self.result.preempted:
                break
            if state.rows_done_in_epoch >= len(epoch):
                self.end_epoch()
        bar.close()

    def step(self, micro_batches: list[list[PackedRow]]) -> StepStats:
        """One optimizer step over this rank's micro-batches, counted and logged."""
        state, start = self.state, time.perf_counter()
        inputs = make_step_inputs(
            micro_batches, pad_id=self.pad_id, device=self.topology.device, varlen=self.varlen
        )
        stats = train_step(
            self.accelerator,
            self.model,
            self.optimizer,
            self.scheduler,
            inputs,
            chunk_size=self.chunk_size,
            max_grad_norm=self.t.max_grad_norm,
            stop_requested=self.preemption.set,
            flat=self.flat,
        )
        state.global_step += 1
        state.updates += stats.lr > 0
        state.step_in_epoch += 1
        state.tokens_seen += stats.input_tokens
        self.result.losses[state.global_step] = stats.loss
        seconds = time.perf_counter() - start
        self.phases.add_step(seconds)
        self.metrics.log_step(stats, seconds, step=state.global_step, epoch=state.epoch)
        return stats

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

    def end_epoch(self) -> None:
        """The epoch is complete: eval (unless this step had one), next epoch, caches cleared."""
        state = self.state
        if self.val_rows and state.last_eval_step != state.global_step and not state.finished:
            self.evaluate()
        state.epoch += 1
        state.step_in_epoch = state.rows_done_in_epoch = 0
        state.finished = state.finished or state.epoch >= self.t.num_epochs
        if self.t.clear_cache_between_epochs and not state.finished:  # nothing follows the last epoch
            with self.phases.timed("clear cache"):
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def evaluate(self) -> None:
        """Eval loss on validation; keep the best adapter in OUT/best; early stopping (sets `finished`)."""
        state, t = self.state, self.t
        steps = rank_steps(
            self.val_rows, rows_per_forward=self.plan.rows_per_forward, accumulation=1, topology=self.topology
        )
        micro_batches = (micro for (micro,) in steps)  # one micro-batch per step
        if t.eval_max_batches > 0:
            micro_batches = islice(micro_batches, t.eval_max_batches)
        with self.phases.timed("eval"):
            loss = eval_loss(
                self.accelerator,
                self.model,
                micro_batches,
                pad_id=self.pad_id,
                varlen=self.varlen,
                chunk_size=self.chunk_size,
            )
        state.last_eval_step = state.global_step
        self.result.eval_losses[state.global_step] = loss
        self.metrics.log({"eval_loss": loss, "epoch": state.epoch}, step=state.global_step)
        if state.best_eval_loss is None or loss < state.best_eval_loss - t.early_stopping_min_delta:
            state.best_eval_loss, state.best_step = loss, state.global_step
            state.evals_without_improvement = 0
            with self.phases.timed("best adapter"):
                self.out.save_best(self.model, state, loss)
        else:
            state.evals_without_improvement += 1
        if 0 < t.early_stopping_patience <= state.evals_without_improvement:
            log_main(
                self.topology,
                f"early stopping at step {state.global_step}: no eval improvement in "
                f"{state.evals_without_improvement} evals (best {state.best_eval_loss:.4f} at step {state.best_step})",
            )
            state.finished = state.stopped_early = True

    def save_checkpoint(self) -> None:
        with self.phases.timed("checkpoints"):
            self.out.save_checkpoint(self.model, self.optimizer, self.scheduler, self.state)
        self.last_saved_step = self.state.global_step

    # ------------------------------------------------------------ save
    def save(self) -> None:
        """After the last step: final eval and checkpoint, the final adapter at OUT's root, the loss plot."""
        state = self.state
        state.finished = True
        if self.val_rows and state.last_eval_step != state.global_step and state.global_step > 0:
            self.evaluate()
        if self.last_saved_step != state.global_step:
            self.save_checkpoint()
        with self.phases.timed("final save"):
            self.out.save_final(self.model, state)  # into a temporary folder: `train` installs it

    # ------------------------------------------------------------ cleanup
    def cleanup(self) -> TrainResult:
        """Fill in the result, print the summary, close trackers, restore signal handlers."""
        state, result, accelerator = self.state, self.result, self.accelerator
        result.global_step = state.global_step
        result.best_eval_loss, result.best_step = state.best_eval_loss, state.best_step
        result.stopped_early = state.stopped_early
        result.tokens_per_s = self.metrics.tokens_per_s
        result.peak_mem_gib = peak_memory_gib(self.topology.device)
        if result.preempted:
            accelerator.print(
                f"preempted ({self.preemption.signal}): checkpoint at step {state.global_step} in "
                f"{self.out.checkpoints}; exit {PREEMPTED_EXIT_CODE}, continue with --resume auto"
            )
        else:
            best = (
                f" (best eval loss {state.best_eval_loss:.4f} at step {state.best_step})"
                if state.best_step
                else ""
            )
            speed = (
                f"{result.tokens_per_s:,.0f} tokens/s, peak memory {result.peak_mem_gib:.2f} GiB"
                if result.losses
                else "no step left to run, final outputs written"
            )
            steps = f"{state.global_step} step{'' if state.global_step == 1 else 's'}"
            accelerator.print(f"done: {steps}, {speed}; adapter in {self.out.path}{best}")
        self.metrics.log({"phases": self.phases.summary()}, step=state.global_step)
        accelerator.print(self.phases.describe())
        accelerator.wait_for_everyone()
        accelerator.end_training()
        self.preemption.restore()
        return result


def train(cfg: Config, *, overwrite: bool = False) -> TrainResult:
    """Fine-tune `cfg.model.base_model` with LoRA on `cfg.train.data_dir`; write `cfg.train.output_dir`.

    The final output (adapter, tokenizer, config, loss plot, merged/) is built in a temporary folder
    and installed with the run's checkpoints and logs as the new OUT by one rename once the run is
    done (`OutputFolder.install_final`); an error or interrupt before that leaves OUT's earlier
    output as it was, and the temporary folder is removed.

    Raises:
        SlackdistError: bad data, a model that cannot load, a resume path that is not a checkpoint,
            an output folder holding another run's checkpoints or not a training output (unless
            `overwrite`), or an adapter that fails verification.
    """
    check_output(cfg, overwrite=overwrite)
    out = Path(cfg.train.output_dir)
    done = finished_run(cfg)
    if done is not None:
        if _is_main_rank():
            print(describe_finished(out, done))
        return TrainResult(
            output_dir=out,
            global_step=done.global_step,
            best_eval_loss=done.best_eval_loss,
            best_step=done.best_step,
            stopped_early=done.stopped_early,
        )
    fresh = not out.exists()
    recipe = LoRARecipe(cfg)
    try:
        recipe.setup()
    except BaseException:
        recipe.preemption.restore()
        if fresh and _is_main_rank():
            # Setup made OUT (provenance, TensorBoard's first events) before the data failed: a folder
            # holding no model would make `chat`/`--test` say "not a model folder".
            shutil.rmtree(out, ignore_errors=True)
        raise
    frozen = freeze_long_lived_objects()
    try:
        with compile_job(recipe.compile_job):
            recipe.fit()
            if not recipe.result.preempted:
                recipe.save()
        result = recipe.cleanup()
        if not result.preempted and recipe.topology.is_main_process:
            recipe.out.install_final(keep_best=result.best_step is not None)
            if cfg.train.merge_after_training:
                print(f"merged model in {recipe.out.merged}")
    finally:
        recipe.preemption.restore()  # `cleanup` does it too; a run that fails before it must as well
        if frozen:
            gc.unfreeze()
        recipe.out.discard_final()
    return result


def compile_settings(cfg: Config, topology: Topology) -> dict:
    """The settings that change what the compiled layers run, for `compile_job_id`."""
    t = cfg.train
    unrelated = ("base_model", "chat_template", "trust_remote_code")
    return {
        "model": {k: v for k, v in asdict(cfg.model).items() if k not in unrelated},
        "lora": asdict(cfg.lora),
        "train": {
            k: getattr(t, k)
            for k in (
                "max_seq_len",
                "micro_batch_size",
                "gradient_checkpointing",
                "memory_plan",
                "memory_budget_gib",
                "max_memory_gib",
                "fp8_matmul",
            )
        },
        "world_size": topology.world_size,
    }


def freeze_long_lived_objects() -> bool:
    """Collect, then move every object the collector tracks (the libraries, the model: ~600k after
    setup) out of its passes until `gc.unfreeze()`; True when this freeze is the only one (the caller
    unfreezes), False when an earlier one (`slackdist.cli`'s, a user's) owns the frozen objects.

    Each epoch's `gc.collect()` (`train.clear_cache_between_epochs`) and the collector's own full passes
    then scan only what training made: 0.19 s a pass before, 0.001 s after (the tiny model on a CPU).
    """
    outer = gc.get_freeze_count() > 0
    gc.collect()  # garbage of setup (the memory probe's, cycles holding GPU tensors) must not be frozen
    gc.freeze()
    return not outer


def _is_main_rank() -> bool:
    """Before or without the Accelerator: the main process of torchrun / accelerate launch (or no launcher)."""
    return os.environ.get("RANK", "0") == "0"


def _read_state(folder: Path) -> TrainerState | None:
    try:
        raw = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    state = TrainerState()
    if isinstance(raw, dict):
        state.load_state_dict(raw)
    return state


def finished_run(cfg: Config) -> TrainerState | None:
    """With --resume: the state of a run that already finished and saved its final adapter, else None.

    Finished means the checkpoint --resume picks says so (epochs, max_steps or early stopping reached)
    and OUT's root holds the final adapter of that same step; a run killed between its last
    checkpoint and its final save is not finished (resuming writes the final outputs).

    Raises:
        SlackdistError: as `resolve_resume`.
    """
    out = Path(cfg.train.output_dir)
    if not cfg.train.resume or not (out / ADAPTER_WEIGHTS).is_file():
        return None
    final = _read_state(out)
    if final is None or not final.finished:
        return None
    checkpoint = resolve_resume(cfg.train.resume, out)
    state = _read_state(checkpoint) if checkpoint is not None else None
    if state is None or not state.finished or state.global_step != final.global_step:
        return None
    return final


def describe_finished(out: Path, state: TrainerState) -> str:
    """The line `train --resume` prints for a run that has nothing left to do."""
    why = "stopped early" if state.stopped_early else "all its epochs or max_steps done"
    best = f", best eval loss {state.best_eval_loss:.4f} at step {state.best_step}" if state.best_step else ""
    return (
        f"{out}: this run already finished ({state.global_step} steps, {why}{best}); nothing to resume. "
        f"The adapter is in {out} (slackdist chat --model-dir {out}); to train further, start a new run "
        "with another --output"
    )


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist train`: 0 when done, 75 (EX_TEMPFAIL) when preempted after checkpointing."""
    # Packed batches change shape every step; growable segments keep the allocator from fragmenting
    # (reserved stays close to allocated, which is what lets the plan's budget hold on a small card).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    result = train(cfg, overwrite=args.overwrite)
    return PREEMPTED_EXIT_CODE if result.preempted else 0
