"""Nothing leaves the machine: the environment every `slackdist` command starts with.

slackdist itself opens no outbound connection (no telemetry, no uploads: there is no ``push_to_hub``
in the package, which a test checks). The libraries it drives could, and :func:`set_private_defaults`
closes that, always leaving a variable the user set alone:

- **Telemetry off**: ``HF_HUB_DISABLE_TELEMETRY=1`` and ``DO_NOT_TRACK=1``. The Hugging Face hub
  client is where transformers, peft, accelerate and datasets send usage data (its ``send_telemetry``
  and the telemetry fields of each request); both variables turn it off. Accelerate itself,
  TensorBoard's event writer and torch send nothing.
- **Offline for local models**: when every model a command loads is a local folder (the base model,
  and the base an adapter folder names), ``HF_HUB_OFFLINE=1``. Nothing needs the hub then, and
  libraries that would still reach it are kept from it: bitsandbytes, on CPUs with AVX512-bf16, asks
  the hub at import for an optimised 4-bit CPU kernel (``kernels-community/quantization-bitsandbytes``,
  through the ``kernels`` package) and falls back to its own when it cannot have it. A hub id as a
  model (``meta-llama/Llama-3.2-3B-Instruct``) or a hub dataset as ``--data`` is a download the user
  asked for, and works as before; ``HF_HUB_OFFLINE=1`` set by the user makes it read the local cache only.

The hub client and datasets read these variables when they are imported, so this runs first in
`slackdist.cli.main`, after the config is read and before a command's module (and torch,
transformers, peft, bitsandbytes) is imported.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slackdist.config import Config

PRIVATE_DEFAULTS = {
    "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub: transformers, peft, accelerate, datasets
    "DO_NOT_TRACK": "1",  # the cross-tool convention (https://donottrack.sh), honoured by huggingface_hub too
}
OFFLINE = "HF_HUB_OFFLINE"


def command_models(command: str, args: argparse.Namespace, cfg: Config) -> list[str | None] | None:
    """The models (paths or hub ids) a command loads; None for a command not listed here."""
    if command == "prepare":
        return [cfg.data.tokenizer]
    if command == "train":
        return [cfg.model.base_model, _hub_dataset(cfg.train.data_dir)]
    if command == "eval":
        return [cfg.chat.model_dir, cfg.chat.base, _hub_dataset(args.data)]
    if command in ("chat", "audit", "serve"):  # audit's --data is a local folder (its canaries.json)
        return [cfg.chat.model_dir, cfg.chat.base]
    if command == "merge":
        return [args.adapter, args.base]
    if command == "export":
        return [cfg.export.model_dir, cfg.export.base]
    if command in ("tiny-model", "real-model", "forget"):
        return []
    return None


def _hub_dataset(data: str | None) -> str | None:
    """`--data` when it names nothing on disk (a hub dataset id: not local), else None (local data)."""
    return data if data and not Path(data).expanduser().exists() else None


def all_local(models: Iterable[str | None]) -> bool:
    """Whether every model given is a local folder, and so is the base each adapter folder names."""
    for model in models:
        if not model:
            continue
        folder = Path(model)
        if not folder.is_dir():
            return False
        try:
            base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        base_model = base.get("base_model_name_or_path") if isinstance(base, dict) else None
        if base_model and not Path(base_model).is_dir():
            return False
    return True


def set_private_defaults(
    models: Iterable[str | None] | None = None, environ: MutableMapping[str, str] | None = None
) -> None:
    """Telemetry off; with ``models`` all local folders, the hub offline (module docstring).

    Args:
        models: what the command loads (:func:`command_models`); None: unknown, the hub is left as it is.
        environ: the environment to change (default: this process's, which its children inherit).
    """
    env = os.environ if environ is None else environ
    for key, value in PRIVATE_DEFAULTS.items():
        env.setdefault(key, value)
    if models is not None and all_local(models):
        env.setdefault(OFFLINE, "1")
