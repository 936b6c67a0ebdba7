"""`slackdist eval --model-dir DIR [--data DATA] [--split NAME]`: held-out loss and sample replies, base vs tuned.

Loss is the mean next-token cross-entropy per label token on the held-out split (`test.jsonl` of a
prepared folder; any source `--data` takes, `slackdist.data.sources`), with the
labels training uses (`slackdist.data.examples.make_example`: assistant tokens by
default, from `encode_chat`), for the base model (the adapter disabled) and the tuned
model; perplexity is `exp(loss)`. Conversations longer than the model was trained on
(`train.max_seq_len` of its folder's config) are left out, as training leaves them out.
Sample generations answer the last assistant turn of a few held-out conversations (prompt =
the conversation before it, reference = that turn). Results go to `eval.json` and `eval.md` in the
folder `--out` (default: MODEL_DIR/eval), which is written whole and renamed into place
(`slackdist.files.staged_dir`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slackdist.chat import load_model
from slackdist.config import Config, TrainConfig
from slackdist.data.examples import Example, load_split
from slackdist.data.sources import open_data
from slackdist.errors import SlackdistError
from slackdist.files import check_output_dir, staged_dir
from slackdist.generate import GenerationSettings, context_limit, reply, trim_history, warm_up
from slackdist.model.load import InferenceModel, merge_in_memory
from slackdist.model.loss import chunked_lm_loss, logit_softcap

TEST_SPLIT = "test"
EVAL_DIR = "eval"
"""The default `--out`: MODEL_DIR/eval."""
OUTPUT_FILES = ("eval.json", "eval.md")
logger = logging.getLogger(__name__)
LOSS_CHUNK_TOKENS = 1024


@dataclass
class LossResult:
    """Held-out loss of one model."""

    loss: float
    """Mean cross-entropy per label token (nats)."""
    perplexity: float
    label_tokens: int
    conversations: int


@dataclass
class Sample:
    """One held-out conversation answered by both models."""

    conversation_id: str
    channel: str
    prompt: list[dict[str, str]]
    reference: str
    base: str | None
    tuned: str


def heldout_loss(
    im: InferenceModel, examples: Sequence[Example], *, adapter: bool = True, max_batches: int = 0
) -> LossResult:
    """Loss per label token over examples, one conversation per forward (no padding, no packing).

    Args:
        im: the loaded model.
        examples: token ids and labels (`slackdist.data.examples.load_split`).
        adapter: False measures the base model (the adapter disabled).
        max_batches: evaluate at most this many conversations (0: all).

    Returns:
        The loss, its perplexity and how many label tokens / conversations it covers.
    """
    model = im.model
    device = next(model.parameters()).device
    todo = examples[:max_batches] if max_batches > 0 else examples
    total, tokens = 0.0, 0
    ctx = contextlib.nullcontext() if adapter else model.disable_adapter()
    with ctx, torch.inference_mode():
        for ex in tqdm(todo, desc=f"loss ({'tuned' if adapter else 'base'})", unit="conv", leave=False):
            input_ids = torch.tensor([ex.input_ids], device=device)
            labels = torch.tensor([ex.labels], device=device)
            # Only the last hidden state is kept: lm_head + cross-entropy run on labelled positions in
            # chunks, so a 128k vocabulary never materialises [T, vocab] logits.
            out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
            loss_sum, n = chunked_lm_loss(
                out.hidden_states[-1],
                model.get_output_embeddings(),
                labels,
                LOSS_CHUNK_TOKENS,
                softcap=logit_softcap(model),
            )
            total += float(loss_sum)
            tokens += n
    if tokens == 0:
        raise SlackdistError(
            "no label tokens in the held-out data (every conversation lacks assistant turns?)"
        )
    loss = total / tokens
    return LossResult(
        loss=loss, perplexity=math.exp(min(loss, 700.0)), label_tokens=tokens, conversations=len(todo)
    )


def pick_samples(records: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """`n` records spread evenly over the split (a list or a `datasets.Dataset`; deterministic)."""
    if n <= 0 or not records:
        return []
    if n >= len(records):
        return list(records)
    if n == 1:
        return [records[0]]
    step = (len(records) - 1) / (n - 1)
    return [records[round(i * step)] for i in range(n)]


def sample_replies(
    im: InferenceModel, records: list[dict[str, Any]], settings: GenerationSettings
) -> tuple[list[Sample], InferenceModel]:
    """Base and tuned replies to the last assistant turn of each record.

    The base replies come first (the adapter disabled); then a mergeable adapter is folded into its
    16-bit base in memory (`merge_in_memory`) so the tuned replies take the fast decode path.

    Returns:
        The samples, and the model the tuned replies came from (merged in memory where it could be).

    Raises:
        PromptTooLongError: a conversation whose last user turn alone does not fit the context.
    """
    has_base = hasattr(im.model, "disable_adapter")
    limit = context_limit(im, settings)
    prompts = [
        trim_history(im.tokenizer, r["messages"][:-1], limit, min(settings.max_new_tokens, limit // 2))
        for r in records
    ]
    bar = dict(unit="conv", leave=False)
    base = [
        reply(im, p, settings, adapter=False) if has_base else None
        for p in tqdm(prompts, desc="base replies", **bar)
    ]
    im = merge_in_memory(im)
    warm_up(im, settings)
    tuned = [reply(im, p, settings) for p in tqdm(prompts, desc="tuned replies", **bar)]
    samples = []
    for record, prompt, b, t in zip(records, prompts, base, tuned, strict=True):
        meta = record.get("meta") or {}
        samples.append(
            Sample(
                conversation_id=str(meta.get("conversation_id", "")),
                channel=str(meta.get("channel", "")),
                prompt=prompt,
                reference=record["messages"][-1]["content"],
                base=b,
                tuned=t,
            )
        )
    return samples, im


def _quote(text: str) -> str:
    return "\n".join("> " + line if line else ">" for line in (text.strip() or "(empty)").splitlines())


def render_markdown(result: dict[str, Any]) -> str:
    """eval.md: the loss table and the sample replies."""
    lines = [
        f"# Evaluation of `{result['model_dir']}`",
        "",
        f"Held-out data: `{result['data']}`: {result['conversations']} conversations, "
        f"{result['label_tokens']} label tokens ({result['train_on']} tokens).",
        "",
        "| model | loss per token | perplexity |",
        "|---|---|---|",
    ]
    for name in ("base", "tuned"):
        r = result[name]
        label = f"base (`{result['base_model']}`)" if name == "base" else "tuned"
        lines.append(
            f"| {label} | {r['loss']:.4f} | {r['perplexity']:.2f} |" if r else f"| {label} | n/a | n/a |"
        )
    if result["base"] and result["tuned"]:
        drop = result["base"]["loss"] - result["tuned"]["loss"]
        lines += ["", f"Tuning changed the held-out loss by {-drop:+.4f} nats per token."]
    for i, s in enumerate(result["samples"], 1):
        where = f" (#{s['channel']})" if s["channel"] else ""
        lines += [
            "",
            f"## Sample {i}{where} `{s['conversation_id']}`",
            "",
            "**Prompt** (after the system prompt):",
            "",
        ]
        for m in s["prompt"]:
            if m["role"] != "system":
                lines += [f"*{m['role']}*:", "", _quote(m["content"]), ""]
        lines += ["**Reference:**", "", _quote(s["reference"]), ""]
        if s["base"] is not None:
            lines += ["**Base:**", "", _quote(s["base"]), ""]
        lines += ["**Tuned:**", "", _quote(s["tuned"])]
    return "\n".join(lines) + "\n"


def data_for(im: InferenceModel, data: str | None, model_dir: str) -> str:
    """The held-out data: --data, else the data the model was trained on.

    Raises:
        SlackdistError: no --data and no training config to find it in.
    """
    if data:
        return data
    if im.config is None:
        raise SlackdistError(
            f"{model_dir}: no slackdist_config.yaml to find the training data in; pass --data DIR"
        )
    return im.config.train.data_dir


def evaluate(
    im: InferenceModel,
    data: str | Path,
    settings: GenerationSettings,
    *,
    split: str | None = None,
    num_samples: int = 5,
    max_batches: int = 0,
    model_dir: str = "",
) -> dict[str, Any]:
    """Loss / perplexity of base and tuned on a held-out split of `data`, plus sample replies.

    Args:
        im: the loaded model.
        data: anything `slackdist.data.sources.open_data` reads.
        settings: generation settings of the sample replies.
        split: the held-out split (default: "test", or the only split of a source that has one).
        num_samples: sample replies to generate.
        max_batches: evaluate the loss on at most this many conversations (0: all).
        model_dir: the model folder, as recorded in the result.

    Returns:
        The eval.json content.

    Raises:
        SlackdistError: unreadable data, no such split, a malformed record, or no label tokens in it.
    """
    source = open_data(str(data))
    if split is None:
        only = list(source.splits) if len(source.splits) == 1 else []
        split = TEST_SPLIT if TEST_SPLIT in source.splits or not only else only[0]
    where = source.where(split)
    trained = im.config.train if im.config is not None else TrainConfig()
    train_on, max_seq_len = trained.train_on, trained.max_seq_len
    records = source.records(split)
    if records is None or len(records) == 0:
        raise SlackdistError(f"{where}: no conversations to evaluate on")
    examples = load_split(source, split, im.tokenizer, train_on=train_on, max_seq_len=max_seq_len)
    if not examples:
        raise SlackdistError(f"{where}: every conversation is longer than max_seq_len={max_seq_len}")
    if examples.num_too_long:
        logger.warning("%s (as training left them out)", examples.describe_dropped())
    has_base = hasattr(im.model, "disable_adapter")
    kind = im.kind
    base = heldout_loss(im, examples, adapter=False, max_batches=max_batches) if has_base else None
    tuned = heldout_loss(im, examples, max_batches=max_batches)
    samples, im = sample_replies(im, pick_samples(records, num_samples), settings)
    return {
        "model_dir": model_dir,
        "kind": kind,
        "tuned_replies_merged_in_memory": im.merged_in_memory,
        "base_model": im.base,
        "data": where,
        "train_on": train_on,
        "conversations": tuned.conversations,
        "label_tokens": tuned.label_tokens,
        "base": asdict(base) if base else None,
        "tuned": asdict(tuned),
        "settings": asdict(settings),
        "samples": [asdict(s) for s in samples],
    }


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist eval --model-dir DIR [--data DIR] [--num-samples N] [--out DIR] [--max-batches N]`.

    Raises:
        SlackdistError: bad model folder or data, or an `--out` that is not an eval folder.
    """
    out = Path(args.out) if args.out else Path(cfg.chat.model_dir) / EVAL_DIR
    check_output_dir(
        out,
        markers=OUTPUT_FILES,
        what="an eval folder",
        overwrite=args.overwrite,
        inputs=[cfg.chat.model_dir, args.data],
    )
    im = load_model(cfg)
    data = data_for(im, args.data, cfg.chat.model_dir)
    settings = GenerationSettings.from_config(cfg.chat)
    if settings.seed is None:
        settings = settings.replace(seed=0)  # reproducible sample replies
    result = evaluate(
        im,
        data,
        settings,
        split=args.split,
        num_samples=args.num_samples,
        max_batches=args.max_batches,
        model_dir=cfg.chat.model_dir,
    )
    with staged_dir(out) as tmp:
        (tmp / "eval.json").write_text(
            json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        (tmp / "eval.md").write_text(render_markdown(result), encoding="utf-8")
    for name in ("base", "tuned"):
        r = result[name]
        if r:
            print(f"{name:>5}: loss {r['loss']:.4f}  perplexity {r['perplexity']:.2f}")
    print(
        f"{result['label_tokens']} label tokens in {result['conversations']} conversations; wrote {out}/eval.md"
    )
    return 0
