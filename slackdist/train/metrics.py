"""What a run logs: TensorBoard and OUT/metrics.jsonl with fixed keys, memory figures, the loss plot.

Only the main process writes. Training steps are logged as the means of each window of
`train.log_every_n_steps` steps: loss, lr, grad_norm, tokens_per_s, input_tokens, step_seconds,
peak_mem_gib (peak_reserved_gib on a GPU), label_tokens, epoch; evals as eval_loss, epoch.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate import Accelerator

from slackdist.config import Config, config_to_dict
from slackdist.files import write_text_atomic
from slackdist.train.step import StepStats

logger = logging.getLogger(__name__)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on `device`, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def reserved_memory_gib(device: torch.device) -> dict[str, float]:
    """{"peak_reserved_gib": what the CUDA caching allocator held at most} on a GPU, else {}:
    what the card must have, allocator fragmentation included."""
    if device.type != "cuda":
        return {}
    return {"peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


@dataclass
class Phases:
    """Wall seconds of each phase of a run, from the process's start: what a user waits for.

    `start-up` is the time from the process's creation (interpreter, imports, config) to the
    recipe's first line; the rest are timed around the recipe's calls. Steps slower than the run's
    median step count their excess as `warm-up` (compilation, allocator growth, recompilations),
    so `steps` minus `warm-up` is what the steady speed explains.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.seconds["start-up"] = max(0.0, time.time() - psutil.Process().create_time())

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add_step(self, seconds: float) -> None:
        self.step_seconds.append(seconds)

    def summary(self) -> dict[str, float]:
        """{phase: seconds} in order, with `steps`, `warm-up` and `total` (start of process to now)."""
        out = dict(self.seconds)
        if self.step_seconds:
            median = statistics.median(self.step_seconds)
            out["steps"] = sum(self.step_seconds)
            out["warm-up"] = sum(max(0.0, s - median) for s in self.step_seconds)
        out["total"] = self.seconds["start-up"] + time.perf_counter() - self.started
        return {k: round(v, 2) for k, v in out.items()}

    def describe(self) -> str:
        """One line: `time: start-up 6.1 s, load 8.0 s, ..., total 61.2 s`."""
        return "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.summary().items())


def _flat_config(cfg: Config) -> dict[str, Any]:
    """The config as flat scalars for TensorBoard's hparams view."""
    flat = {}
    for section in ("model", "lora", "train"):
        for key, value in config_to_dict(cfg)[section].items():
            flat[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return {k: ("" if v is None else v) for k, v in flat.items()}


class MetricsLog:
    """TensorBoard (through accelerate's tracker) and metrics.jsonl, main process only."""

    def __init__(self, accelerator: Accelerator, cfg: Config, path: Path, *, resume_step: int | None) -> None:
        """Start the trackers; on a resume, drop what metrics.jsonl holds beyond `resume_step`."""
        self.accelerator = accelerator
        self.path = path
        self.every = cfg.train.log_every_n_steps
        self.window: list[tuple[float, int, float]] = []  # (loss, input tokens, seconds) since the last log
        self.train_seconds, self.train_tokens = 0.0, 0
        accelerator.init_trackers("slackdist", config=_flat_config(cfg))
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

    def log_step(self, stats: StepStats, seconds: float, *, step: int, epoch: int) -> None:
        """Record a step; every `log_every_n_steps`, log the window's means."""
        self.train_seconds += seconds
        self.train_tokens += stats.input_tokens
        self.window.append((stats.loss, stats.input_tokens, seconds))
        if step % self.every:
            return
        losses, tokens, times = zip(*self.window, strict=True)
        self.window = []
        device = self.accelerator.device
        self.log(
            {
                "loss": sum(losses) / len(losses),
                "lr": stats.lr,
                "grad_norm": stats.grad_norm,
                "tokens_per_s": sum(tokens) / max(sum(times), 1e-9),
                "input_tokens": sum(tokens),
                "step_seconds": sum(times),
                "peak_mem_gib": peak_memory_gib(device),
                **reserved_memory_gib(device),
                "label_tokens": stats.label_tokens,
                "epoch": epoch,
            },
            step=step,
        )

    @property
    def tokens_per_s(self) -> float:
        """Real input tokens (all ranks) per second of training steps so far."""
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0


def plot_losses(metrics_path: Path, out_path: Path) -> None:
    """Training loss (and eval loss) per step from metrics.jsonl into a PNG (skipped without matplotlib)."""
    try:  # optional at run time, and slow to import: only the run's last moment needs it
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no %s", out_path.name)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

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
