"""Is an adapter file whole? Every LoRA module's A and B, and trained B matrices that are not zero.

A LoRA adapter adds `B @ A` to each targeted weight, and B starts at zero. So an adapter file that
lost tensors (peft 0.21's silent FSDP1 save bug, see `slackdist.train.checkpoint`; a file written
by hand; a bad copy) or whose B matrices were zeroed loads without any error in PEFT and answers
exactly as the base model. Training checks every adapter it writes (`slackdist.train.checkpoint`),
and chat, eval, serve and merge check every adapter they load, with the same function.

Whether the adapter was trained is recorded in the file itself: slackdist writes the number of
optimizer steps that updated it into the safetensors metadata (`UPDATES_METADATA`). After one
such step every lora_B is non-zero, so a zero lora_B is an error. An adapter from elsewhere (no
such metadata) is only refused when every lora_B is zero: then it changes nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open

from slackdist.errors import SlackdistError, first_line

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
UPDATES_METADATA = "slackdist_updates"
"""safetensors metadata key: optimizer steps (with a learning rate > 0) that updated the adapter."""
# `...q_proj.lora_A.weight` (Linear) and `...embed_tokens.lora_embedding_B` (Embedding) as PEFT saves them.
_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<which>[AB])(?:\.weight)?$")
# A LoRA tensor in a model's state dict or parameters: `...q_proj.lora_A.default.weight`, `...lora_embedding_B.default`.
_LORA_TENSOR = re.compile(r"\.lora_(?:embedding_)?[AB](?:\.|$)")
# Wrapper names that FSDP / activation checkpointing / torch.compile / DDP put into parameter names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_key(key: str) -> str:
    """A parameter or module name without FSDP / checkpoint / compile / DDP wrapper parts."""
    for part in _WRAPPER_PARTS:
        key = key.replace(part, "")
    return key.removeprefix("module.")


def is_lora_key(key: str) -> bool:
    """A model state-dict key or parameter name of a LoRA A/B tensor (any adapter name)."""
    return _LORA_TENSOR.search(key) is not None


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules that carry a LoRA adapter (works through DDP/FSDP wrappers)."""
    return [clean_key(name) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def adapter_updates(path: str | os.PathLike[str]) -> int | None:
    """The optimizer steps recorded in an adapter file's metadata; None when it has none (not ours).

    Raises:
        SlackdistError: the file is not a readable safetensors file.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get(UPDATES_METADATA)
    except (SafetensorError, OSError) as e:
        raise SlackdistError(f"{path}: unreadable adapter ({first_line(e)})") from None
    return int(value) if value is not None and value.isdigit() else None


def check_adapter_file(
    path: str | os.PathLike[str], modules: Iterable[str], *, trained: bool | None = None
) -> int:
    """Check an adapter file against the LoRA modules of the model it belongs to.

    Args:
        path: adapter_model.safetensors.
        modules: the model's LoRA module names (`lora_module_names`), as PEFT names them in the file.
        trained: at least one optimizer step updated the adapter (every lora_B must be non-zero);
            False before training (B is zero at init); None: read it from the file's metadata, and
            when the file has none, refuse only an adapter whose every lora_B is zero.

    Returns:
        The number of LoRA tensors in the file.

    Raises:
        SlackdistError: the file is unreadable, a module's lora_A or lora_B is missing, or lora_B
            tensors are zero where they cannot be.
    """
    path = Path(path)
    modules = list(modules)
    if trained is None:
        updates = adapter_updates(path)
        trained = None if updates is None else updates > 0
    try:
        with safe_open(str(path), framework="pt") as f:
            found: dict[tuple[str, str], str] = {}
            for key in f.keys():
                match = _ADAPTER_KEY.match(key)
                if match:
                    found[(match["module"], match["which"])] = key
            b_keys = [key for (_, which), key in found.items() if which == "B"]
            zero_b = [key for key in b_keys if not f.get_tensor(key).any()] if trained is not False else []
    except (SafetensorError, OSError, RuntimeError) as e:
        raise SlackdistError(f"{path}: unreadable adapter ({first_line(e)})") from None
    missing = [m for m in modules if (m, "A") not in found or (m, "B") not in found]
    if missing:
        raise SlackdistError(
            f"{path}: lora_A/lora_B missing for {len(missing)} of {len(modules)} LoRA modules "
            f"(first: {missing[0]}): the adapter lost layers while saving or copying"
        )
    if trained and zero_b:
        raise SlackdistError(
            f"{path}: {len(zero_b)} lora_B tensors are all zeros after training (first: {zero_b[0]})"
        )
    if trained is None and b_keys and len(zero_b) == len(b_keys):
        raise SlackdistError(
            f"{path}: every lora_B tensor is zero: the adapter changes nothing (it would answer as the base model)"
        )
    return len(found)


def check_loaded_adapter(peft_model: torch.nn.Module, adapter_dir: str | os.PathLike[str]) -> None:
    """After `PeftModel.from_pretrained(base, adapter_dir)`: the file held every module PEFT built
    from adapter_config.json, and trained B matrices (PEFT itself only warns about missing keys
    and keeps the zero-initialised B, i.e. the base model, for them).

    Raises:
        SlackdistError: see `check_adapter_file`.
    """
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if path.is_file():  # an adapter_model.bin from elsewhere is not unpickled just to be checked
        check_adapter_file(path, lora_module_names(peft_model))
