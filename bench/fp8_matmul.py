"""One base projection's matmul in bf16 against FP8 (`slackdist/model/fp8.py`), per projection shape.

For each projection of the Llama-3.2-3B shape (q/o, k/v, gate/up, down; out x in), on `--tokens` rows:
bf16 `x @ W.T`; `torch._scaled_mm` with per-token and per-row scales (what training uses), with fast
accumulation (what training's forward uses), and with one scale per tensor; and what surrounds the
FP8 matmul: quantizing the input (compiled, as inside a compiled layer) and transposing the FP8 weight
(which training avoids by keeping both layouts). Also the relative error of FP8's forward and input
gradient against bf16's. Milliseconds per call, averaged over `--iters` after warm-up.

    python3 bench/fp8_matmul.py --json $OUT/fp8_matmul.json          # on the GPU machine
    python bench/fp8_matmul.py --device cpu --tokens 64 --scale 0.02  # a smoke run here (no timing value)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slackdist.model.fp8 import Fp8Matmul, quantize_rows  # noqa: E402

SHAPES = {"q/o": (3072, 3072), "k/v": (1024, 3072), "gate/up": (8192, 3072), "down": (3072, 8192)}
"""Projection -> (out, in) of Llama-3.2-3B."""


def timed(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Milliseconds per call of `fn`, after 3 untimed calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters * 1e3


def relative_errors(x: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    """FP8's forward and input gradient against the same in bf16: |fp8 - bf16| / |bf16| (Frobenius)."""
    weight8, scale = quantize_rows(weight)
    x = x.detach().requires_grad_()
    y = Fp8Matmul.apply(x, weight8, weight8.t().contiguous(), scale.view(-1))
    ref = x @ weight.t()
    grad = torch.randn_like(ref)
    (dx,) = torch.autograd.grad(y, x, grad)
    (dref,) = torch.autograd.grad(ref, x, grad)
    rel = lambda a, b: ((a - b).float().norm() / b.float().norm()).item()  # noqa: E731
    return rel(y, ref), rel(dx, dref)


def measure(name: str, out: int, inp: int, args: argparse.Namespace, device: torch.device) -> dict:
    out, inp = max(16, round(out * args.scale / 16) * 16), max(16, round(inp * args.scale / 16) * 16)
    weight = (torch.randn(out, inp, device=device) * 0.02).bfloat16()
    x = torch.randn(args.tokens, inp, device=device, dtype=torch.bfloat16)
    weight8, w_scale = quantize_rows(weight)
    x8, x_scale = quantize_rows(x)
    w_scale, one = w_scale.view(1, -1), torch.ones((), device=device)
    quantize = torch.compile(quantize_rows) if device.type == "cuda" else quantize_rows

    def scaled(a_scale: torch.Tensor, b_scale: torch.Tensor, fast: bool = False) -> Callable[[], object]:
        return lambda: torch._scaled_mm(
            x8, weight8.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=torch.bfloat16, use_fast_accum=fast
        )

    ms = {
        "bf16": timed(lambda: x @ weight.t(), device, args.iters),
        "fp8_rowwise": timed(scaled(x_scale, w_scale), device, args.iters),
        "fp8_rowwise_fast_accum": timed(scaled(x_scale, w_scale, fast=True), device, args.iters),
        "fp8_tensorwise": timed(scaled(one, one), device, args.iters),
        "quantize_input": timed(lambda: quantize(x), device, args.iters),
        "transpose_fp8_weight": timed(lambda: weight8.t().contiguous(), device, args.iters),
    }
    y_err, dx_err = relative_errors(x, weight)
    return {"projection": name, "out": out, "in": inp, "tokens": args.tokens, "ms": ms,
            "forward_rel_error": y_err, "input_grad_rel_error": dx_err}  # fmt: skip


def print_table(rows: list[dict]) -> None:
    keys = list(rows[0]["ms"])
    print(
        f"{'projection':10s} {'out x in':>12s} " + " ".join(f"{k:>22s}" for k in keys) + "  fwd / grad error"
    )
    for r in rows:
        times = " ".join(f"{r['ms'][k]:22.3f}" for k in keys)
        shape = f"{r['out']}x{r['in']}"
        print(
            f"{r['projection']:10s} {shape:>12s} {times}  {r['forward_rel_error']:.4f} / {r['input_grad_rel_error']:.4f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="rows of the input (tokens of a step's forward)")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink the shapes (rounded to multiples of 16)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default="bench/results/fp8_matmul.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = [measure(name, out, inp, args, device) for name, (out, inp) in SHAPES.items()]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{gpu}, {args.tokens} tokens, milliseconds a call")
    print_table(rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
