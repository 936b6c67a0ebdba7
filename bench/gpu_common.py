"""What every GPU benchmark needs: a Llama-3.2-3B-shaped model and chat data of the peer's lengths.

No weights can be downloaded on the GPU machine, so the model is built from its config with
random init and saved to disk, then loaded through `from_pretrained` like a user's checkpoint
(throughput and memory do not depend on the weights' values). Its tokenizer is a word-level
vocabulary `t0 ... t128255` with the Llama 3 special tokens at their real ids, so a record whose
content is "t17 t9001 ..." tokenizes to exactly one token per word and our real chat template
and assistant masks apply unchanged. The lengths follow the peer script's distribution
(`../shared/gpu/peer_trl_qlora.py`: lognormal(5.3, 0.8) tokens, clipped to 24..2000).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

L32_3B = dict(
    vocab_size=128256,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=128009,
    pad_token_id=128004,
)
# Llama 3's reserved ids for the tokens our chat template uses.
SPECIAL_IDS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|finetune_right_pad_id|>": 128004,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eot_id|>": 128009,
}


def build_tokenizer(vocab_size: int = L32_3B["vocab_size"]):
    """Word-level tokenizer over `t<i>` words with the Llama 3 special tokens at their ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from slackdist.model.template import LLAMA3_CHAT_TEMPLATE

    by_id = {i: f"t{i}" for i in range(vocab_size)}
    for token, i in SPECIAL_IDS.items():
        by_id[i] = token
    tok = Tokenizer(models.WordLevel({t: i for i, t in by_id.items()}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_IDS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    return fast


def build_model_dir(path: str | Path, *, layers: int | None = None, tokenizer=None) -> Path:
    """Random-init Llama-3.2-3B shape in bf16 + a tokenizer (default: `build_tokenizer()`), saved once.

    With another tokenizer, the config's bos / eos / pad ids are that tokenizer's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        shape = dict(L32_3B, num_hidden_layers=layers or L32_3B["num_hidden_layers"])
        if tokenizer is not None:
            ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
            shape.update(zip(("bos_token_id", "eos_token_id", "pad_token_id"), ids, strict=True))
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not (path / "tokenizer.json").exists():
        (tokenizer or build_tokenizer()).save_pretrained(path)
    return path


def conversation_length(rng: random.Random) -> int:
    """The peer script's chat-like length distribution (median ~200 tokens, long tail)."""
    return min(2000, max(24, int(rng.lognormvariate(5.3, 0.8))))


def synthetic_record(rng: random.Random, total_tokens: int, vocab: int | None = None) -> dict:
    """A chat record of about `total_tokens` tokens: a system line, then user/assistant turns.

    With `vocab`, words come from `vocab` words with Zipf frequencies and each assistant turn opens by
    repeating the start of the user turn before it: text a model can learn within a few dozen steps
    (the quality comparison needs a loss that moves). Without it, uniform random words (the
    throughput runs: the peer's data).
    """
    if vocab:
        weights = [1 / (k + 1) for k in range(vocab)]
        pick = lambda n: rng.choices(range(1000, 1000 + vocab), weights, k=n)  # noqa: E731
    else:
        pick = lambda n: [rng.randrange(1000, 120000) for _ in range(n)]  # noqa: E731
    words = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    messages = [{"role": "system", "content": words(pick(12))}]
    left = max(8, total_tokens - 20)
    role, previous = "user", []
    while left > 0:
        n = min(left, max(4, int(rng.expovariate(1 / 60))))
        ids = pick(n)
        if vocab and role == "assistant":
            ids = (previous[:8] + ids)[:n]
        messages.append({"role": role, "content": words(ids)})
        previous = ids
        left -= n + 5  # each turn adds a 5-token header + eot
        role = "assistant" if role == "user" else "user"
    if messages[-1]["role"] == "user":
        messages.append({"role": "assistant", "content": words((previous[:8] if vocab else []) + pick(8))})
    return {"messages": messages, "meta": {"conversation_id": f"synthetic-{rng.random():.12f}"}}


def write_dataset(
    out_dir: str | Path, *, train: int = 4000, validation: int = 64, seed: int = 0, vocab: int | None = None
) -> Path:
    """train.jsonl / validation.jsonl / test.jsonl of synthetic records (once); `vocab`: see synthetic_record."""
    out_dir = Path(out_dir)
    if (out_dir / "train.jsonl").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, n in (("train", train), ("validation", validation), ("test", validation)):
        tmp = out_dir / f".{name}.jsonl.tmp"
        with tmp.open("w") as f:
            for _ in range(n):
                f.write(json.dumps(synthetic_record(rng, conversation_length(rng), vocab)) + "\n")
        os.replace(tmp, out_dir / f"{name}.jsonl")
    return out_dir


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peer_env(pythonpath: str | None) -> dict[str, str] | None:
    """A peer script's environment: ours, with `pythonpath` (its own packages) as PYTHONPATH when given."""
    return dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
