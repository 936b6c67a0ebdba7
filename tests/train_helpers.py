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


# ---- a tiny PEFT model, a packed batch and its loss + LoRA gradients (the optimisation tests) ------------


def tiny_peft_model(
    model_dir: Path, *, dropout: float = 0.0, checkpointing: bool = False, varlen: bool = True
):
    """The tiny model in fp32 with r=4 LoRA adapters whose B is random (so they matter), in train mode."""
    import torch

    from slackdist.config import LoraSettings, ModelConfig
    from slackdist.model.attention import register_varlen_attention
    from slackdist.model.load import add_lora, load_base_model

    model = load_base_model(ModelConfig(base_model=str(model_dir)), dtype=torch.float32, quantize=False)
    if varlen:
        model.set_attn_implementation(register_varlen_attention())
    torch.manual_seed(0)
    lora = LoraSettings(r=4, alpha=8, dropout=dropout)
    peft_model = add_lora(model, lora, gradient_checkpointing=checkpointing)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero
            torch.nn.init.normal_(p, std=0.02)
    return peft_model.train()


def packed_batch(length: int, seed: int, vocab: int, *, varlen: bool = True) -> dict:
    """One packed row of two random conversations (the first token of each unlabelled)."""
    import torch

    from slackdist.train.packing import PackedRow, collate

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (length,), generator=g).tolist()
    half = length // 2
    positions = list(range(half)) + list(range(length - half))
    labels = [-100 if p == 0 else t for p, t in zip(positions, ids, strict=True)]
    row = PackedRow(input_ids=ids, labels=labels, position_ids=positions, seq_lens=[half, length - half])
    return collate([row], pad_id=0, varlen_kwargs=varlen)


def loss_and_grads(model, batch: dict) -> tuple[float, dict]:
    """The chunked loss of `batch` and the gradient of every trainable parameter (then cleared)."""
    from accelerate import Accelerator

    from slackdist.train.step import forward_loss

    loss = forward_loss(model, batch, accelerator=Accelerator(cpu=True), chunk_size=16)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def assert_same_loss_and_grads(want: tuple[float, dict], got: tuple[float, dict]) -> None:
    """Two `loss_and_grads` results agree: the loss within 1e-5, every gradient within fp32 noise."""
    import pytest
    import torch

    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert got[1].keys() == want[1].keys() and want[1]
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
