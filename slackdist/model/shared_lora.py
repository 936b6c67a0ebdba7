"""One LoRA dropout and one A matmul for the projections that read the same input.

PEFT runs every LoRA layer on its own: an attention block's q_proj, k_proj and v_proj each draw a
dropout mask over the same hidden states, keep their own dropped copy for the backward pass and
multiply it by their own A; the MLP's gate_proj and up_proj do the same. `share_lora_inputs`
installs, on each such block of a family whose code feeds the group one tensor, a forward that
drops the input out once, multiplies it by the group's A matrices stacked (`[r_q + r_k + r_v, d]`,
one matmul instead of three, one A gradient and one input gradient in the backward pass) and
hands each projection its slice; the projection then adds `B(slice) * scaling` to its base output
as PEFT would. What changes is only that the group's projections share one dropout mask: each
still sees the configured dropout rate, and without dropout the outputs are PEFT's. Parameters,
state-dict keys and the saved adapter are PEFT's, unchanged.

A projection called outside its block's forward, with adapters disabled or merged, with several
adapters or a LoRA variant (DoRA) runs PEFT's own forward. Training installs it only on a model it
does not shard: DeepSpeed ZeRO-3 gathers a LoRA weight only when that weight's own module runs.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

GROUPS: dict[str, tuple[str, ...]] = {
    "Attention": ("q_proj", "k_proj", "v_proj"),
    "MLP": ("gate_proj", "up_proj"),
}
"""Block class-name suffix → the projections its forward calls on one input tensor."""

FAMILIES = ("Llama", "Mistral", "Mixtral", "Qwen2", "Qwen3", "Gemma", "Gemma2", "Gemma3")
"""Model families whose attention and MLP code calls each group on the same tensor, once a forward."""

_BLOCKS = {family + suffix: members for suffix, members in GROUPS.items() for family in FAMILIES}
_PART = "_slackdist_lora_part"


def share_lora_inputs(model: torch.nn.Module) -> int:
    """Install the shared-input LoRA forward on every block it applies to; return how many."""
    count = 0
    for module in model.modules():
        members = _group_of(module)
        if members is None:
            continue
        for name in members:
            member = getattr(module, name)
            setattr(member, _PART, None)
            member.forward = types.MethodType(_member_forward, member)
        module._slackdist_lora_group = members
        module._slackdist_lora_input = list(inspect.signature(type(module).forward).parameters)[1]
        module.forward = types.MethodType(_block_forward, module)
        count += 1
    return count


def _group_of(module: torch.nn.Module) -> tuple[str, ...] | None:
    """The projections of `module` to share an input, when it is such a block and all of them have LoRA."""
    members = _BLOCKS.get(type(module).__name__)
    if members and all(isinstance(getattr(module, m, None), LoraLayer) for m in members):
        return members
    return None


def _plain(layer: Any) -> bool:
    """One vanilla LoRA adapter, active and unmerged: what the shared forward computes."""
    active = layer.active_adapters
    return (
        not layer.disable_adapters
        and not layer.merged
        and len(active) == 1
        and active[0] in layer.lora_A
        and active[0] not in layer.lora_variant
    )


def _block_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    members = [getattr(self, name) for name in self._slackdist_lora_group]
    x = args[0] if args else kwargs[self._slackdist_lora_input]
    if not all(_plain(m) for m in members):
        return type(self).forward(self, *args, **kwargs)
    adapter = members[0].active_adapters[0]
    weights = [m.lora_A[adapter].weight for m in members]
    stacked = torch.cat(weights)
    if not torch.is_autocast_enabled():  # as PEFT: under autocast the input keeps its dtype
        x = x.to(stacked.dtype)
    dropped = members[0].lora_dropout[adapter](x)
    parts = F.linear(dropped, stacked).split([w.shape[0] for w in weights], dim=-1)
    for member, part in zip(members, parts, strict=True):
        setattr(member, _PART, part)  # each projection takes its part (and clears it) when called
    return type(self).forward(self, *args, **kwargs)


def _member_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    part = getattr(self, _PART)
    if part is None:
        return type(self).forward(self, x, *args, **kwargs)
    setattr(self, _PART, None)
    result = self.base_layer(x, *args, **kwargs)
    adapter = self.active_adapters[0]
    delta = self.lora_B[adapter](part) * self.scaling[adapter]
    return result + delta.to(result.dtype)
