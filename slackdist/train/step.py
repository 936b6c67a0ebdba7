"""One optimizer step and one eval pass: step inputs, the forward loss, the update.

Loss: summed over label tokens and divided by the label tokens of the whole optimizer step (all
micro-batches, all ranks), so every token weighs the same however rows fall into micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from slackdist.model.loss import IGNORE_INDEX, chunked_lm_loss, logit_softcap
from slackdist.train.flat import FlatParameters
from slackdist.train.packing import PackedRow, collate


def _filler_row(pad_id: int) -> PackedRow:
    return PackedRow(input_ids=[pad_id], labels=[IGNORE_INDEX], position_ids=[0], seq_lens=[1])


@dataclass
class StepInputs:
    """The micro-batches of one optimizer step on this rank: collated on the CPU, then moved."""

    batches: list[dict[str, Any]]
    label_tokens: int
    input_tokens: int

    def to(self, device: torch.device) -> StepInputs:
        """The batches on `device`. To a GPU the copies go from pinned memory without waiting:
        the host goes on queueing the step while they run (a pageable copy waits for the GPU
        to finish everything queued before it)."""
        cuda = device.type == "cuda"

        def move(v: Any) -> Any:
            if not isinstance(v, torch.Tensor):
                return v
            return v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device)

        batches = [{k: move(v) for k, v in batch.items()} for batch in self.batches]
        return StepInputs(batches, self.label_tokens, self.input_tokens)


def make_step_inputs(
    micro_batches: list[list[PackedRow]], *, pad_id: int, device: torch.device, varlen: bool
) -> StepInputs:
    """Collate each micro-batch on the CPU, then move them to `device`; an empty one becomes a filler
    row with no label (every rank runs the same number of forwards, as DDP and FSDP need)."""
    batches = [collate(rows or [_filler_row(pad_id)], pad_id, varlen_kwargs=varlen) for rows in micro_batches]
    host = StepInputs(
        batches,
        label_tokens=sum(b["num_label_tokens"] for b in batches),
        input_tokens=sum(len(row) for rows in micro_batches for row in rows),
    )
    return host.to(device)


def forward_loss(
    model: Any, batch: dict[str, Any], *, accelerator: Accelerator, chunk_size: int
) -> torch.Tensor:
    """Summed next-token loss of one micro-batch (fp32 scalar).

    Chunked (lm_head + cross-entropy per chunk of label positions, no full logits) when
    `chunk_size > 0`; else the model computes its own logits, which sharded models need
    (`Topology.loss_chunk_size`).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_label_tokens", "label_positions")}
    if chunk_size > 0:
        # logits_to_keep=1: the model's own lm_head runs on one position only; the last hidden
        # state (after the final norm) feeds the chunked loss.
        out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        unwrapped = accelerator.unwrap_model(model)
        lm_head = unwrapped.get_output_embeddings()
        with accelerator.autocast():
            if batch["num_label_tokens"] == 0:
                # A filler micro-batch: zero loss, but through lm_head too, so every LoRA parameter
                # gets a (zero) gradient and DDP's reducer does not wait for lm_head's.
                return lm_head(hidden[:, :1]).float().sum() * 0.0
            loss_sum, _ = chunked_lm_loss(
                hidden,
                lm_head,
                labels,
                chunk_size,
                softcap=logit_softcap(unwrapped),
                positions=batch.get("label_positions"),
            )
        return loss_sum
    logits = model(**inputs, use_cache=False).logits
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    # Only labelled positions are upcast to fp32 (a [B, T, 128k] fp32 copy would be GBs). Over no
    # label at all the sum is 0 with a (zero) gradient into every parameter, as DDP needs.
    return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")


@dataclass
class StepStats:
    """One optimizer step, summed over ranks."""

    loss: float
    """Loss per label token."""
    lr: float
    """The learning rate the step applied."""
    grad_norm: float | None
    label_tokens: int
    input_tokens: int
    stop_requested: bool
    """Some rank was asked to stop (a preemption signal may reach one rank only)."""


def train_step(
    accelerator: Accelerator,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    inputs: StepInputs,
    *,
    chunk_size: int,
    max_grad_norm: float,
    stop_requested: bool,
    flat: FlatParameters | None = None,
) -> StepStats:
    """One optimizer step over this rank's micro-batches.

    With flat parameters (`slackdist.train.distributed.wrap`), the gradients are gathered into the
    flat one before clipping.

    Each micro-batch's loss sum is scaled by (accumulation x processes / label tokens of the whole
    step): accelerate divides by the accumulation steps and DDP/FSDP average over processes, so the
    gradient is d(sum of token losses) / (all label tokens of the step).
    """
    device = accelerator.device
    global_tokens = inputs.label_tokens
    if accelerator.num_processes > 1:
        counts = torch.tensor([inputs.label_tokens], device=device, dtype=torch.long)
        global_tokens = int(accelerator.reduce(counts, reduction="sum").item())
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / max(global_tokens, 1)
    loss_total = torch.zeros((), device=device, dtype=torch.float32)
    grad_norm = None
    lr = scheduler.get_last_lr()[0]  # the rate this step applies (the scheduler steps after it)
    for batch in inputs.batches:
        with accelerator.accumulate(model):
            loss_sum = forward_loss(model, batch, accelerator=accelerator, chunk_size=chunk_size)
            accelerator.backward(loss_sum * scale)
            if accelerator.sync_gradients:
                params = model.parameters()
                if flat is not None:
                    flat.collect_grads()
                    params = [flat.flat]
                grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if flat is not None and accelerator.sync_gradients:
                flat.zero_grad()
        loss_total += loss_sum.detach().float()
    if not getattr(optimizer, "step_was_skipped", False):  # fp16 overflow skips the step
        scheduler.step()
    # One reduction for the logged numbers and the stop flag (a signal may reach one rank only).
    stats = torch.stack(
        [
            loss_total,
            torch.tensor(float(inputs.input_tokens), device=device),
            torch.tensor(float(stop_requested), device=device),
        ]
    )
    stats = accelerator.reduce(stats, reduction="sum")
    return StepStats(
        loss=float(stats[0]) / max(global_tokens, 1),
        lr=lr,
        grad_norm=None if grad_norm is None else float(grad_norm),
        label_tokens=global_tokens,
        input_tokens=int(stats[1]),
        stop_requested=bool(stats[2] > 0),
    )


def eval_loss(
    accelerator: Accelerator,
    model: Any,
    micro_batches: Iterable[list[PackedRow]],
    *,
    pad_id: int,
    varlen: bool,
    chunk_size: int,
) -> float:
    """Loss per label token over this rank's micro-batches of validation rows, summed across ranks."""
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    model.eval()
    # Compiled decoder layers were traced for training (grad mode, dropout on): compiling them again
    # for a few forward-only eval batches costs far more than running those batches eagerly.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for rows in micro_batches:
            inputs = make_step_inputs([rows], pad_id=pad_id, device=accelerator.device, varlen=varlen)
            batch = inputs.batches[0]
            totals[0] += forward_loss(model, batch, accelerator=accelerator, chunk_size=chunk_size).double()
            totals[1] += batch["num_label_tokens"]
    model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1].clamp(min=1))
