"""`slackdist tiny-model DIR [--family F]`: a tiny random model of one family for tests and demos.

The default (`llama`) has the features of Llama 3.2 that matter to the training code (tied
embeddings, grouped-query attention, llama3 rope scaling, rope_theta 500000, the Llama 3 special
tokens and chat template) at a size that loads and trains on a CPU in seconds. The other families
are the same size in their own architecture, with a tokenizer built the way the family's is, so
chat formats, tokenization details and LoRA module names are tested on the real code paths:

| family | architecture | tokenizer | tied head | chat template it ships |
|---|---|---|---|---|
| llama | LlamaForCausalLM | byte-level BPE, Llama 3 split | yes | ours (with generation markers) |
| qwen2 | Qwen2ForCausalLM (q/k/v bias) | byte-level BPE, Qwen2 split, no bos | yes | ChatML without markers |
| mistral | MistralForCausalLM | SentencePiece-style BPE, byte fallback, Metaspace "first", [INST] tokens | no | Mistral's, without markers |
| gemma2 | Gemma2ForCausalLM (logit soft-capping) | SentencePiece-style BPE, byte fallback, no prefix space | yes | Gemma's, without markers |
| phi3 | Phi3ForCausalLM (fused qkv / gate_up) | Llama 2 style (prefix "▁" per section), chat tokens that swallow the newline after them | no | Phi-3's, without markers |

Each tokenizer is trained here on a small built-in English + code corpus, so it encodes any text
and needs no download. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from slackdist.errors import SlackdistError
from slackdist.files import check_model_folder, staged_dir
from slackdist.model.chat_formats import CHATML, GEMMA, LLAMA3, MISTRAL, PHI3
from slackdist.model.load import load_tokenizer, quiet_tied_lora_warning
from slackdist.model.template import LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIAL_TOKENS

if TYPE_CHECKING:
    from slackdist.config import Config

BPE_VOCAB_SIZE = 1000
# Llama 3's pre-tokenizer split (tokenizer.json of Meta-Llama-3): contractions, words,
# 1-3 digit numbers, punctuation runs, newlines, spaces.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: the same, but one digit at a time.
QWEN2_SPLIT_PATTERN = LLAMA3_SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

_CORPUS = """\
system: You are a member of the team. user: hi! assistant: Hello, how can I help you today?
Hey team, the deploy to production is done. Let me know if you see anything weird in the dashboards.
Thanks! I'll check the logs after lunch. The error rate went up a little around 3pm yesterday.
Can someone review my pull request? It fixes the flaky test in the billing service.
Sure, I can take a look this afternoon. Is it the one about the timezone bug?
Yes, dates were parsed in local time instead of UTC, so reports after midnight were off by one day.
Good catch. We should add a regression test for that, and maybe a note in the README.
What's the plan for the offsite next month? I heard we're going to the mountains.
We booked a cabin for three days. Bring warm clothes, it gets cold at night.
I can't make it on Friday, but I'll join on Saturday morning.
The meeting is moved to Thursday at 10:30. Please update your calendars.
Does anyone know why the build is failing on the main branch? It worked fine this morning.
It looks like a dependency was updated. Pinning the version should fix it for now.
I opened an issue upstream and linked it in the channel. They already replied with a workaround.
Welcome to the team, Alice! Feel free to ask questions here, nobody bites.
Thank you all, happy to be here. I'm working on the data pipeline first.
Quick question: where do we keep the staging credentials? Not in the repo, I hope.
They live in the secrets manager. Ask Bob for access, he can add you to the right group.
The new dashboard shows latency per endpoint. The slowest one is the search API.
Search is slow because the index is rebuilt on every request. We could cache it for five minutes.
Caching sounds good, but we need to invalidate it when documents change.
Let's write a short design doc and discuss it on Monday.
I finished the migration script. It moved 12,345 rows in 42 seconds without errors.
Great work! Did you run it on a copy of the database first?
Of course. I also checked that the counts match before and after.
Reminder: the conference talk proposals are due on June 1st. Send me your drafts.
I'm thinking about a talk on how we scaled our message queue from 100 to 10,000 events per second.
That would be a great talk. People love real numbers and war stories.
Lunch today? There's a new ramen place around the corner.
Count me in! I've heard their spicy miso ramen is amazing.
The printer on the third floor is broken again. IT says they will fix it tomorrow.
Who's on call this week? The pager went off twice last night.
I am. Both alerts were false alarms from the disk usage monitor; I raised the threshold to 90%.
Please don't push directly to main. Open a pull request, even for small changes.
Noted, sorry about that. It was a one-line typo fix in the docs.
The quarterly report is ready. Revenue grew 15% and churn went down slightly.
Nice! What drove the growth, the new pricing or the enterprise deals?
Mostly enterprise deals. Two large customers signed in March.
I'm out of office tomorrow, back on Wednesday. Ping me on my phone if something is urgent.
Have a good day off! We'll handle the release without you.
The release notes are in the wiki. Version 2.4.0 adds dark mode and faster exports.
Users have been asking for dark mode for years. Finally!
Here is a snippet that reproduces the crash:

```python
import json
from pathlib import Path


def load_config(path: str) -> dict:
    \"\"\"Read a JSON config file and return it as a dict.\"\"\"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if "name" not in data:
        raise ValueError(f"{path}: missing 'name'")
    return data


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def increment(self, step: int = 1) -> int:
        self.value += step
        return self.value


for i in range(10):
    print(i, i * i)

items = [x for x in range(100) if x % 3 == 0]
result = {"total": sum(items), "count": len(items)}
print(Path("out.json").write_text(json.dumps(result, indent=2)))
```

And the shell commands I used:

```bash
git checkout -b fix/timezone
pip install -r requirements.txt
python -m pytest -q tests/
docker build -t app:latest . && docker run --rm -p 8000:8000 app:latest
curl -s http://localhost:8000/health | jq .status
export DATABASE_URL=postgres://user@localhost:5432/app
```

The SQL query that was slow:

```sql
SELECT user_id, COUNT(*) AS n FROM events WHERE created_at > NOW() - INTERVAL '7 days'
GROUP BY user_id ORDER BY n DESC LIMIT 20;
```

JavaScript on the frontend:

```javascript
const fetchUsers = async () => {
  const response = await fetch("/api/users?limit=50");
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return response.json();
};
```

Config looks like this: {"timeout": 30, "retries": 3, "enabled": true, "tags": ["a", "b"]}
Links: https://github.com/example/repo/pull/123 and https://docs.example.com/guide#setup
Emoji reactions: 👍 3, 🎉 2, ❤️ 1, 😂 5. Café, naïve, résumé, Zürich, São Paulo, Москва, 東京.
Numbers and dates: 2016-05-03, 14:25:07, 3.14159, -42, 1e-5, $1,299.99, 100%, #general, @channel.
"""


def tiny_corpus() -> list[str]:
    """The built-in training text of the tiny tokenizer, one string per line."""
    return _CORPUS.splitlines(keepends=True)


def _byte_level_bpe(split_pattern: str, vocab_size: int, corpus: Iterable[str] | None = None) -> Tokenizer:
    """A byte-level BPE (GPT-2 style, as Llama 3 and Qwen2) with this pre-tokenizer split, trained on the corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus() if corpus is None else corpus, trainer=trainer)
    return tok


def _sentencepiece_bpe(first_tokens: tuple[str, ...], vocab_size: int) -> Tokenizer:
    """A SentencePiece-style BPE (as Mistral, Gemma, Phi-3): "▁" for spaces, `first_tokens` (unk, bos, eos,
    ...) as ids 0.., then the 256 byte-fallback tokens `<0x00>`..`<0xFF>`, then the learned pieces.
    Normalizer, pre-tokenizer and decoder are the caller's."""
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    trainer_tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {tok: i for i, tok in enumerate(first_tokens)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=first_tokens[0], byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in first_tokens])
    return tok


# "▁" back to spaces, <0xNN> pieces back to bytes, the first space dropped (Llama 2, Mistral, Phi-3).
_LLAMA2_DECODER = decoders.Sequence(
    [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
)


def _bos_processor(tok: Tokenizer, bos: str) -> processors.TemplateProcessing:
    """Put `bos` in front of plain `tokenizer(text)` calls (the chat template path adds none)."""
    return processors.TemplateProcessing(
        single=f"{bos}:0 $A:0",
        pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tok.token_to_id(bos))],
    )


def _without_generation_markers(template: str) -> str:
    """A family's template as the hub ships it: the same turns, without `{% generation %}` markers."""
    return template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")


def _llama_tokenizer(vocab_size: int, corpus: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    tok = _byte_level_bpe(LLAMA3_SPLIT_PATTERN, vocab_size, corpus)
    tok.add_special_tokens(list(LLAMA3_SPECIAL_TOKENS))
    bos = LLAMA3_SPECIAL_TOKENS[0]
    tok.post_processor = processors.Sequence(
        [processors.ByteLevel(trim_offsets=False), _bos_processor(tok, bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>"
    )
    wrapped.chat_template = LLAMA3_CHAT_TEMPLATE
    return wrapped


def _qwen2_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = _byte_level_bpe(QWEN2_SPLIT_PATTERN, vocab_size)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    wrapped.chat_template = _without_generation_markers(CHATML.template)
    return wrapped


def _mistral_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = _sentencepiece_bpe(("<unk>", "<s>", "</s>"), vocab_size)
    # As Mistral v0.3's tokenizer.json: "▁" in front of the text only at its very start.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = _LLAMA2_DECODER
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("[INST]", "[/INST]")])
    tok.post_processor = _bos_processor(tok, "<s>")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    wrapped.chat_template = _without_generation_markers(MISTRAL.template)
    return wrapped


def _gemma2_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = _sentencepiece_bpe(("<unk>", "<pad>", "<eos>", "<bos>"), vocab_size)
    tok.normalizer = normalizers.Replace(" ", "▁")  # as Gemma's: no "▁" added in front
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    turns = ("<start_of_turn>", "<end_of_turn>")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in turns])
    tok.post_processor = _bos_processor(tok, "<bos>")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    wrapped.chat_template = _without_generation_markers(GEMMA.template)
    return wrapped


def _phi3_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = _sentencepiece_bpe(("<unk>", "<s>", "</s>"), vocab_size)
    # Llama 2's legacy normalizer, as Phi-3's tokenizer.json: every piece of text gets a "▁" in front.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = _LLAMA2_DECODER
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    # Phi-3's chat tokens swallow the whitespace after them (rstrip), so "<|user|>\nHi" is two tokens.
    chat = ("<|assistant|>", "<|system|>", "<|end|>", "<|user|>")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=True) for t in chat])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    wrapped.chat_template = _without_generation_markers(PHI3.template)
    return wrapped


_TOKENIZERS = {
    "llama": _llama_tokenizer,
    "qwen2": _qwen2_tokenizer,
    "mistral": _mistral_tokenizer,
    "gemma2": _gemma2_tokenizer,
    "phi3": _phi3_tokenizer,
}
FAMILIES = tuple(_TOKENIZERS)
"""`--family` values, each an architecture with its family's tokenizer and chat template."""


def build_tiny_tokenizer(
    vocab_size: int = BPE_VOCAB_SIZE, family: str = "llama", corpus: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a BPE on the built-in corpus and wrap it as the family's tokenizer.

    For `llama`: a byte-level BPE with the Llama 3 special tokens after the learned vocabulary (as in
    Llama 3); `bos` is `<|begin_of_text|>` (added in front of plain `tokenizer(text)` calls, not by the
    chat template path), `eos` is `<|eot_id|>`, `pad` is `<|finetune_right_pad_id|>`, and the chat
    template is ours. Other families: see the module docstring.

    Args:
        vocab_size: alphabet plus learned merges (the corpus may give fewer).
        family: one of `FAMILIES`.
        corpus: training text for the `llama` family (default: the built-in corpus); benchmarks train
            on their own data.

    Returns:
        The tokenizer, with its chat template set.

    Raises:
        SlackdistError: an unknown family.
    """
    if family not in _TOKENIZERS:
        raise SlackdistError(f"tiny model: unknown family {family!r} (use one of {', '.join(FAMILIES)})")
    if corpus is not None and family != "llama":
        raise SlackdistError(
            f"tiny model: a training corpus is only supported for the llama family, not {family!r}"
        )
    wrapped = _llama_tokenizer(vocab_size, corpus) if corpus is not None else _TOKENIZERS[family](vocab_size)
    wrapped.clean_up_tokenization_spaces = False
    wrapped.model_max_length = 8192
    return wrapped


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    names |= {"fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise SlackdistError(f"tiny model: unknown dtype {dtype!r} (use fp32, bf16 or fp16)")
    return names[dtype]


def _check_shape(hidden_size: int, layers: int, heads: int, kv_heads: int, intermediate_size: int) -> None:
    problems = []
    if min(hidden_size, layers, heads, kv_heads, intermediate_size) <= 0:
        problems.append("all sizes must be > 0")
    elif hidden_size % heads:
        problems.append(f"hidden size {hidden_size} is not a multiple of heads {heads}")
    elif heads % kv_heads:
        problems.append(f"heads {heads} is not a multiple of kv heads {kv_heads}")
    if problems:
        raise SlackdistError("tiny model: " + "; ".join(problems))


_FORMATS = {"llama": LLAMA3, "qwen2": CHATML, "mistral": MISTRAL, "gemma2": GEMMA, "phi3": PHI3}
"""The chat format each tiny family ships (and stops generation on)."""


def _model_config(
    family: str, tokenizer: PreTrainedTokenizerFast, **shape: int
) -> tuple[PretrainedConfig, GenerationConfig]:
    """The family's architecture config at this shape, and a generation config that stops on its end tokens."""
    vocab_size = -(-len(tokenizer) // 64) * 64  # round up, as real vocabularies are
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    common = dict(vocab_size=vocab_size, rms_norm_eps=1e-5, **shape, **ids)
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    if family == "llama":
        config = LlamaConfig(
            **common,
            max_position_embeddings=131072,  # as Llama 3.2; rope is computed per position, nothing is allocated
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        )
    elif family == "qwen2":  # as Qwen2.5-0.5B/1.5B: tied, biases on q/k/v
        config = Qwen2Config(
            **common,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    elif family == "mistral":  # as Mistral-7B-v0.3: untied, no sliding window
        config = MistralConfig(
            **common,
            head_dim=head_dim,
            max_position_embeddings=32768,
            sliding_window=None,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    elif family == "gemma2":  # as Gemma 2: tied, soft-capped attention and output logits
        config = Gemma2Config(
            **common,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            max_position_embeddings=8192,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        )
    else:  # phi3, as Phi-3-mini: untied, fused qkv_proj and gate_up_proj
        config = Phi3Config(
            **common,
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
    vocab = tokenizer.get_vocab()
    stops = [vocab[t] for t in _FORMATS[family].stop_tokens if t in vocab]
    generation = GenerationConfig(**{**ids, "eos_token_id": stops})
    return config, generation


def write_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    family: str = "llama",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    dtype: torch.dtype | str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Write a tiny random model of one family and its tokenizer with `save_pretrained`.

    `AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)`
    load the result. Saved in fp32 by default so CPU tests compare exactly.

    Args:
        out_dir: folder to write (`save_model_folder`: an earlier model folder there is replaced whole).
        family: one of `FAMILIES` (module docstring).
        hidden_size: model width.
        layers: decoder layers.
        heads: attention heads (must divide hidden_size).
        kv_heads: key/value heads (must divide heads; fewer than heads = GQA).
        intermediate_size: MLP width.
        seed: seed of the random weights.
        dtype: weight dtype to save ("fp32", "bf16", "fp16" or a torch.dtype).
        overwrite: replace `out_dir` even when it is non-empty and not a model folder.

    Returns:
        The output folder.

    Raises:
        SlackdistError: an unknown family, impossible shape or dtype, or an `out_dir` that is not ours.
    """
    _check_shape(hidden_size, layers, heads, kv_heads, intermediate_size)
    check_model_folder(out_dir, overwrite=overwrite)
    torch_dtype = _resolve_dtype(dtype)
    tokenizer = build_tiny_tokenizer(family=family)
    config, generation = _model_config(
        family,
        tokenizer,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(torch_dtype)
    model.generation_config = generation
    return save_model_folder(model, tokenizer, out_dir)


def save_model_folder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike[str]
) -> Path:
    """`save_pretrained` a model and its tokenizer into a temporary folder next to `out_dir`, then put it
    in place by one rename (`slackdist.files.staged_dir`: an existing folder is replaced whole; an
    error or interrupt leaves it as it was and no temporary folder behind)."""
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def random_lora_adapter(
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    targets: Iterable[str],
    seed: int = 0,
    ensure_weight_tying: bool = False,
) -> Path:
    """A LoRA adapter (r 4) on `targets` of the model in `model_dir` with random non-zero A and B, saved as
    `slackdist train` leaves one (adapter + tokenizer): merging it changes every targeted weight, which
    tests and benchmarks of merge and export need (a fresh LoRA's B is zero and changes nothing)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), ensure_weight_tying=ensure_weight_tying
    )
    with quiet_tied_lora_warning():
        peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(out, save_embedding_layers=False)
    load_tokenizer(str(model_dir)).save_pretrained(out)
    return Path(out)


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist tiny-model DIR [--family F] [--hidden-size ...]`."""
    out = write_tiny_model(
        args.output,
        family=args.family,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"tiny model written to {out}")
    return 0
