"""Real torch FSDP1 / FSDP2 on the CPU (gloo), checkpointed with slackdist's DCP functions. Run by torchrun
from tests/test_checkpoint.py:

    torchrun --standalone --nproc_per_node N tests/fsdp_checkpoint_worker.py fsdp1|fsdp2 MODEL_DIR WORK \
        --steps 6 --save-at 3 [--resume-from CHECKPOINT]

Accelerate never turns FSDP on for a CPU (it falls back to DDP), so this wraps the tiny Llama + LoRA the way
Accelerate does on a GPU: FSDP1 with PEFT's wrap policy and flat parameters (the optimizer built after
wrapping), FSDP2 with `fully_shard` per decoder layer and on the root. Every process trains on the same
batches, so FSDP's averaged gradient is the one-process gradient and a run on any number of processes
follows the same trajectory. The checkpoint written at `--save-at` is
`slackdist.train.distributed.save_sharded_trainable`'s; `--resume-from` loads one (written on any number of
processes) and trains on to `--steps`. Rank 0 writes WORK/result.json (loss per step, and the untrained model's loss on the first batch) and
WORK/final.safetensors (the LoRA weights at the end, gathered).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from peft.utils.other import fsdp_auto_wrap_policy
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from transformers import AutoModelForCausalLM

from slackdist.config import LoraSettings
from slackdist.model.adapter import is_lora_key
from slackdist.model.load import add_lora
from slackdist.train.distributed import Topology, load_sharded_trainable, save_sharded_trainable


def build(backend: str, model_dir: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same LoRA init on every process
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
    if backend == "fsdp1":
        model = FullyShardedDataParallel(
            model,
            auto_wrap_policy=fsdp_auto_wrap_policy(model),
            use_orig_params=False,
            device_id=torch.device("cpu"),
        )
    else:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)


def batch(step: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(step))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backend", choices=["fsdp1", "fsdp2"])
    parser.add_argument("model_dir")
    parser.add_argument("work", type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-at", type=int, default=0)
    parser.add_argument("--resume-from", type=Path)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    topology = Topology(args.backend, dist.get_world_size(), dist.get_rank(), torch.device("cpu"))
    model, optimizer = build(args.backend, args.model_dir)
    vocab = AutoModelForCausalLM.from_pretrained(args.model_dir).config.vocab_size
    first = args.save_at + 1 if args.resume_from else 1
    model.train()
    with torch.no_grad():  # the untrained model's loss on the first batch: what a load that did nothing gives
        ids = batch(first, vocab)
        untrained_loss = model(input_ids=ids, labels=ids).loss.item()
    if args.resume_from:
        load_sharded_trainable(topology, model, optimizer, args.resume_from)
    losses = {}
    for step in range(first, args.steps + 1):
        ids = batch(step, vocab)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[step] = loss.item()
        if step == args.save_at and not args.resume_from:
            with torch.no_grad():  # an eval pass first, as the recipe's checkpoints often follow one:
                model(input_ids=ids, labels=ids)  # it leaves the root's parameters unsharded
            save_sharded_trainable(topology, model, optimizer, args.work / "checkpoint")
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if topology.is_main_process:
        lora = {k: v.contiguous() for k, v in weights.items() if is_lora_key(k)}
        save_file(lora, str(args.work / "final.safetensors"))
        (args.work / "result.json").write_text(
            json.dumps({"losses": losses, "untrained_loss": untrained_loss})
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
