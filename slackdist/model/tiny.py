"""`slackdist tiny-model DIR`: a tiny random Llama-3-architecture model for tests and demos.

The model has the features of Llama 3.2 that matter to the training code (tied
embeddings, grouped-query attention, llama3 rope scaling, rope_theta 500000, the Llama
3 special tokens and chat template) at a size that loads and trains on a CPU in
seconds. The tokenizer is a byte-level BPE (Llama 3's pre-tokenizer regex) trained
here on a small built-in English + code corpus, so it encodes any text and needs no
download. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slackdist.errors import SlackdistError
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


def build_tiny_tokenizer(
    vocab_size: int = BPE_VOCAB_SIZE, corpus: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the built-in corpus and wrap it as a Llama 3 style tokenizer.

    The Llama 3 special tokens come after the learned vocabulary (as in Llama 3);
    `bos` is `<|begin_of_text|>` (added in front of plain `tokenizer(text)` calls, not by
    the chat template path), `eos` is `<|eot_id|>`, `pad` is `<|finetune_right_pad_id|>`.

    Args:
        vocab_size: byte alphabet plus learned merges (the corpus may give fewer).
        corpus: training text (default: the built-in corpus); benchmarks train on their data.

    Returns:
        The tokenizer, with `LLAMA3_CHAT_TEMPLATE` set.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
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
    tok.add_special_tokens(list(LLAMA3_SPECIAL_TOKENS))
    bos = LLAMA3_SPECIAL_TOKENS[0]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, tok.token_to_id(bos))],
            ),
        ]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    wrapped.chat_template = LLAMA3_CHAT_TEMPLATE
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


def _install_dir(tmp: Path, out: Path) -> None:
    """Move a finished temp folder into place: whole folder if `out` is new, else file by file."""
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    for item in tmp.iterdir():
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()


def write_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    dtype: torch.dtype | str = "fp32",
) -> Path:
    """Write a tiny random LlamaForCausalLM and its tokenizer with `save_pretrained`.

    `AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)`
    load the result. Saved in fp32 by default so CPU tests compare exactly.

    Args:
        out_dir: folder to write (created; existing files of the same name are replaced).
        hidden_size: model width.
        layers: decoder layers.
        heads: attention heads (must divide hidden_size).
        kv_heads: key/value heads (must divide heads; fewer than heads = GQA).
        intermediate_size: MLP width.
        seed: seed of the random weights.
        dtype: weight dtype to save ("fp32", "bf16", "fp16" or a torch.dtype).

    Returns:
        The output folder.

    Raises:
        SlackdistError: impossible shape or dtype.
    """
    _check_shape(hidden_size, layers, heads, kv_heads, intermediate_size)
    torch_dtype = _resolve_dtype(dtype)
    tokenizer = build_tiny_tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in LLAMA3_SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # round up, as real vocabularies are
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=131072,  # as Llama 3.2; rope is computed per position, nothing is allocated
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=ids["<|eot_id|>"],
        pad_token_id=ids["<|finetune_right_pad_id|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|eot_id|>"], ids["<|end_of_text|>"]],
        pad_token_id=ids["<|finetune_right_pad_id|>"],
    )
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _install_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist tiny-model DIR [--hidden-size ...]`."""
    out = write_tiny_model(
        args.output,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
        seed=args.seed,
    )
    print(f"tiny model written to {out}")
    return 0
