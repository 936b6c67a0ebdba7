"""Time to first token and decode speed of slackdist's reply path beside plain `model.generate`.

    # on the GPU: a Llama-3.2-3B-shaped random model in bf16, built once into /tmp/l32_3b_merged
    python bench/chat_bench.py --build-3b /tmp/l32_3b_merged --prompt-tokens 512 --new-tokens 256 --json out.json
    # CPU smoke run at tiny size
    python bench/chat_bench.py --build-tiny /tmp/tiny --prompt-tokens 32 --new-tokens 8 --repeats 1

With `--adapter-dir OUT` (a `slackdist train` output folder) the rows are what a user gets from
that folder: "plain generate" is the adapter over its 4-bit base, as chat ran before the adapter
was merged in memory; "slackdist" is chat's default load (`load_for_inference(merge="auto")` then
`merge_in_memory`: a 16-bit base with the adapter folded in, fast path on CUDA). `load_s` then
includes the merge.

Otherwise both rows load the same merged model once (`load_for_inference`, unquantized) and answer the
same prompt greedily with exactly `--new-tokens` new tokens (`min_new_tokens`: a random model
rarely says end-of-turn). "plain generate" is `model.generate` with default settings (dynamic
KV cache, eager). "slackdist" is `slackdist.generate.stream_reply`, what chat and serve run:
the generation thread, streaming, and on CUDA the fast path (static KV cache sized once,
decode step compiled by transformers with torch.compile mode="reduce-overhead"). Compilation
happens in a warm-up call and is reported apart. Figures are medians over `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Timing:
    """One path's figures (medians over the repeats)."""

    first_token_ms: float
    decode_tokens_per_s: float
    total_s: float
    new_tokens: int


def build_3b(out_dir: Path) -> Path:
    """A random Llama-3.2-3B-shaped model (bf16), unless already there.

    No Llama tokenizer offline: the tiny byte-level BPE (ids < 1100) with the Llama 3 special tokens and
    chat template. Speed does not depend on which ids the prompt holds.
    """
    from slackdist.model.tiny import build_tiny_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_common

    return gpu_common.build_model_dir(out_dir, tokenizer=build_tiny_tokenizer())


def build_adapter(base_dir: Path, out_dir: Path) -> Path:
    """Write a LoRA adapter over `base_dir` as training would (r=64, the seven projections and lm_head),
    with random non-zero B matrices, unless already there."""
    import torch
    from transformers import AutoModelForCausalLM

    from slackdist.config import LoraSettings
    from slackdist.model.load import add_lora, load_tokenizer

    if (out_dir / "adapter_config.json").is_file():
        return out_dir
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, device_map={"": device})
    peft_model = add_lora(model, LoraSettings(), gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    peft_model.save_pretrained(out_dir, save_embedding_layers=False)
    load_tokenizer(str(base_dir)).save_pretrained(out_dir)
    del model, peft_model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out_dir


def prompt_messages(tokenizer: Any, n_tokens: int) -> list[dict[str, str]]:
    """A one-turn chat whose prompt ids are about `n_tokens` long (never longer)."""
    from slackdist.model.template import build_prompt_ids

    words = "the deploy finished and the dashboards look fine but the search api is slow again".split()
    text: list[str] = []
    while True:
        candidate = text + [words[len(text) % len(words)]]
        messages = [{"role": "user", "content": " ".join(candidate)}]
        if len(build_prompt_ids(tokenizer, messages)) > n_tokens:
            return [{"role": "user", "content": " ".join(text) or "hi"}]
        text = candidate


class _Clock:
    """A `generate` streamer that records when each new token reaches the host."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.extend([time.perf_counter()] * value.numel())

    def end(self) -> None:
        pass


def time_plain(im: Any, prompt_ids: list[int], new_tokens: int) -> tuple[float, float, float, int]:
    """(first token s, decode tokens/s, total s, tokens) of plain `model.generate`."""
    import torch

    device = next(im.model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    clock = _Clock()
    start = time.perf_counter()
    im.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=clock,
        pad_token_id=im.tokenizer.pad_token_id,
    )
    end = time.perf_counter()
    first, n = clock.times[0] - start, len(clock.times)
    return first, (n - 1) / max(clock.times[-1] - clock.times[0], 1e-9), end - start, n


def time_ours(im: Any, messages: list[dict[str, str]], settings: Any) -> tuple[float, float, float, int]:
    """(first token s, decode tokens/s, total s, tokens) of `stream_reply`."""
    from slackdist.generate import ReplyStats, stream_reply

    stats = ReplyStats()
    for _ in stream_reply(im, messages, settings, stats=stats):
        pass
    n = stats.completion_tokens
    decode_s = stats.total_s - (stats.first_token_s or 0.0)
    return stats.first_token_s or 0.0, (n - 1) / max(decode_s, 1e-9), stats.total_s, n


def median_timing(runs: list[tuple[float, float, float, int]]) -> Timing:
    return Timing(
        first_token_ms=round(1000 * statistics.median(r[0] for r in runs), 2),
        decode_tokens_per_s=round(statistics.median(r[1] for r in runs), 1),
        total_s=round(statistics.median(r[2] for r in runs), 4),
        new_tokens=runs[0][3],
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    from slackdist.generate import GenerationSettings, use_fast_path, warm_up
    from slackdist.model.load import load_for_inference, merge_in_memory
    from slackdist.model.template import build_prompt_ids

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    plain_im = None
    if args.adapter_dir:
        model_dir = Path(args.adapter_dir)
        plain_im = load_for_inference(str(model_dir), device=device, merge="off")  # 4-bit base on a GPU
    elif args.build_3b:
        model_dir = build_3b(Path(args.build_3b))
    elif args.build_tiny:
        from slackdist.model.tiny import write_tiny_model

        model_dir = write_tiny_model(args.build_tiny)
    else:
        model_dir = Path(args.model_dir)
    if args.adapter:
        model_dir = build_adapter(model_dir, Path(f"{model_dir}-lora"))
    if plain_im is None:
        t0 = time.perf_counter()
        im = plain_im = load_for_inference(str(model_dir), load_in_4bit=False, device=device)
        load_s = time.perf_counter() - t0
    messages = prompt_messages(plain_im.tokenizer, args.prompt_tokens)
    prompt_ids = build_prompt_ids(plain_im.tokenizer, messages)
    fast = {"auto": None, "on": True, "off": False}[args.fast]
    settings = GenerationSettings(
        temperature=0.0,
        repetition_penalty=1.0,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        max_context_tokens=args.context_tokens,
        fast=fast,
    )

    time_plain(plain_im, prompt_ids, min(args.new_tokens, 8))  # warm-up: CUDA context, kernels, allocator
    plain = median_timing([time_plain(plain_im, prompt_ids, args.new_tokens) for _ in range(args.repeats)])
    four_bit = getattr(getattr(plain_im.model, "base_model", plain_im.model), "is_loaded_in_4bit", False)
    plain_kind = f"{plain_im.kind}{' on a 4-bit base' if four_bit else ''}"
    if args.adapter_dir:
        del plain_im
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        im = merge_in_memory(load_for_inference(str(model_dir), device=device, merge="auto"))
        load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    warm_up(im, settings)  # compiles the decode step on the fast path
    compile_s = time.perf_counter() - t0
    time_ours(im, messages, settings)  # one full-length call: every shape of the run has been seen
    ours = median_timing([time_ours(im, messages, settings) for _ in range(args.repeats)])

    return {
        "model_dir": str(model_dir),
        "kind": "adapter merged in memory" if im.merged_in_memory else im.kind,
        "plain_kind": plain_kind,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else None,
        "dtype": str(next(im.model.parameters()).dtype).removeprefix("torch."),
        "parameters_b": round(sum(p.numel() for p in im.model.parameters()) / 1e9, 3),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "fast_path": use_fast_path(im, settings),
        "load_s": round(load_s, 2),
        "warm_up_s": round(compile_s, 2),
        "plain_generate": asdict(plain),
        "slackdist": asdict(ours),
        "decode_speedup": round(ours.decode_tokens_per_s / plain.decode_tokens_per_s, 2),
        "first_token_speedup": round(plain.first_token_ms / max(ours.first_token_ms, 1e-6), 2),
    }


def table(result: dict[str, Any]) -> str:
    rows = [
        "| path | first token (ms) | decode (tokens/s) | total (s) | new tokens |",
        "|---|---|---|---|---|",
    ]
    names = {
        "plain_generate": f"plain `model.generate` ({result['plain_kind']})",
        "slackdist": f"slackdist `stream_reply` ({result['kind']}, load {result['load_s']} s)",
    }
    for key, name in names.items():
        t = result[key]
        rows.append(
            f"| {name} | {t['first_token_ms']:.1f} | {t['decode_tokens_per_s']:.1f} | {t['total_s']:.3f} | "
            f"{t['new_tokens']} |"
        )
    where = result["gpu"] or result["device"]
    return "\n".join(
        [
            f"{where}, {result['kind']} model, {result['dtype']}, {result['parameters_b']} B parameters, prompt {result['prompt_tokens']} "
            f"tokens, fast path {'on' if result['fast_path'] else 'off'} (warm-up {result['warm_up_s']} s); "
            f"torch {result['torch']}, transformers {result['transformers']}",
            "",
            *rows,
            "",
            f"decode speedup {result['decode_speedup']}x, first token {result['first_token_speedup']}x",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="a merged model folder (config.json + safetensors)")
    src.add_argument(
        "--build-3b", metavar="DIR", help="build (once) and use a random Llama-3.2-3B-shaped model"
    )
    src.add_argument("--build-tiny", metavar="DIR", help="build and use the tiny test model (CPU smoke run)")
    src.add_argument(
        "--adapter-dir",
        metavar="OUT",
        help="a `slackdist train` output folder: chat's default load vs the 4-bit one",
    )
    p.add_argument(
        "--adapter",
        action="store_true",
        help="time an unmerged LoRA adapter (r=64, all projections + lm_head, built into DIR-lora) on the model",
    )
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per reply (default: 256)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length in tokens (default: 512)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs per path; medians reported (default: 3)"
    )
    p.add_argument(
        "--context-tokens", type=int, default=0, help="static cache size (0: generate.py's default)"
    )
    p.add_argument("--fast", choices=["auto", "on", "off"], default="auto", help="slackdist fast path")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_tokens < 8 or args.repeats < 1:
        p.error("--new-tokens >= 2, --prompt-tokens >= 8 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    sys.exit(main())
