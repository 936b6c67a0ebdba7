"""Small prepared datasets and configs for the training tests (no Slack export needed)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from slackdist.config import Config, load_config

_USERS = [
    "Can someone review my pull request?",
    "Is the deploy done?",
    "Lunch today?",
    "Who is on call this week?",
]
_ANSWERS = [
    "Sure, I can take a look this afternoon.",
    "Yes, the deploy to production is done.",
    "Count me in! I've heard their ramen is amazing.",
    "I am. Both alerts were false alarms.",
]


def chat_record(i: int, rng: random.Random) -> dict[str, Any]:
    """A short synthetic conversation in the `prepare` record format."""
    messages = [
        {"role": "system", "content": "You are a member of the team. This conversation is from #general."}
    ]
    for _ in range(rng.randint(1, 3)):
        k = rng.randrange(len(_USERS))
        messages += [{"role": "user", "content": _USERS[k]}, {"role": "assistant", "content": _ANSWERS[k]}]
    meta = {
        "conversation_id": f"c{i}",
        "channel": "general",
        "thread_ts": None,
        "start": float(i),
        "end": i + 1.0,
        "speakers": ["a", "b"],
    }
    return {"messages": messages, "meta": meta}


def write_dataset(folder: Path, *, n_train: int = 32, n_val: int = 8, seed: int = 0) -> Path:
    """train.jsonl / validation.jsonl of synthetic chats (a prepared-data folder)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, offset in (("train", n_train, 0), ("validation", n_val, 10_000)):
        lines = [json.dumps(chat_record(offset + i, rng)) for i in range(n)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def tiny_config(model_dir: Path, data_dir: Path, out_dir: Path, **overrides: Any) -> Config:
    """A config that trains the tiny model quickly on the CPU; overrides are dotted keys."""
    values = {
        "model.base_model": str(model_dir),
        "model.load_in_4bit": False,
        "train.data_dir": str(data_dir),
        "train.output_dir": str(out_dir),
        "train.max_seq_len": 256,
        "train.micro_batch_size": 2,
        "train.gradient_accumulation_steps": 2,
        "train.num_epochs": 1,
        "train.learning_rate": 2e-3,
        "train.eval_every_n_steps": 0,
        "train.save_every_n_steps": 0,
        "train.loss_chunk_size": 64,
        "lora.r": 8,
        "lora.alpha": 16,
    }
    values.update(overrides)
    cfg = load_config(overrides=values)
    cfg.validate()
    return cfg


def cli_args(cfg: Config) -> list[str]:
    """`slackdist train` arguments that reproduce `cfg` (its model, lora and train sections)."""
    from dataclasses import asdict

    args = []
    for section in ("model", "lora", "train"):
        for key, value in asdict(getattr(cfg, section)).items():
            if value is None:
                continue
            text = ",".join(value) if isinstance(value, list) else value
            args += ["--set", f"{section}.{key}={json.dumps(text) if isinstance(text, str) else text}"]
    return args


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def step_losses(out_dir: Path) -> dict[int, float]:
    """Training loss by step (the last entry wins when a resumed run logged a step again)."""
    return {m["step"]: m["loss"] for m in read_metrics(out_dir) if "loss" in m}


def torchrun(processes: int) -> list[str]:
    """`torchrun --standalone --nproc_per_node N` through this interpreter (add the script or `-m module`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
