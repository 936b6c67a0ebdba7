"""One typed config tree for every slackdist command.

Each section is a dataclass whose fields carry their help text. A YAML file
(``--config FILE``, top-level keys = section names) fills the tree, then CLI
flags override it. Every CLI flag is generated from these fields, so
``slackdist <command> --help`` lists each option with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from slackdist.errors import first_line


class ConfigError(ValueError):
    """Raised with every problem found in a config, one per line."""


def opt(default: Any, help: str, *, flag: str | None = None, factory: Any = None) -> Any:
    """A config field with its help text (and an optional CLI flag name)."""
    meta = {"help": help}
    if flag:
        meta["flag"] = flag
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


DEFAULT_SYSTEM_PROMPT = (
    "You are a member of the {workspace} Slack workspace. You talk like the team and know what the team "
    "knows. This conversation is from #{channel}."
)
PERSONA_SYSTEM_PROMPT = (
    "You are {persona}, a member of the {workspace} Slack workspace. Answer as {persona} would. "
    "This conversation is from #{channel}."
)

DEFAULT_BASE_MODEL = "meta-llama/Llama-3.2-3B-Instruct"
MAX_SEQ_LEN = 2048
"""The longest conversation, in tokens: `train.max_seq_len`, which `data.max_tokens` follows."""
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@dataclass
class DataConfig:
    """How a Slack export becomes chat records (`slackdist prepare`)."""

    include_dms: bool = opt(False, "Include direct messages and group DMs (private; off by default).")
    include_private: bool = opt(False, "Include private channels (groups.json; private, off by default).")
    include_bots: bool = opt(
        False,
        "Keep bot, app and agent messages as speakers under their bot name (integration feed posts, "
        "cards without text of their own, only in channels named with --channels).",
    )
    channels: list[str] = opt(None, "Only these channels (names, comma-separated).", factory=list)
    exclude_channels: list[str] = opt(
        None, "Leave out these channels (names, comma-separated).", factory=list
    )
    persona: str | None = opt(
        None,
        "Persona mode: these people's turns become the assistant (names, display names or user ids, "
        "comma-separated; with several, assistant turns keep the speaker's name).",
        flag="as",
    )
    exclude_users: list[str] = opt(
        None,
        "Leave these people out entirely: their messages, mentions of them (@someone), their names and "
        "quoted text (display, real or user names, user ids or e-mails from users.json; comma-separated).",
        factory=list,
    )
    only_users: list[str] = opt(
        None,
        "Opt-in workspace: keep only these people; everyone else is left out as with --exclude-users.",
        factory=list,
    )
    roles: Literal["alternate", "persona"] = opt(
        "alternate", "Role assignment: alternate user/assistant, or persona (needs --as)."
    )
    gap_hours: float = opt(2.0, "Messages outside threads split into a new conversation after this gap.")
    min_turns: int = opt(2, "Keep conversations with at least this many turns (from at least 2 speakers).")
    max_turns: int = opt(40, "Split conversations longer than this into overlapping windows.")
    max_tokens: int = opt(
        MAX_SEQ_LEN,
        "Token budget of one conversation (with --tokenizer, measured by it); unless set, train.max_seq_len.",
    )
    window_overlap: int = opt(4, "Turns shared by consecutive windows when a conversation is split.")
    tokenizer: str | None = opt(
        None, "Tokenizer (hub id or dir) for the token budget; else ~4 chars a token."
    )
    split: str = opt("90,5,5", "Train,validation,test percentages.")
    split_by: Literal["hash", "time"] = opt(
        "hash", "Split by a stable hash of the conversation id, or by time."
    )
    speaker_names: bool = opt(True, "Prefix each turn with the speaker's name ('Jane: ...').")
    keep_emails: bool = opt(False, "Keep email addresses (default: replaced by [EMAIL]).")
    keep_phones: bool = opt(False, "Keep phone numbers (default: replaced by [PHONE]).")
    emoji_unicode: bool = opt(True, "Turn :emoji: short names into Unicode where one exists.")
    reactions: bool = opt(True, "Append reactions as a line '[reactions: 👍 3]'.")
    min_reaction_count: int = opt(1, "Keep a reaction when at least this many people used it.")
    workspace: str = opt("", "Workspace name for the system prompt (default: the export's folder name).")
    system_prompt: str = opt(
        DEFAULT_SYSTEM_PROMPT, "System prompt template ({workspace}, {channel}, {persona} are filled in)."
    )
    preview: int = opt(3, "Show this many conversations in report.md.")
    dry_run: bool = opt(False, "Write the report only (to stdout); no dataset files.")
    strict: bool = opt(False, "Turn warnings (skipped files, unknown users) into errors.")
    seed: int = opt(0, "Seed of the hash split.")
    workers: int = opt(
        0, "Processes that read and clean channels in parallel (0: one per CPU core, 1: serial)."
    )
    canaries: int = opt(
        0,
        "Plant N random canaries (secret- and sentence-shaped) after redaction, each in a copy of a training "
        "conversation, for `slackdist audit`; DIR/canaries.json lists them (keep it apart from the data).",
    )
    canaries_redacted: int = opt(
        0,
        "Plant N real-format secrets before redaction, each in a copy of a training conversation: the "
        "redactor removes them, and `slackdist audit` checks the model did not learn them anyway.",
    )
    canary_turns: Literal["assistant", "user", "both"] = opt(
        "assistant", "Which turns hold the canaries (user turns carry no loss with train_on=assistant)."
    )


@dataclass
class ModelConfig:
    """Which base model and how it is loaded."""

    base_model: str = opt(DEFAULT_BASE_MODEL, "Base model: hub id or local directory.", flag="model")
    load_in_4bit: bool = opt(True, "QLoRA: 4-bit NF4 base weights (bitsandbytes).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit quantization type.")
    bnb_4bit_use_double_quant: bool = opt(True, "Quantize the quantization constants too.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "Compute dtype: auto = bf16 where supported, else fp16 on GPU, fp32 on CPU."
    )
    attn_implementation: Literal["auto", "varlen", "flash_attention_2", "sdpa", "eager"] = opt(
        "auto", "Attention: auto = flash-attn 2 if installed, else torch varlen on GPU, else SDPA."
    )
    trust_remote_code: bool = opt(False, "Allow custom model code from the hub.")
    chat_template: Literal["auto", "llama3", "chatml", "mistral", "gemma", "phi3", "tokenizer"] = opt(
        "auto",
        "Chat format: auto = the tokenizer's own if it marks assistant tokens, else the model family's "
        "(config.json model_type); tokenizer = the tokenizer's own (needs {% generation %} markers).",
    )


@dataclass
class LoraSettings:
    """The LoRA adapter."""

    r: int = opt(64, "LoRA rank.", flag="lora-r")
    alpha: int = opt(128, "LoRA alpha (scale = alpha / r).", flag="lora-alpha")
    dropout: float = opt(0.05, "LoRA dropout.", flag="lora-dropout")
    init: Literal["gaussian", "default"] = opt(
        "gaussian", "LoRA A init (B starts at zero).", flag="lora-init"
    )
    share_inputs: bool = opt(
        True,
        "Projections that read one input (q/k/v, gate/up) share one dropout mask and one stacked A matmul "
        "(Llama, Mistral, Mixtral, Qwen2/3, Gemma families; unsharded runs); off: PEFT's forward, a mask per "
        "projection.",
        flag="lora-share-inputs",
    )
    target_modules: list[str] = opt(
        None,
        "Modules that get an adapter (comma-separated).",
        flag="lora-targets",
        factory=lambda: list(LORA_TARGETS),
    )


@dataclass
class TrainConfig:
    """The training loop (`slackdist train`)."""

    data_dir: str = opt(
        "data/prepared",
        "Chat records with a 'messages' column: a folder from `prepare`, a .jsonl/.json/.parquet file, a "
        "save_to_disk folder or a hub dataset id (read with Hugging Face datasets, tokenized once and cached).",
        flag="data",
    )
    train_split: str = opt("train", "Split of --data to train on (a single file is the split 'train').")
    validation_split: str = opt(
        "validation",
        "Split of --data to evaluate on; if --data has none, validation_fraction of train is used.",
    )
    validation_fraction: float = opt(
        0.05,
        "Where --data has no validation split: this share of the training records is held out for "
        "validation, chosen by seed (0: no validation).",
    )
    output_dir: str = opt(
        "llama3_slack_finetuned", "Where the adapter, checkpoints and logs go.", flag="output"
    )
    max_seq_len: int = opt(
        MAX_SEQ_LEN,
        "Tokens per packed row: the longest conversation training keeps (and chat's context by default).",
    )
    micro_batch_size: int = opt(2, "Packed rows per device per forward.")
    gradient_accumulation_steps: int = opt(2, "Micro-batches per optimizer step.")
    packing: bool = opt(True, "Pack several conversations per row (no attention across them).")
    train_on: Literal["assistant", "all"] = opt("assistant", "Which tokens carry the loss.")
    learning_rate: float = opt(2e-4, "Peak learning rate.", flag="lr")
    lr_scheduler: Literal["cosine", "linear", "constant"] = opt("cosine", "Schedule after warmup.")
    warmup_ratio: float = opt(0.1, "Fraction of steps spent warming up.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(0.3, "Gradient-norm clipping.")
    optimizer: Literal["paged_adamw_32bit", "adamw_torch_fused", "adamw_torch"] = opt(
        "paged_adamw_32bit", "Optimizer (paged AdamW needs bitsandbytes; falls back to torch AdamW)."
    )
    num_epochs: int = opt(3, "Passes over the training data.")
    max_steps: int = opt(-1, "Stop after this many optimizer steps (-1: run all epochs).")
    gradient_checkpointing: bool = opt(
        True, "Recompute activations in backward (non-reentrant); with memory_plan=auto, the fallback."
    )
    memory_plan: Literal["auto", "fixed"] = opt(
        "auto",
        "auto: on one GPU (not FSDP/DeepSpeed), measure activation memory at start and pick the fastest split of "
        "each step (rows per forward, checkpointed layers) that fits memory_budget_gib; fixed: as set.",
    )
    memory_budget_gib: float = opt(
        0.0,
        "Peak GPU memory the auto plan aims under (0: 70% of the GPU, e.g. 15.6 GiB of a 24 GB card); "
        "set e.g. 16 to keep a big GPU's run that small.",
    )
    max_memory_gib: float = opt(
        0.0,
        "GPU memory this process may allocate at all (0: the whole GPU); the auto plan plans within it.",
    )
    memory_plan_cache: bool = opt(
        True,
        "Reuse the memory probe's figures measured earlier for the same model, FP8 use, LoRA, GPU and libraries "
        "(kept in ~/.cache/slackdist; SLACKDIST_CACHE_DIR moves it).",
    )
    compile: Literal["auto", "on", "off"] = opt(
        "auto",
        "torch.compile each decoder layer (auto: on one unsharded CUDA GPU, for runs of at least "
        "compile_min_steps steps).",
    )
    compile_min_steps: int = opt(
        160,
        "With compile=auto, compile only runs planned for at least this many optimizer steps: compiling "
        "costs a fixed start-up time that only enough faster steps repay (on an H100 at 3B, 27 s from a cold "
        "cache against 0.17 s saved a step with FP8: bench/time_to_model.py).",
    )
    fp8_matmul: Literal["auto", "on", "off"] = opt(
        "auto",
        "Run the frozen base projections' matmuls in FP8 (e4m3, per-token and per-row scales; the adapters "
        "stay bf16). auto: in compiled runs on a GPU with FP8 tensor cores (H100, L4, RTX 40xx); on: also "
        "eager and on CPU (slower).",
    )
    loss_chunk_size: int = opt(1024, "Compute lm_head + loss in chunks of this many tokens (0: all at once).")
    eval_every_n_steps: int = opt(50, "Evaluate on validation.jsonl every N steps (0: per epoch only).")
    eval_max_batches: int = opt(0, "Cap on eval batches (0: the whole split).")
    early_stopping_patience: int = opt(3, "Stop after this many evals without improvement (0: never).")
    early_stopping_min_delta: float = opt(0.0, "Smallest eval-loss drop that counts as improvement.")
    save_every_n_steps: int = opt(100, "Checkpoint every N steps (0: only at the end).")
    keep_last_n_checkpoints: int = opt(3, "Checkpoints to keep (the best one is kept as well).")
    log_every_n_steps: int = opt(1, "Log metrics every N steps.")
    clear_cache_between_epochs: bool = opt(True, "gc.collect() + torch.cuda.empty_cache() after each epoch.")
    max_shard_size: str = opt("2GB", "Largest safetensors shard in saved models.")
    merge_after_training: bool = opt(False, "Also write a merged 16-bit model to OUTPUT/merged.")
    resume: str | None = opt(None, "'auto' (newest checkpoint in OUTPUT) or a checkpoint path.")
    seed: int = opt(42, "Seed for init, shuffling and dropout.")


@dataclass
class ChatConfig:
    """Generation settings (`chat`, `eval`, `serve`)."""

    model_dir: str = opt("llama3_slack_finetuned", "Adapter, checkpoint or merged model folder.")
    base: str | None = opt(None, "Base model for an adapter (default: from adapter_config.json).")
    system: str | None = opt(None, "System prompt (default: the training one for #general).")
    persona: str | None = opt(None, "Answer as this person (persona-trained models).", flag="as")
    temperature: float = opt(0.7, "Sampling temperature (0: greedy).")
    top_p: float = opt(0.9, "Nucleus sampling.")
    max_new_tokens: int = opt(256, "Longest reply.")
    repetition_penalty: float = opt(1.1, "Repetition penalty.")
    seed: int | None = opt(None, "Seed for sampling.")
    load_in_4bit: bool | None = opt(None, "Load the base in 4-bit (default: on GPU yes, on CPU no).")
    merge_adapter: Literal["auto", "on", "off"] = opt(
        "auto",
        "Adapter folders: fold the adapter into a 16-bit base in memory so replies take the fast decode path "
        "(auto: on a CUDA GPU with room for the 16-bit base, else the 4-bit base + adapter).",
    )
    max_context_tokens: int = opt(
        0,
        "Prompt + reply token budget; older turns are dropped to fit (0: the model's train.max_seq_len, "
        "4096 for a model trained elsewhere; never beyond the model's limit).",
    )


@dataclass
class ServeConfig:
    """The OpenAI-compatible server (`slackdist serve`)."""

    host: str = opt("127.0.0.1", "Address to listen on.")
    port: int = opt(8000, "Port to listen on.")
    model_name: str = opt("slackdist", "Model id reported by /v1/models.")
    api_key: str | None = opt(
        None,
        "Require 'Authorization: Bearer KEY' on every path but /health (default: $SLACKDIST_API_KEY; "
        "prefer the variable, flags show in `ps`).",
    )
    allowed_hosts: list[str] = opt(
        None,
        "Host header names to answer besides localhost, 127.0.0.1 and ::1 ('*': any). Default: only "
        "those when --host is a loopback address, else any.",
        factory=list,
    )
    max_request_bytes: int = opt(4 * 2**20, "Largest request body; a larger one gets 413 unread.")

    def problems(self) -> list[str]:
        """What is wrong with this section, one line per key."""
        out = []
        if not 0 <= self.port <= 65535:
            out.append(f"serve.port={self.port}: must be in [0, 65535]")
        if self.api_key is not None and not self.api_key.strip():
            out.append("serve.api_key: must not be empty (leave it out for no key)")
        if self.max_request_bytes < 1024:
            out.append(f"serve.max_request_bytes={self.max_request_bytes}: must be >= 1024")
        return out


@dataclass
class ExportConfig:
    """`slackdist export`: a merged model or training output as a GGUF file for llama.cpp / Ollama."""

    model_dir: str = opt(
        "llama3_slack_finetuned", "Merged model folder, or a training output (merged in a temp folder first)."
    )
    format: Literal["gguf"] = opt("gguf", "Output format.")
    quant: Literal["f32", "f16", "bf16", "q8_0"] = opt(
        "q8_0", "Weight type of the 2-D tensors (norms and 1-D tensors stay f32)."
    )
    out: str = opt("", "A .gguf file, or a folder for NAME-QUANT.gguf + Modelfile (empty: MODEL_DIR/gguf).")
    system: str | None = opt(None, "Modelfile SYSTEM prompt (default: the training one for #general).")
    base: str | None = opt(None, "Base model of a training output (default: from adapter_config.json).")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> None:
        """Check every section; raise one ConfigError listing all problems.

        Raises:
            ConfigError: one line per bad key, with the value and a fix.
        """
        raise_problems(self.problems())

    def problems(self) -> list[str]:
        """What is wrong with the values, one line per key (empty when nothing is)."""
        problems = []
        d, t = self.data, self.train
        try:
            parts = split_fractions(d.split)
        except ValueError as e:
            problems.append(f"data.split={d.split!r}: {e}")
            parts = None
        if parts is not None and parts[0] <= 0:
            problems.append(f"data.split={d.split!r}: the train share must be > 0")
        if d.roles == "persona" and not d.persona:
            problems.append("data.roles='persona' needs data.persona (--as NAME)")
        if d.gap_hours <= 0:
            problems.append(f"data.gap_hours={d.gap_hours}: must be > 0")
        if d.min_turns < 2:
            problems.append(f"data.min_turns={d.min_turns}: must be >= 2")
        if d.max_turns < d.min_turns:
            problems.append(f"data.max_turns={d.max_turns}: must be >= data.min_turns ({d.min_turns})")
        if not 0 <= d.window_overlap < d.max_turns:
            problems.append(f"data.window_overlap={d.window_overlap}: must be in [0, max_turns)")
        for key in ("max_tokens",):
            if getattr(d, key) <= 0:
                problems.append(f"data.{key}: must be > 0")
        for key in ("canaries", "canaries_redacted"):
            if getattr(d, key) < 0:
                problems.append(f"data.{key}={getattr(d, key)}: must be >= 0")
        for key in ("max_seq_len", "micro_batch_size", "gradient_accumulation_steps", "num_epochs"):
            if getattr(t, key) <= 0:
                problems.append(f"train.{key}={getattr(t, key)}: must be > 0")
        if t.max_memory_gib < 0:
            problems.append(f"train.max_memory_gib={t.max_memory_gib}: must be >= 0 (0: the whole GPU)")
        if t.memory_budget_gib < 0:
            problems.append(
                f"train.memory_budget_gib={t.memory_budget_gib}: must be >= 0 (0: 70% of the GPU)"
            )
        if t.learning_rate <= 0:
            problems.append(f"train.learning_rate={t.learning_rate}: must be > 0")
        if not 0 <= t.validation_fraction < 1:
            problems.append(f"train.validation_fraction={t.validation_fraction}: must be in [0, 1)")
        if not 0 <= t.warmup_ratio < 1:
            problems.append(f"train.warmup_ratio={t.warmup_ratio}: must be in [0, 1)")
        if t.max_grad_norm <= 0:
            problems.append(f"train.max_grad_norm={t.max_grad_norm}: must be > 0")
        if t.keep_last_n_checkpoints < 1:
            problems.append(f"train.keep_last_n_checkpoints={t.keep_last_n_checkpoints}: must be >= 1")
        if self.lora.r <= 0:
            problems.append(f"lora.r={self.lora.r}: must be > 0")
        if not 0 <= self.lora.dropout < 1:
            problems.append(f"lora.dropout={self.lora.dropout}: must be in [0, 1)")
        problems += self.serve.problems()
        return problems


def raise_problems(problems: list[str]) -> None:
    """Raise one ConfigError listing every problem, one per line (nothing when the list is empty).

    Raises:
        ConfigError: problems were found.
    """
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def split_fractions(spec: str) -> tuple[float, float, float]:
    """'90,5,5' -> (0.9, 0.05, 0.05).

    Raises:
        ValueError: not three non-negative numbers summing to 100.
    """
    try:
        parts = [float(p) for p in spec.split(",")]
    except ValueError:
        raise ValueError("expected three numbers like 90,5,5") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 100) > 1e-6:
        raise ValueError("expected three non-negative percentages summing to 100, like 90,5,5")
    return parts[0] / 100, parts[1] / 100, parts[2] / 100


# ---------------------------------------------------------------- YAML and CLI


def _field_type(tp: Any) -> tuple[Any, bool]:
    """Return (base type, is_list) of a field annotation, dropping Optional."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _field_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _coerce(section: str, name: str, tp: Any, value: Any) -> Any:
    base, is_list = _field_type(tp)
    if value is None:
        return None
    if is_list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return [str(v) for v in value]
    if typing.get_origin(base) is Literal:
        if value not in typing.get_args(base):
            choices = ", ".join(map(str, typing.get_args(base)))
            raise ConfigError(f"{section}.{name}={value!r}: expected one of {choices}")
        return value
    if base is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{section}.{name}={value!r}: expected true or false")
        return bool(value)
    try:
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{section}.{name}={value!r}: expected {base.__name__}") from None


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_overrides(
    cfg: Config, values: dict[str, Any], source: str, problems: list[str] | None = None
) -> None:
    """Set dotted keys ``{"train.lr": ...}`` or nested dicts on cfg.

    Args:
        cfg: the config to change.
        values: dotted keys, or sections with their keys.
        source: where the values come from (a file name, "command line"), for messages.
        problems: collect every unknown key and bad value here instead of raising at the first.

    Raises:
        ConfigError: unknown section or key, or a value of the wrong type (when `problems` is None).
    """
    found: list[str] = [] if problems is None else problems
    for key, value in values.items():
        section, _, name = key.partition(".")
        if not name and isinstance(value, dict):
            apply_overrides(cfg, {f"{section}.{k}": v for k, v in value.items()}, source, found)
            continue
        if not hasattr(cfg, section) or not dataclasses.is_dataclass(getattr(cfg, section)):
            sections = ", ".join(f.name for f in dataclasses.fields(Config))
            found.append(f"{source}: unknown section {section!r} (sections: {sections})")
            continue
        obj = getattr(cfg, section)
        hints = _resolved_hints(type(obj))
        if name not in hints:
            found.append(f"{source}: unknown key {key!r}{_did_you_mean(section, name, type(obj))}")
            continue
        try:
            setattr(obj, name, _coerce(section, name, hints[name], value))
        except ConfigError as e:
            found.append(f"{source}: {e}")
    if problems is None and found:
        raise ConfigError(found[0] if len(found) == 1 else "invalid config:\n  " + "\n  ".join(found))


def _did_you_mean(section: str, name: str, cls: type) -> str:
    """' (did you mean train.learning_rate?)' for a near miss of a key or its CLI flag (lr), else ''."""
    names = {}
    for f in dataclasses.fields(cls):
        names[f.name] = f.name
        names[f.metadata.get("flag", f.name).replace("-", "_")] = f.name
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f" (did you mean {section}.{names[close[0]]}?)" if close else ""


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file, then overrides (dotted keys).

    Raises:
        ConfigError: unreadable YAML, unknown keys, bad values.
    """
    cfg = Config()
    given: set[str] = set()
    problems: list[str] = []
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({first_line(e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data:, train:, ...)")
        apply_overrides(cfg, raw, str(path), problems)
        given |= _dotted_keys(raw)
    if overrides:
        apply_overrides(cfg, overrides, "command line", problems)
        given |= _dotted_keys(overrides)
    if "data.max_tokens" not in given:
        # One length: the conversations `prepare` writes are the ones training can keep.
        cfg.data.max_tokens = cfg.train.max_seq_len
    if problems:  # every bad key at once, and what is wrong with the values that did apply
        raise_problems(problems + cfg.problems())
    return cfg


def _dotted_keys(values: dict[str, Any]) -> set[str]:
    """`{"train": {"lr": 1}, "data.seed": 2}` -> {"train.lr", "data.seed"}."""
    keys = set()
    for key, value in values.items():
        if "." not in key and isinstance(value, dict):
            keys |= {f"{key}.{name}" for name in value}
        else:
            keys.add(key)
    return keys


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(
        yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8"
    )


def add_section_args(parser: argparse.ArgumentParser, section: str, skip: tuple[str, ...] = ()) -> None:
    """Add one CLI flag per field of a config section, defaults shown from the dataclass."""
    cls = type(getattr(Config(), section))
    hints = _resolved_hints(cls)
    defaults = cls()
    group = parser.add_argument_group(f"{section} options")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.metadata.get("flag", f.name.replace("_", "-"))
        default = getattr(defaults, f.name)
        base, is_list = _field_type(hints[f.name])
        choices = list(typing.get_args(base)) if typing.get_origin(base) is Literal else None
        allowed = f"one of: {', '.join(choices)}; " if choices else ""
        help_text = f"{f.metadata['help']} ({allowed}default: {default!r})".replace("%", "%%")
        kwargs: dict[str, Any] = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS, help=help_text)
        if base is bool:
            parser_action = argparse.BooleanOptionalAction
            group.add_argument(flag, action=parser_action, **kwargs)
            continue
        if choices:
            kwargs["choices"] = choices
        kwargs["metavar"] = f.name.upper() if not is_list else "A,B,..."
        group.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the config from ``--config`` plus every section flag that was given."""
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        overrides[key] = yaml.safe_load(value)
    cfg = load_config(getattr(args, "config", None), overrides)
    cfg.validate()
    return cfg
