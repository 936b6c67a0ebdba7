"""`slackdist merge`: fold a LoRA adapter into its 16-bit base and write sharded safetensors.

The base is loaded in 16-bit (or fp32) on the CPU, never in 4-bit: merging into NF4 weights would
re-quantize the sum and lose most of the adapter. The result loads with plain
`AutoModelForCausalLM.from_pretrained(MERGED)`.

The merged folder describes itself like the adapter folder it came from: the training config
(`slackdist_config.yaml`) and the model info (`slackdist_inference.json`) are copied with it, and so
is the provenance of its training data (`provenance.jsonl`: whose messages it holds, for `slackdist forget`).

Tied embeddings (Llama 3.2 1B/3B) are untied when a LoRA sits on `lm_head`, and both weights are
saved (`slackdist.model.merging`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM

from slackdist.data.provenance import copy_provenance, find_provenance
from slackdist.errors import SlackdistError, first_line
from slackdist.files import check_model_folder, staged_dir
from slackdist.model.info import CONFIG_FILE, INFO_FILE, read_model_info
from slackdist.model.load import attach_adapter, load_tokenizer
from slackdist.model.merging import merge_lora

if TYPE_CHECKING:
    from slackdist.config import Config

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _adapter_meta(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise SlackdistError(
            f"{adapter_dir}: no adapter_config.json (expected a `slackdist train` output or checkpoint)"
        )
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise SlackdistError(f"{adapter_dir}: no adapter_model.safetensors")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SlackdistError(f"{path}: unreadable ({e})") from None


def merge_adapter(
    adapter_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    base: str | None = None,
    dtype: str = "bf16",
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Merge an adapter into its base model and save the result.

    Args:
        adapter_dir: a training output folder or a checkpoint (adapter_config.json + adapter_model.safetensors).
        output_dir: folder for config.json, model-*.safetensors (+ index), tokenizer and chat template,
            and the adapter folder's slackdist_config.yaml / slackdist_inference.json; written to a temp
            folder next to it, then renamed into place (`slackdist.files.staged_dir`: an earlier
            model folder there is replaced whole).
        base: base model (default: `base_model_name_or_path` of adapter_config.json).
        dtype: bf16, fp16 or fp32 for the merged weights.
        max_shard_size: largest safetensors shard ("2GB", "500MB", ...).
        overwrite: replace `output_dir` even when it is non-empty and not a model folder.

    Returns:
        The output folder.

    Raises:
        SlackdistError: not an adapter folder, no base model, a base that cannot load, an adapter
            with missing tensors or zeroed lora_B (`slackdist.model.adapter`), or an `output_dir`
            that is not a model folder or holds the adapter or base (`check_model_folder`).
    """
    if dtype not in _DTYPES:
        raise SlackdistError(f"--dtype {dtype}: expected one of {', '.join(_DTYPES)}")
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    meta = _adapter_meta(adapter_dir)
    base = base or meta.get("base_model_name_or_path")
    if not base:
        raise SlackdistError(
            f"{adapter_dir / 'adapter_config.json'}: no base_model_name_or_path; pass --base"
        )
    check_model_folder(output_dir, overwrite=overwrite, inputs=[adapter_dir, base])
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=_DTYPES[dtype], device_map={"": "cpu"})
    except (OSError, ValueError) as e:
        raise SlackdistError(f"{base}: cannot load the base model ({first_line(e)})") from None
    model = attach_adapter(model, adapter_dir, base=base)
    merged = merge_lora(model)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    info = read_model_info(adapter_dir)
    tokenizer = load_tokenizer(
        str(adapter_dir) if has_tokenizer else base, chat_template=info.chat_template if info else "auto"
    )

    with staged_dir(output_dir) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        for name in (CONFIG_FILE, INFO_FILE):
            if (adapter_dir / name).is_file():
                shutil.copyfile(adapter_dir / name, tmp / name)
        copy_provenance(find_provenance(adapter_dir), tmp)  # whose messages the merged model holds
    return output_dir


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist merge --adapter OUT --output MERGED [--base ...] [--max-shard-size 2GB] [--dtype bf16]`."""
    out = merge_adapter(
        args.adapter,
        args.output,
        base=args.base,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    print(f"merged model written to {out} ({len(shards)} safetensors file{'s' if len(shards) != 1 else ''})")
    return 0
