"""`slackdist export --format gguf`: a merged model (or a training output) → one GGUF file + an Ollama Modelfile.

The file holds what llama.cpp's own converter (`convert_hf_to_gguf.py`, its `TextModel` and `LlamaModel`
classes) writes for the same folder, built with llama.cpp's Python writer (the `gguf` package):

- architecture metadata (blocks, widths, heads, rope base, norm epsilon) under the architecture's prefix;
- tensors renamed with gguf's `TensorNameMap` (`model.layers.0.self_attn.q_proj.weight` →
  `blk.0.attn_q.weight`); for Llama the q/k projections are permuted from Hugging Face's rotate-half layout
  to the interleaved pairs ggml's rope reads (the converter's `LlamaModel.permute`);
- tied embeddings: no `output.weight` (llama.cpp then uses `token_embd.weight` for the output);
- llama3 rope scaling as the `rope_freqs.weight` factors (the converter's `generate_extra_tensors`);
- the tokenizer (`slackdist/gguf_vocab.py`): byte-level BPE tokens, types and merges, special ids, the
  add-bos flag and the chat template;
- norms, biases and other 1-D tensors in F32, the rest in the requested type; Q8_0 through `gguf.quants`
  (a row that is not a whole number of 32-value blocks falls back to F16, as in the converter).

Tensors are read one at a time from the safetensors shards and written straight to the file, so memory
stays near one tensor. The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from slackdist.errors import SlackdistError, first_line
from slackdist.files import Stage, check_output_dir
from slackdist.gguf_vocab import add_tokenizer, import_gguf

if TYPE_CHECKING:
    import gguf

    from slackdist.config import Config

QUANTS = ("f32", "f16", "bf16", "q8_0")
# The dtype a training output is merged in before export: as precise as the output needs.
_MERGE_DTYPE = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "q8_0": "fp16"}
MODELFILE = "Modelfile"
MODELFILE_HEADER = b"# Written by `slackdist export`"
"""How the Modelfiles `slackdist.ollama` writes begin: one there is ours to replace."""
_SKIPPED_TENSORS = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face causal-LM class maps onto llama.cpp."""

    gguf_arch: str
    """Member name of `gguf.MODEL_ARCH` (LLAMA, QWEN2, ...)."""
    permute_qk: bool
    """Permute q/k rows from rotate-half to interleaved rope (the converter's `undo_permute`)."""


# Gemma (norm weights stored as w - 1, scaled embeddings) and Phi-3 (fused qkv) need tensor rewrites of their
# own; add them here with those rewrites, following their classes in convert_hf_to_gguf.py.
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("LLAMA", permute_qk=True),
    "Qwen2ForCausalLM": Architecture("QWEN2", permute_qk=False),
}


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the output file: where it comes from, its GGUF name, shape and type."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    source: str | None = None
    """Safetensors name to read; None for a tensor computed here (`data`)."""
    data: np.ndarray | None = None
    permute_heads: int | None = None
    """Apply the q/k rope permutation with this many heads."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_gguf` wrote."""

    gguf_path: Path
    tensors: int
    bytes: int


# ---------------------------------------------------------------- reading the model folder


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder.

    Raises:
        SlackdistError: missing or unreadable.
    """
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SlackdistError(f"{folder}: no config.json (expected a `slackdist merge` output)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise SlackdistError(f"{path}: unreadable ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise SlackdistError(f"{path}: expected a JSON object")
    return config


def architecture_of(config: dict[str, Any], folder: Path) -> Architecture:
    """The registered architecture of a config.json.

    Raises:
        SlackdistError: not one of `ARCHITECTURES`.
    """
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    supported = ", ".join(ARCHITECTURES)
    raise SlackdistError(
        f"{folder / 'config.json'}: architecture {', '.join(names) or '(none)'} cannot be exported to GGUF "
        f"yet (supported: {supported})"
    )


def _safetensors_index(folder: Path) -> dict[str, Path]:
    """Tensor name → the shard that holds it."""
    from safetensors import safe_open

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise SlackdistError(f"{folder}: no .safetensors weights")
    index: dict[str, Path] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                index.update(dict.fromkeys(f.keys(), shard))
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
            raise SlackdistError(f"{shard}: unreadable safetensors ({first_line(e)})") from None
    return index


def _shapes(index: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _load(shard: Path, name: str) -> np.ndarray:
    import torch
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        return f.get_tensor(name).to(torch.float32).numpy()


# ---------------------------------------------------------------- hyperparameters and rope


def _int(config: dict[str, Any], key: str, folder: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or value <= 0:
        raise SlackdistError(f"{folder / 'config.json'}: {key} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Hparams:
    """The numbers llama.cpp needs from config.json."""

    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    rope: dict[str, Any]

    @classmethod
    def from_config(cls, config: dict[str, Any], folder: Path) -> Hparams:
        """Read and check config.json's fields.

        Raises:
            SlackdistError: a missing or non-positive size.
        """
        heads = _int(config, "num_attention_heads", folder)
        hidden = _int(config, "hidden_size", folder)
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope = dict(rope.get("full_attention", rope))  # per-layer-type rope: the full-attention one
        rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
        return cls(
            layers=_int(config, "num_hidden_layers", folder),
            hidden_size=hidden,
            intermediate_size=_int(config, "intermediate_size", folder),
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            vocab_size=_int(config, "vocab_size", folder),
            context_length=config.get("max_position_embeddings") or 2048,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope=rope,
        )

    @property
    def rope_type(self) -> str:
        return str(self.rope.get("rope_type", self.rope.get("type", "default"))).lower()


def llama3_rope_factors(hp: Hparams) -> np.ndarray:
    """Per-frequency divisors of llama3 rope scaling, as `rope_freqs.weight` (convert_hf_to_gguf.py's formula).

    llama.cpp divides each rotary frequency by its factor: 1 for high frequencies, `factor` for low ones,
    and a smooth blend between `original_max_position_embeddings / high_freq_factor` and `/ low_freq_factor`.
    """
    r = hp.rope
    base = float(r["rope_theta"])
    dim = hp.head_dim
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(r.get("factor", 8.0))
    low, high = float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old_context = float(r.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_hparams(writer: gguf.GGUFWriter, hp: Hparams, file_type: gguf.LlamaFileType, folder: Path) -> None:
    """The keys `TextModel.set_gguf_parameters` + `LlamaModel.set_gguf_parameters` write."""
    g = import_gguf()
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden_size)
    writer.add_block_count(hp.layers)
    writer.add_feed_forward_length(hp.intermediate_size)
    writer.add_head_count(hp.heads)
    writer.add_head_count_kv(hp.kv_heads)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(float(hp.rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
    writer.add_vocab_size(hp.vocab_size)
    writer.add_file_type(file_type)
    if hp.rope_type == "linear":
        writer.add_rope_scaling_type(g.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope["factor"]))
    elif hp.rope_type not in ("default", "llama3"):  # llama3: the rope_freqs tensor carries it
        raise SlackdistError(
            f"{folder / 'config.json'}: rope_type {hp.rope_type!r} cannot be exported yet "
            "(supported: default, linear, llama3)"
        )


# ---------------------------------------------------------------- tensors


def permute_rope_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """Reorder q/k projection rows from Hugging Face's rotate-half rope to ggml's interleaved pairs.

    Within each head, HF rotates (x[i], x[i + d/2]) while ggml rotates (x[2i], x[2i+1]): row i of the
    first half and row i of the second half become rows 2i and 2i+1 (convert_hf_to_gguf.py's
    `LlamaModel.permute`, with the kv head count for k).
    """
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tensor_qtype(name: str, shape: tuple[int, ...], quant: str) -> gguf.GGMLQuantizationType:
    """The storage type of one tensor (the rules of the converter's `prepare_tensors`)."""
    g = import_gguf()
    t = g.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return t.F32  # llama.cpp's kernels for norms and 1-D tensors take F32 only
    wanted = {"f32": t.F32, "f16": t.F16, "bf16": t.BF16, "q8_0": t.Q8_0}[quant]
    block_size = g.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block_size == 0 else t.F16


def plan_tensors(
    folder: Path, arch: Architecture, hp: Hparams, quant: str, *, tied: bool
) -> tuple[list[TensorPlan], dict[str, Path]]:
    """Every tensor of the output file, in order, and where each source tensor lives.

    Raises:
        SlackdistError: a tensor without a GGUF name, or an untied model without lm_head.weight.
    """
    g = import_gguf()
    index = _safetensors_index(folder)
    shapes = _shapes(index)
    name_map = g.get_tensor_name_map(g.MODEL_ARCH[arch.gguf_arch], hp.layers)
    plans: list[TensorPlan] = []
    if hp.rope_type == "llama3":
        factors = llama3_rope_factors(hp)
        name = g.TENSOR_NAMES[g.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plans.append(TensorPlan(name, factors.shape, g.GGMLQuantizationType.F32, data=factors))
    if not tied and "lm_head.weight" not in index:
        raise SlackdistError(
            f"{folder}: tie_word_embeddings is false but no lm_head.weight is stored (incomplete merge?)"
        )
    for source in sorted(index, key=_natural_key):
        if source.endswith(_SKIPPED_TENSORS) or (tied and source == "lm_head.weight"):
            continue
        name = name_map.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SlackdistError(f"{index[source]}: tensor {source!r} has no GGUF name for {arch.gguf_arch}")
        heads = None
        if arch.permute_qk and source.endswith(("q_proj.weight", "q_proj.bias")):
            heads = hp.heads
        elif arch.permute_qk and source.endswith(("k_proj.weight", "k_proj.bias")):
            heads = hp.kv_heads
        shape = shapes[source]
        plans.append(TensorPlan(name, shape, tensor_qtype(name, shape, quant), source, permute_heads=heads))
    return plans, index


def _natural_key(name: str) -> list[Any]:
    """Sort `layers.10` after `layers.9`, so the file lists blocks in order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _nbytes(plan: TensorPlan) -> int:
    g = import_gguf()
    return int(np.prod(g.quant_shape_to_byte_shape(plan.shape, plan.qtype)))


def _tensor_bytes(plan: TensorPlan, index: dict[str, Path]) -> np.ndarray:
    g = import_gguf()
    data = plan.data if plan.data is not None else _load(index[plan.source], plan.source)
    if plan.permute_heads is not None:
        data = permute_rope_rows(data, plan.permute_heads)
    return g.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), plan.qtype)


# ---------------------------------------------------------------- the file


def file_type(quant: str) -> gguf.LlamaFileType:
    g = import_gguf()
    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    return g.LlamaFileType[names[quant]]


def export_gguf(
    folder: Path, out_path: Path, *, quant: str = "q8_0", name: str | None = None
) -> ExportResult:
    """Write a merged model folder as one GGUF file.

    Args:
        folder: a `slackdist merge` output (config.json, safetensors shards, tokenizer.json).
        out_path: the .gguf file; written as a temp file in the same folder, then renamed.
        quant: f32, f16, bf16 or q8_0 for the 2-D weights (norms and 1-D tensors stay F32).
        name: `general.name` (default: the folder's name).

    Returns:
        The file, its tensor count and size.

    Raises:
        SlackdistError: the gguf package is missing, or the folder is not an exportable model.
    """
    from tqdm.auto import tqdm

    g = import_gguf()
    if quant not in QUANTS:
        raise SlackdistError(f"--quant {quant}: expected one of {', '.join(QUANTS)}")
    config = read_config(folder)
    arch = architecture_of(config, folder)
    hp = Hparams.from_config(config, folder)
    tied = bool(config.get("tie_word_embeddings", False))
    plans, index = plan_tensors(folder, arch, hp, quant, tied=tied)

    writer = g.GGUFWriter(path=None, arch=g.MODEL_ARCH_NAMES[g.MODEL_ARCH[arch.gguf_arch]])
    writer.add_type(g.GGUFType.MODEL)
    writer.add_name(name or folder.resolve().name)
    _add_hparams(writer, hp, file_type(quant), folder)
    writer.add_quantization_version(g.GGML_QUANT_VERSION)
    add_tokenizer(writer, folder, hp.vocab_size)
    for plan in plans:
        writer.add_tensor_info(
            plan.name, plan.shape, np.dtype(np.float32), _nbytes(plan), raw_dtype=plan.qtype
        )

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is meant to be shared
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan in tqdm(plans, desc=f"writing {out_path.name}", unit="tensor"):
            writer.write_tensor_data(_tensor_bytes(plan, index))
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(out_path, len(plans), out_path.stat().st_size)


# ---------------------------------------------------------------- the command


def is_adapter_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


@contextlib.contextmanager
def merged_source(model_dir: Path, *, base: str | None, quant: str, scratch: Path) -> Iterator[Path]:
    """The merged folder to export: `model_dir` itself, or a training output merged into a temp folder.

    Raises:
        SlackdistError: neither a merged model nor an adapter folder.
    """
    if not model_dir.is_dir():
        raise SlackdistError(f"{model_dir}: no such model folder")
    if not is_adapter_folder(model_dir):
        if not (model_dir / "config.json").is_file():
            raise SlackdistError(
                f"{model_dir}: not a model folder (expected config.json + safetensors from `slackdist merge`, "
                "or a `slackdist train` output)"
            )
        yield model_dir
        return
    from slackdist.train.merge import merge_adapter

    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".slackdist-merge-", dir=scratch) as tmp:
        print(f"merging the adapter in {model_dir} into its base ({_MERGE_DTYPE[quant]}) for export")
        yield merge_adapter(model_dir, Path(tmp) / "merged", base=base, dtype=_MERGE_DTYPE[quant])


def output_path(out: str, model_dir: Path, quant: str) -> Path:
    """`--out FILE.gguf`, or a folder (default: MODEL_DIR/gguf) that gets `<model name>-<quant>.gguf`."""
    name = model_dir.resolve().name
    if out.endswith(".gguf"):
        return Path(out)
    folder = Path(out) if out else model_dir / "gguf"
    return folder / f"{name}-{quant}.gguf"


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(prefix)) == prefix


def check_export_target(gguf_path: Path, *, single_file: bool, inputs: list[Any], overwrite: bool) -> None:
    """What the export replaces must be an earlier export (or ``--overwrite``), never its input.

    A folder (`--out DIR`, default MODEL_DIR/gguf) is replaced whole; `--out FILE.gguf` replaces
    that file and the Modelfile beside it, each only if it is a GGUF / a Modelfile we wrote.

    Raises:
        SlackdistError: one line naming the folder or file.
    """
    if not single_file:
        check_output_dir(
            gguf_path.parent,
            markers=(MODELFILE, "*.gguf"),
            what="an export folder",
            overwrite=overwrite,
            inputs=inputs,
        )
        return
    modelfile = gguf_path.with_name(MODELFILE)
    for path, magic, what in (
        (gguf_path, b"GGUF", "a GGUF file"),
        (modelfile, MODELFILE_HEADER, "our Modelfile"),
    ):
        if path.is_dir():
            raise SlackdistError(f"{path}: is a folder; --out FILE.gguf needs a file name there")
        if path.exists() and not overwrite and not _starts_with(path, magic):
            raise SlackdistError(f"{path}: exists and is not {what}; pass --overwrite to replace it")


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist export --model-dir DIR --format gguf [--quant q8_0] [--out FILE_OR_DIR] [--system TEXT]`.

    Everything is written into a temporary folder first; a folder output is then renamed into place
    whole (`slackdist.files.Stage`), a `FILE.gguf` output and its Modelfile are renamed one after
    the other with Ctrl-C and SIGTERM held between them.
    """
    from slackdist.ollama import build_modelfile

    e = cfg.export
    model_dir = Path(e.model_dir)
    out_path = output_path(e.out, model_dir, e.quant)
    single_file = e.out.endswith(".gguf")
    check_export_target(
        out_path, single_file=single_file, inputs=[model_dir, e.base], overwrite=args.overwrite
    )
    stage = Stage(out_path if single_file else out_path.parent)
    try:
        tmp = stage.create()
        with merged_source(model_dir, base=e.base, quant=e.quant, scratch=tmp) as folder:
            modelfile = build_modelfile(out_path.name, folder=folder, model_dir=model_dir, cfg=cfg)
            result = export_gguf(folder, tmp / out_path.name, quant=e.quant, name=model_dir.resolve().name)
        (tmp / MODELFILE).write_text(modelfile.text, encoding="utf-8")
        if single_file:
            stage.install_files([out_path.name, MODELFILE])
        else:
            stage.install()
    finally:
        stage.discard()
    size_mb = result.bytes / 2**20
    print(f"GGUF written to {out_path} ({result.tensors} tensors, {size_mb:.1f} MiB, {e.quant})")
    print(f"Ollama Modelfile written to {out_path.parent / MODELFILE}")
    if modelfile.note:
        print(modelfile.note)
    print(
        f"run it: llama-cli -m {out_path} -cnv   |   cd {out_path.parent} && ollama create team -f Modelfile"
    )
    return 0
