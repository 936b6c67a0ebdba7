"""`slackdist export --format gguf` checked in llama.cpp itself: tokens, logits and greedy replies beside transformers.

    pip install gguf llama-cpp-python   # llama-cpp-python compiles llama.cpp from source (minutes)
    python bench/gguf_check.py --workdir /tmp/gguf_check --json bench/results/gguf_check.json

Three tiny random models: `slackdist tiny-model` (Llama: tied embeddings, grouped-query attention, llama3 rope
scaling, the Llama 3 tokenizer layout), a `slackdist merge` of it with a random LoRA on every projection and
on lm_head (so the merged output projection is untied), and a Qwen2 with non-zero q/k/v biases. Each is exported as
f32, f16 and q8_0 and loaded by llama-cpp-python (llama.cpp's own loader, tokenizer and CPU kernels). Per
file and prompt:

- tokens: llama.cpp's tokenization of the rendered chat prompt (from the GGUF's vocabulary, merges and
  pre-tokenizer name) equals transformers' ids, and so do plain multilingual / code strings;
- logits: the largest |difference| over every prompt position (`logits_all`), also relative to the largest
  |logit|, and the share of positions whose argmax agrees;
- greedy: up to `--new-tokens` greedy tokens, ending at the first end-of-turn token, from llama.cpp equal
  transformers' `generate(do_sample=False)`;
- q8_0 bytes: llama.cpp's own quantizer (`llama_model_quantize`) run on the f32 export writes the same
  Q8_0 blocks as the q8_0 export, so what q8_0 changes is quantization, not the export.

The KV cache is kept in f32 so the f32 file differs from transformers only by kernel summation order. On CPUs
with AMX, llama.cpp builds with GGML_NATIVE route Q8_0 matmuls through its AMX backend, which crashed
(SIGSEGV in ggml_backend_amx_mul_mat) here for llama.cpp's own Q8_0 files as well; extra buffer types are
turned off (`use_extra_bufts=False`, llama.cpp's --no-extra-bufts) so the plain CPU kernels run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

QUANTS = ("f32", "f16", "q8_0")
PROMPTS = (
    [
        {"role": "system", "content": "You are a member of the team. This conversation is from #general."},
        {"role": "user", "content": "Is the deploy to production done? The error rate went up around 3pm."},
    ],
    [
        {"role": "system", "content": "You are a member of the team. This conversation is from #dev."},
        {"role": "user", "content": "Can someone review my pull request?"},
        {"role": "assistant", "content": "Sure, I can take a look this afternoon."},
        {"role": "user", "content": "Thanks! It fixes the flaky test in the billing service."},
    ],
)
PLAIN_TEXTS = (
    "Café, naïve, résumé, Zürich, São Paulo, Москва, 東京 👍 🎉",
    "def load_config(path: str) -> dict:\n    with open(path) as f:\n        return json.load(f)  # 12,345 rows",
    "I've been told he'll make it; they're sure we'd go. 3.14159 and 1e-5, $1,299.99!!!",
)


@dataclass
class Row:
    """One GGUF file checked against transformers on one prompt."""

    model: str
    quant: str
    prompt: int
    prompt_tokens: int
    tokens_equal: bool
    max_abs_logit_diff: float
    rel_logit_diff: float
    argmax_agreement: float
    greedy_equal: bool
    greedy_matching_prefix: int
    greedy_distinct_tokens: int
    """How many different tokens transformers' greedy reply holds (a random model often repeats one)."""
    new_tokens: int
    """Length of transformers' greedy reply (shorter than asked when it ended its turn)."""


def write_tiny_qwen2(out: Path, *, seed: int = 1) -> Path:
    """A tiny random Qwen2 (q/k/v biases, rotate-half rope kept as is by llama.cpp) with the tiny tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slackdist.model.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():  # biases start at zero: make them matter, so the export must carry them
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_models(workdir: Path) -> dict[str, Path]:
    """Written once under workdir: the tiny Llama ("tied"), its merge with a random adapter ("merged", untied
    output) and a tiny Qwen2 ("qwen2")."""
    from slackdist.config import LORA_TARGETS
    from slackdist.model.tiny import random_lora_adapter, write_tiny_model
    from slackdist.train.merge import merge_adapter

    tied = workdir / "tiny"
    if not (tied / "config.json").is_file():
        write_tiny_model(tied)
    merged = workdir / "merged"
    if not (merged / "config.json").is_file():
        adapter = random_lora_adapter(tied, workdir / "adapter", targets=LORA_TARGETS)
        merge_adapter(adapter, merged, dtype="fp32")
    qwen2 = workdir / "qwen2"
    if not (qwen2 / "config.json").is_file():
        write_tiny_qwen2(qwen2)
    return {"tied": tied, "merged": merged, "qwen2": qwen2}


@contextlib.contextmanager
def _no_extra_buffer_types() -> Iterator[None]:
    """llama-cpp-python has no argument for llama.cpp's `use_extra_bufts`: patch its default params."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def load_llama_cpp(gguf_path: Path, n_ctx: int = 512) -> Any:
    from llama_cpp import GGML_TYPE_F32, Llama

    with _no_extra_buffer_types():
        return Llama(
            str(gguf_path),
            n_ctx=n_ctx,
            logits_all=True,
            type_k=GGML_TYPE_F32,
            type_v=GGML_TYPE_F32,
            seed=0,
            verbose=False,
        )


def _greedy_llama_cpp(llm: Any, ids: list[int], new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy tokens up to `new_tokens`, ending with the first stop token (as `generate` in transformers)."""
    llm.reset()
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == new_tokens or out[-1] in stop:
            break
    return out


def check_file(model: Any, tokenizer: Any, gguf_path: Path, new_tokens: int) -> tuple[list[dict], bool]:
    """Compare one GGUF file with the transformers model on every prompt; also the plain-text tokenization."""
    import torch

    from slackdist.model.template import stop_token_ids

    llm = load_llama_cpp(gguf_path)
    stop = set(stop_token_ids(tokenizer))
    rows = []
    for i, messages in enumerate(PROMPTS):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        ids = list(ids)
        cpp_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].double().numpy()
            want = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=sorted(stop),
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(ids) :].tolist()
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float64)
        diff = float(np.abs(got - ref).max())
        greedy = _greedy_llama_cpp(llm, ids, new_tokens, stop)
        prefix = next((k for k, (a, b) in enumerate(zip(greedy, want, strict=False)) if a != b), len(want))
        rows.append(
            {
                "prompt": i,
                "prompt_tokens": len(ids),
                "tokens_equal": cpp_ids == ids,
                "max_abs_logit_diff": diff,
                "rel_logit_diff": diff / float(np.abs(ref).max()),
                "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
                "greedy_equal": greedy == want,
                "greedy_matching_prefix": prefix,
                "greedy_distinct_tokens": len(set(want)),
                "new_tokens": len(want),
            }
        )
    plain_equal = all(
        llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) == tokenizer(t)["input_ids"]
        for t in PLAIN_TEXTS
    )
    del llm
    return rows, plain_equal


def same_as_llama_quantize(f32_file: Path, q8_file: Path) -> bool:
    """Whether llama.cpp's quantizer, run on the f32 export, writes exactly the tensors of our q8_0 export."""
    import ctypes

    import gguf
    import llama_cpp

    reference = q8_file.with_name(q8_file.stem + "-llama-quantize.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType.MOSTLY_Q8_0)
    if llama_cpp.llama_model_quantize(str(f32_file).encode(), str(reference).encode(), ctypes.byref(params)):
        return False
    ours = {t.name: t for t in gguf.GGUFReader(q8_file).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(reference).tensors}
    return ours.keys() == theirs.keys() and all(
        ours[n].tensor_type == theirs[n].tensor_type and np.array_equal(ours[n].data, theirs[n].data)
        for n in ours
    )


def run(workdir: Path, new_tokens: int, extra_models: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Build, export and check every (model, quant); the result as a JSON-ready dict."""
    import torch
    from transformers import AutoModelForCausalLM

    from slackdist.export_gguf import export_gguf
    from slackdist.model.load import load_tokenizer

    torch.manual_seed(0)
    rows: list[Row] = []
    plain: dict[str, bool] = {}
    q8_same: dict[str, bool] = {}
    models = build_models(workdir) | {folder.name: folder for folder in extra_models}
    for label, folder in models.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = load_tokenizer(str(folder))
        files = {q: workdir / "gguf" / f"{label}-{q}.gguf" for q in QUANTS}
        for quant, path in files.items():
            export_gguf(folder, path, quant=quant)
            file_rows, plain[f"{label}-{quant}"] = check_file(model, tokenizer, path, new_tokens)
            rows += [Row(model=label, quant=quant, **r) for r in file_rows]
        q8_same[label] = same_as_llama_quantize(files["f32"], files["q8_0"])
    import llama_cpp

    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "llama_cpp_python": llama_cpp.__version__,
        "plain_text_tokens_equal": plain,
        "q8_0_same_as_llama_quantize": q8_same,
        "rows": [asdict(r) for r in rows],
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"llama-cpp-python {result['llama_cpp_python']}, {result['date']}, {result['machine']}")
    print(
        "| model | quant | prompt | tokens | tokens equal | max abs Δlogit | rel Δ | argmax agree "
        "| greedy equal | distinct greedy tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        greedy = "yes" if r["greedy_equal"] else f"no (first {r['greedy_matching_prefix']}/{r['new_tokens']})"
        print(
            f"| {r['model']} | {r['quant']} | {r['prompt']} | {r['prompt_tokens']} | "
            f"{'yes' if r['tokens_equal'] else 'NO'} | {r['max_abs_logit_diff']:.2e} | {r['rel_logit_diff']:.2e} | "
            f"{r['argmax_agreement']:.0%} | {greedy} | {r['greedy_distinct_tokens']} |"
        )
    same = all(result["plain_text_tokens_equal"].values())
    print(f"plain-text tokenization equal in every file: {'yes' if same else 'NO'}")
    for label, equal in result["q8_0_same_as_llama_quantize"].items():
        print(
            f"{label}: q8_0 tensors identical to llama.cpp's quantizer on the f32 file: {'yes' if equal else 'NO'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gguf_check"))
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--json", type=Path, default=None, help="Write the result here")
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        help="Also check this merged model folder (e.g. a real model; repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python", file=sys.stderr)
        return 2
    result = run(args.workdir, args.new_tokens, tuple(args.model))
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
