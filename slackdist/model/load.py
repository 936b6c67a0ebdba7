"""Tokenizer, quantization config, base model, LoRA adapters, and models for inference.

Decisions made here (and why):

- Precision is decided in one place, `resolve_dtype`: bf16 on GPUs that support it, else
  fp16; fp32 on CPU. 4-bit NF4 weights store their packed bytes in the same dtype
  (`bnb_4bit_quant_storage`) so FSDP can shard them like every other parameter
  (notes/distributed_qlora.md: "quant_storage dtype should always match FSDP param_dtype").
- No fp32 upcast of frozen weights. PEFT's `prepare_model_for_kbit_training` casts every
  non-4-bit parameter to fp32; for Llama that buys nothing (`LlamaRMSNorm` already computes
  in fp32 internally, the frozen embedding needs no fp32 master copy), costs memory (the
  tied 128k x 3072 embedding alone grows from 0.8 to 1.6 GB), and mixes dtypes inside FSDP
  flat parameters ("Must flatten tensors with uniform dtype"). We keep the base in the
  compute dtype; the LoRA weights are fp32 (PEFT's `autocast_adapter_dtype`), which is
  what fp16 gradient scaling needs and keeps adapter updates precise.
- Gradient checkpointing is non-reentrant, with `enable_input_require_grads` so the
  frozen embedding's output carries a grad path (required by reentrant checkpointing,
  harmless otherwise).
- LoRA on a tied `lm_head` (Llama 3.2 1B/3B): bitsandbytes never quantizes the output
  embedding, so the tied weight is one bf16 tensor, quantized zero times and shared by
  `embed_tokens` and `lm_head.base_layer`. We target `lm_head` only, not `embed_tokens`,
  so the adapter is an output-side delta and the input embedding stays the base weight.
  `ensure_weight_tying=True` would only matter if `embed_tokens` were targeted too, and it
  breaks FSDP1 wrapping (notes/fsdp_qlora_measured.md), so we leave it False and silence
  PEFT's generic warning about it (https://github.com/huggingface/peft/issues/2777).
  Consequences for saving and merging: save adapters with `save_embedding_layers=False`
  (else the whole tied embedding is written into every adapter), and merge into an
  untied copy (lm_head gets its own clone of the embedding) because PEFT refuses to merge
  into a tied weight and merging in place would change the input embedding too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from slackdist.config import Config, ConfigError, LoraSettings, ModelConfig, load_config
from slackdist.errors import SlackdistError, first_line
from slackdist.hub import ensure_hub_repo, looks_like_a_path
from slackdist.model.adapter import check_loaded_adapter
from slackdist.model.attention import register_varlen_attention, varlen_available
from slackdist.model.families import lora_targets, read_model_type
from slackdist.model.info import CONFIG_FILE, ModelInfo, read_model_info
from slackdist.model.merging import merge_lora
from slackdist.model.template import ensure_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TIED_LORA_WARNING = r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"
_CHECKPOINTING_NAME_WARNING = r"`is_gradient_checkpointing` is deprecated"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


_warned: set[str] = set()


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype for a config value and a device.

    Args:
        name: "auto", "bf16", "fp16" or "fp32". auto = bf16 on a GPU that supports it,
            else fp16 on GPU; fp32 on CPU.
        device: where the model runs.

    Returns:
        The torch dtype.

    Raises:
        SlackdistError: an unknown name.
    """
    if name in _DTYPES:
        return _DTYPES[name]
    if name != "auto":
        raise SlackdistError(f"model.dtype={name!r}: expected auto, bf16, fp16 or fp32")
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_attn_implementation(
    name: str, device: torch.device | str, dtype: torch.dtype, *, softcap: bool = False
) -> str:
    """The `attn_implementation` to pass to transformers.

    auto = flash_attention_2 when the flash-attn package is installed and the model runs on
    CUDA in 16-bit, else our registered torch varlen kernel on CUDA (torch >= 2.10), else
    SDPA (CPU, fp32). Both varlen paths keep packed conversations apart with no dense mask;
    SDPA does it with a block mask built from `position_ids`. A model that soft-caps its
    attention logits (`softcap`: Gemma 2) gets eager attention instead of SDPA or varlen,
    which cannot soft-cap (flash-attn 2 can).

    Raises:
        SlackdistError: flash_attention_2 asked for but not installed.
    """
    on_gpu_16bit = torch.device(device).type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    if name == "flash_attention_2":
        if not _flash_attn_installed():
            raise SlackdistError(
                "model.attn_implementation=flash_attention_2: the flash-attn package is not installed"
            )
        return name
    if softcap and not (name == "auto" and on_gpu_16bit and _flash_attn_installed()):
        if name in ("sdpa", "varlen"):
            _warn_once(
                f"model.attn_implementation={name}: this model soft-caps attention logits; using eager"
            )
        return "eager"
    if name in ("sdpa", "eager"):
        return name
    if name == "auto" and on_gpu_16bit and _flash_attn_installed():
        return "flash_attention_2"
    if on_gpu_16bit and varlen_available(device):
        return register_varlen_attention()
    if name == "varlen":
        _warn_once(
            f"varlen attention needs CUDA, 16-bit and torch >= 2.10 (here: {device}, {dtype}); using sdpa"
        )
    return "sdpa"


def _softcaps_attention(name_or_path: str, trust_remote_code: bool) -> bool:
    """Whether the model's config soft-caps attention logits (Gemma 2's `attn_logit_softcapping`)."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return False  # from_pretrained will name the problem
    return getattr(config.get_text_config(), "attn_logit_softcapping", None) is not None


def _flash_attn_installed() -> bool:
    try:  # an optional package: only its presence is asked for
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


LOCAL_MODEL_HINT = "pass --model DIR, a local model folder (e.g. one written by `slackdist real-model DIR`)"


def check_model_source(name_or_path: str, *, need: Literal["model", "tokenizer"] = "model") -> None:
    """Fail fast, in one line, unless `name_or_path` is a model folder or a hub id that can load.

    A local folder must hold config.json (`need="model"`) or a tokenizer file (`need="tokenizer"`); a
    training output or a data folder gets a line saying what it is instead; a missing path is named
    as such; a hub id goes through `slackdist.hub.ensure_hub_repo` (offline, gated, unknown, or cached
    while the hub is unreachable).

    Raises:
        SlackdistError: what is wrong and what to pass instead.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        wanted = ("config.json",) if need == "model" else _TOKENIZER_FILES
        if any((path / name).is_file() for name in wanted):
            return
        raise SlackdistError(f"{name_or_path}: not a model folder ({_what_folder(path)})")
    if path.exists():
        raise SlackdistError(
            f"{name_or_path}: a file, not a model folder (expected a folder with config.json, or a hub id)"
        )
    if looks_like_a_path(name_or_path):
        raise SlackdistError(f"{name_or_path}: no such model folder")
    # A bare name is more often a mistyped folder than one of the hub's few models without an owner.
    subject = f"{name_or_path}: no such folder here, and as a hub id" if "/" not in name_or_path else None
    ensure_hub_repo(name_or_path, "model", local_hint=LOCAL_MODEL_HINT, subject=subject)


def _what_folder(path: Path) -> str:
    """What a folder without config.json is, for the error line."""
    if (path / "adapter_config.json").is_file():
        base = ""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            meta = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
            base = f" {meta.get('base_model_name_or_path')}" if meta.get("base_model_name_or_path") else ""
        return (
            f"a LoRA adapter; its base model is{base or ' in adapter_config.json'}: pass that as --model, "
            "and the adapter folder to chat/eval/merge (--model-dir / --adapter)"
        )
    if any((path / name).is_file() for name in ("train.jsonl", "channels.json", "users.json")):
        return "it holds data, not a model: pass the data with --data, the model with --model"
    return "no config.json; expected a Hugging Face model folder with config.json, weights and tokenizer, or a hub id"


def load_tokenizer(
    name_or_path: str, *, trust_remote_code: bool = False, chat_template: str = "auto"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and give it its family's chat template and a pad token (`ensure_chat_template`).

    Args:
        name_or_path: a model folder or hub id.
        trust_remote_code: allow a tokenizer class from the hub.
        chat_template: `model.chat_template` (`slackdist.model.families`), or the name a model folder's
            `slackdist_inference.json` records.

    Raises:
        SlackdistError: not a model folder or a hub id that can load (`check_model_source`), no loadable
            tokenizer, or a chosen chat template that does not fit it.
    """
    check_model_source(name_or_path, need="tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SlackdistError(f"{name_or_path}: cannot load a tokenizer ({first_line(e)})") from None
    try:
        return ensure_chat_template(
            tokenizer, chat_template, model_type=read_model_type(name_or_path), source=name_or_path
        )
    except ValueError as e:
        raise SlackdistError(f"{name_or_path}: {e}") from None


@functools.cache
def _bnb_4bit_problem(device_type: str) -> str | None:
    """Why 4-bit bitsandbytes cannot run on this device type, or None when it can (probed once)."""
    try:  # optional (the [gpu] extra), and a broken native library raises at import
        import bitsandbytes.functional as bnbf
    except Exception as e:  # ImportError, or a broken native library raising at import
        return f"bitsandbytes is not importable ({first_line(e)})"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        probe = torch.linspace(-1, 1, 128, device=device_type, dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(probe, quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as e:
        return f"bitsandbytes 4-bit does not run on {device_type} ({first_line(e)})"
    return None


def quantization_config(
    model_cfg: ModelConfig, dtype: torch.dtype, *, device: torch.device | str | None = None
) -> BitsAndBytesConfig | None:
    """The BitsAndBytesConfig for QLoRA, or None for an unquantized model.

    NF4 (or fp4) with double quantization as configured, `dtype` as compute dtype and as
    storage dtype of the packed weights (so FSDP shards them with the rest).

    Args:
        model_cfg: the model section; `load_in_4bit=False` gives None.
        dtype: compute dtype (see `resolve_dtype`).
        device: where the model will run (default: CUDA if available, else CPU); 4-bit is
            probed there once.

    Returns:
        The config, or None (with one logged warning) when bitsandbytes cannot run 4-bit on
        the device: the caller then trains an unquantized LoRA.
    """
    if not model_cfg.load_in_4bit:
        return None
    device_type = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    problem = _bnb_4bit_problem(device_type)
    if problem:
        _warn_once(f"4-bit quantization unavailable: {problem}; loading the base unquantized (plain LoRA)")
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def _device_of(device_map: Any) -> torch.device:
    if isinstance(device_map, dict) and len(set(device_map.values())) == 1:
        value = next(iter(device_map.values()))
        return torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    if isinstance(device_map, (str, torch.device)) and str(device_map) not in (
        "auto",
        "balanced",
        "sequential",
    ):
        return torch.device(device_map)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base_model(
    model_cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    device_map: Any = None,
    quantize: bool | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load the base causal LM for training (`use_cache=False`), 4-bit if asked and possible.

    Args:
        model_cfg: base model id or folder, quantization settings, attention choice.
        dtype: compute dtype (`resolve_dtype`).
        device_map: passed to `from_pretrained`; None lets transformers place a 4-bit model
            on the current CUDA device (or CPU) and leaves others on CPU (FSDP, DeepSpeed
            and Accelerate move them).
        quantize: 4-bit NF4 (default: `model_cfg.load_in_4bit`); falls back to unquantized
            with a warning where bitsandbytes cannot run.
        attn_implementation: overrides `model_cfg.attn_implementation` (resolved by
            `resolve_attn_implementation`).

    Returns:
        The model, with every parameter frozen.

    Raises:
        SlackdistError: the model cannot be loaded (named in the message).
    """
    check_model_source(model_cfg.base_model)
    device = _device_of(device_map)
    quantize = model_cfg.load_in_4bit if quantize is None else quantize
    bnb_config = quantization_config(replace(model_cfg, load_in_4bit=quantize), dtype, device=device)
    attn = resolve_attn_implementation(
        attn_implementation or model_cfg.attn_implementation,
        device,
        dtype,
        softcap=_softcaps_attention(model_cfg.base_model, model_cfg.trust_remote_code),
    )
    kwargs: dict[str, Any] = dict(
        dtype=dtype, attn_implementation=attn, trust_remote_code=model_cfg.trust_remote_code
    )
    if device_map is not None:
        kwargs["device_map"] = device_map
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
    try:
        model = AutoModelForCausalLM.from_pretrained(model_cfg.base_model, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise SlackdistError(
            f"{model_cfg.base_model}: cannot load the base model ({first_line(e)})"
        ) from None
    model.config.use_cache = False
    model.requires_grad_(False)
    logger.info(
        "loaded %s: %s, %s, attention %s",
        model_cfg.base_model,
        "4-bit " + model_cfg.bnb_4bit_quant_type if bnb_config is not None else "unquantized",
        str(dtype).removeprefix("torch."),
        attn,
    )
    return model


@contextlib.contextmanager
def quiet_tied_lora_warning() -> Iterator[None]:
    """Silence PEFT's warning about a LoRA on a tied lm_head (a deliberate choice; module docstring),
    and transformers' FutureWarning about `is_gradient_checkpointing`, which PEFT (0.21) reads when it
    wraps a model: it is PEFT's to change, and it showed on the chat screen."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TIED_LORA_WARNING)
        warnings.filterwarnings("ignore", message=_CHECKPOINTING_NAME_WARNING, category=FutureWarning)
        yield


def lora_config(lora_cfg: LoraSettings) -> Any:
    """The PEFT LoraConfig for our settings (r, alpha, dropout, init, target modules)."""
    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        init_lora_weights="gaussian" if lora_cfg.init == "gaussian" else True,
        bias="none",
        task_type="CAUSAL_LM",
    )


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing on every decoder layer, with input grads (idempotent)."""
    if checkpointing_enabled(model):
        return
    model.enable_input_require_grads()
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_checkpointing(model: PreTrainedModel) -> None:
    """Undo `enable_checkpointing` (idempotent)."""
    if not checkpointing_enabled(model):
        return
    if hasattr(model, "activation_checkpointing_disable"):  # transformers >= 5.2 name
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    model.disable_input_require_grads()


def checkpointable_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The decoder layers that activation checkpointing applies to, in order."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_layers(model: PreTrainedModel, count: int) -> None:
    """Checkpoint the first `count` decoder layers; the others keep their activations (0: none).

    Every layer holds the same activations, so which ones recompute does not change the memory
    saved; the memory plan (`slackdist.train.memory`) picks `count`."""
    if count <= 0:
        disable_checkpointing(model)
        return
    enable_checkpointing(model)
    for i, layer in enumerate(checkpointable_layers(model)):
        layer.gradient_checkpointing = i < count


def checkpointing_enabled(model: PreTrainedModel) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):  # transformers >= 5.2 name
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def add_lora(model: PreTrainedModel, lora_cfg: LoraSettings, *, gradient_checkpointing: bool) -> PeftModel:
    """Wrap a (4-bit or plain) base model with trainable LoRA adapters.

    Only the LoRA A/B matrices train; they are fp32 whatever the base dtype. The base stays
    in its compute dtype (no `prepare_model_for_kbit_training` upcast; module docstring).

    Args:
        model: from `load_base_model`.
        lora_cfg: rank, alpha, dropout, init and target modules (default: the seven
            projections and lm_head, also when lm_head is tied to the embeddings; Llama's
            names, mapped to the family's fused modules by `slackdist.model.families.lora_targets`).
        gradient_checkpointing: enable non-reentrant activation checkpointing.

    Returns:
        The PEFT model.

    Raises:
        SlackdistError: none of the target modules exists in the model.
    """
    model.requires_grad_(False)
    model.config.use_cache = False
    if gradient_checkpointing:
        enable_checkpointing(model)
    targets = lora_targets(getattr(model.config, "model_type", None), list(lora_cfg.target_modules))
    if targets != list(lora_cfg.target_modules):
        logger.info("LoRA targets for %s: %s", model.config.model_type, ", ".join(targets))
    try:
        with quiet_tied_lora_warning():
            peft_model = get_peft_model(model, lora_config(replace(lora_cfg, target_modules=targets)))
    except ValueError as e:
        targets = ",".join(lora_cfg.target_modules)
        raise SlackdistError(f"lora.target_modules={targets}: {first_line(e)}") from None
    return peft_model


@dataclass
class InferenceModel:
    """A model ready for generation, with the tokenizer and config it was trained with."""

    model: Any
    """A PeftModel (kind "adapter") or a plain PreTrainedModel (kind "merged"), in eval mode."""
    tokenizer: Any
    """Tokenizer with the chat template (`ensure_chat_template` applied)."""
    kind: Literal["adapter", "merged"]
    """An adapter on a base model, or a merged / full model folder."""
    base: str | None
    """The base model of an adapter; None for merged models."""
    config: Config | None
    """The training config (the folder's slackdist_config.yaml), if it has one."""
    info: ModelInfo
    """How training prompted the model (`ModelInfo.untrained()` for a folder training did not write)."""
    mergeable: bool = False
    """An adapter on a 16-bit base loaded so that `merge_in_memory` can fold it in for fast replies."""
    merged_in_memory: bool = False
    """An adapter folder whose adapter `merge_in_memory` folded into its base (kind "merged")."""

    @property
    def max_seq_len(self) -> int | None:
        """The longest conversation the model was trained on (`train.max_seq_len`), if known."""
        return self.config.train.max_seq_len if self.config is not None else None


def _find_config(folder: Path) -> Config | None:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return load_config(path)
    except ConfigError as e:
        raise SlackdistError(str(e)) from None


def _has_weights(folder: Path) -> bool:
    return any(next(folder.glob(pattern), None) is not None for pattern in _WEIGHT_PATTERNS)


def _adapter_base(folder: Path, base: str | None) -> str:
    if base:
        return base
    try:
        meta = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SlackdistError(f"{folder / 'adapter_config.json'}: unreadable ({first_line(e)})") from None
    found = meta.get("base_model_name_or_path")
    if not found:
        raise SlackdistError(
            f"{folder / 'adapter_config.json'}: no base_model_name_or_path; pass the base model"
        )
    return str(found)


def attach_adapter(model: PreTrainedModel, adapter_dir: str | Path, *, base: str) -> PeftModel:
    """`PeftModel.from_pretrained` for inference, with the adapter checked (`slackdist.model.adapter`).

    Raises:
        SlackdistError: the adapter cannot load onto `base`, lacks tensors, or has zeroed lora_B.
    """
    try:
        with quiet_tied_lora_warning():
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise SlackdistError(
            f"{adapter_dir}: cannot load the adapter onto {base} ({first_line(e)})"
        ) from None
    check_loaded_adapter(model, adapter_dir)  # PEFT only warns about missing tensors
    return model


MergeSetting = Literal["auto", "on", "off"]
# Beyond the 16-bit weights, what replies need: the KV cache, activations, the compiled decode step.
_INFERENCE_HEADROOM = 1.15
_INFERENCE_EXTRA_BYTES = 2 * 2**30


def sixteen_bit_bytes(source: str, *, trust_remote_code: bool = False) -> int:
    """Bytes of the model's weights in 16 bits, counted on the meta device (nothing is loaded)."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return 2 * sum(p.numel() for p in model.parameters())


def plan_adapter_load(
    source: str,
    *,
    device: str,
    load_in_4bit: bool | None,
    merge: MergeSetting,
    trust_remote_code: bool = False,
) -> tuple[bool, bool, str | None]:
    """How to load an adapter folder's base for inference: (4-bit base, merge in memory, a note).

    `merge="auto"` merges on a CUDA GPU with room for the 16-bit base, so replies take the fast
    decode path (a static KV cache and a compiled decode step, which 4-bit layers do not allow);
    otherwise the base loads as `load_in_4bit` says (default: 4-bit on a GPU) and the note says why
    replies are slower.

    Raises:
        SlackdistError: `merge="on"` with `load_in_4bit=True` (an adapter merges only into 16 bits).
    """
    on_gpu = torch.device(device).type == "cuda"
    default_4bit = on_gpu if load_in_4bit is None else load_in_4bit
    if merge == "off":
        return default_4bit, False, None
    if merge == "on":
        if load_in_4bit:
            raise SlackdistError("--merge-adapter on needs a 16-bit base: drop --load-in-4bit")
        return False, True, None
    if not on_gpu or load_in_4bit:
        return default_4bit, False, None
    need = _INFERENCE_HEADROOM * sixteen_bit_bytes(source, trust_remote_code=trust_remote_code)
    need += _INFERENCE_EXTRA_BYTES
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if free >= need:
        return False, True, None
    note = (
        f"4-bit base + adapter: {free / 2**30:.1f} GiB free on {device}, {need / 2**30:.1f} GiB needed to merge "
        "it into a 16-bit base in memory, so replies take the slower plain path"
    )
    return default_4bit, False, note


def load_for_inference(
    model_dir: str,
    *,
    base: str | None = None,
    load_in_4bit: bool | None = None,
    device: str | None = None,
    merge: MergeSetting = "off",
) -> InferenceModel:
    """Load a training output, a checkpoint or a merged model for chat / eval / serve.

    Args:
        model_dir: a folder with `adapter_config.json` + adapter weights (training output
            or `checkpoints/step-N`), or with `config.json` + weights (merged model).
        base: base model of an adapter (default: `base_model_name_or_path` of its config).
        load_in_4bit: 4-bit base (default: yes on GPU, no on CPU).
        device: "cuda", "cuda:1", "cpu"... (default: CUDA if available, else CPU).
        merge: for an adapter folder, load a 16-bit base so that `merge_in_memory` can fold the
            adapter in (`mergeable`): "auto" where a CUDA GPU has room (`plan_adapter_load`), "on",
            or "off".

    Returns:
        The model (eval mode, KV cache on) with its tokenizer, training config and model info.

    Raises:
        SlackdistError: the folder is none of those, or a part of it cannot be loaded.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise SlackdistError(f"{model_dir}: no such model folder")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(device).type == "cuda"
    config = _find_config(folder)
    model_cfg = replace(config.model) if config is not None else ModelConfig()
    dtype = resolve_dtype(model_cfg.dtype if on_gpu else "fp32", device)
    quantize = on_gpu if load_in_4bit is None else load_in_4bit

    is_adapter = (folder / "adapter_config.json").is_file()
    mergeable = False
    if is_adapter:
        if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
            raise SlackdistError(f"{model_dir}: has adapter_config.json but no adapter_model.safetensors")
        source = _adapter_base(folder, base)
        quantize, mergeable, note = plan_adapter_load(
            source,
            device=device,
            load_in_4bit=load_in_4bit,
            merge=merge,
            trust_remote_code=model_cfg.trust_remote_code,
        )
        if note:
            logger.warning("%s", note)
    elif (folder / "config.json").is_file() and _has_weights(folder):
        source = str(folder)
    else:
        raise SlackdistError(
            f"{model_dir}: not a model folder (expected adapter_config.json from `slackdist train`, "
            "or config.json with safetensors weights from `slackdist merge`)"
        )

    has_tokenizer = any((folder / name).is_file() for name in _TOKENIZER_FILES)
    info = read_model_info(folder)
    # The template training used, by the name the folder records (a folder training did not write: auto).
    tokenizer = load_tokenizer(
        str(folder) if has_tokenizer else source,
        trust_remote_code=model_cfg.trust_remote_code,
        chat_template=info.chat_template if info is not None else model_cfg.chat_template,
    )
    model_cfg = replace(model_cfg, base_model=source)
    model = load_base_model(
        model_cfg, dtype=dtype, device_map={"": device}, quantize=quantize, attn_implementation="sdpa"
    )
    if is_adapter:
        model = attach_adapter(model, folder, base=source)
    model.eval()
    model.config.use_cache = True
    return InferenceModel(
        model=model,
        tokenizer=tokenizer,
        kind="adapter" if is_adapter else "merged",
        base=source if is_adapter else None,
        config=config,
        info=info or ModelInfo.untrained(),
        mergeable=mergeable,
    )


def merge_in_memory(im: InferenceModel) -> InferenceModel:
    """`im` with its adapter folded into the 16-bit base (kind "merged"), when `im.mergeable`; else `im`.

    The merged model takes the fast decode path (`slackdist.generate.use_fast_path`); the base model
    alone is no longer available (chat's /compare, eval's base replies come before this).
    """
    if not im.mergeable:
        return im
    model = merge_lora(im.model)
    model.eval()
    model.config.use_cache = True
    return replace(im, model=model, kind="merged", mergeable=False, merged_in_memory=True)
