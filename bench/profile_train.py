"""Where a training step's GPU time goes: the PyTorch profiler over a few steps of `slackdist train`.

    python3 bench/profile_train.py [--variant default|plain|...] [--warm 8] [--steps 3] [--json PATH]

Runs the real training recipe (`slackdist.train.recipe.LoRARecipe`) in this process on the
Llama-3.2-3B-shaped model and the synthetic chats of `gpu_common.py`, with the flags of a
`train_throughput.py` variant; profiles `--steps` optimizer steps after `--warm` (compilation and
the allocator settle there), then prints GPU kernel time by category, the GPU's busy share of the
wall time (low = launch-bound), the top kernels and host ops, and the GPU's idle gaps between
kernels (by size, and by the kernel after each: what the GPU waited for the host to queue),
and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common  # noqa: E402
from train_throughput import VARIANTS  # noqa: E402

# First match wins; kernel names as CUDA / Triton / cuBLAS / bitsandbytes report them.
CATEGORIES = [
    ("attention", r"flash|fmha|attention|sdpa|varlen"),
    ("4-bit dequantize", r"dequant|kDequantize"),
    ("optimizer", r"kOptimizer|adam|Adam|multi_tensor"),
    ("matmul", r"gemm|GEMM|sm90|cutlass|nvjet|xmma|cublas|wgmma|^aten::(mm|addmm|bmm)$"),
    ("cross-entropy / logits", r"cross_entropy|log_softmax|[Ss]oft[Mm]ax|nll|logsumexp"),
    ("triton fused (compiled)", r"^triton_"),
    ("copies / casts", r"copy|Memcpy|cast|to_copy|cat"),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name):
            return label
    return "other elementwise / reductions"


def device_time_us(event, on_gpu: bool) -> float:
    """Self time of a profiler event on the GPU (kernels), or on the CPU (ops) for a CPU smoke run."""
    import torch

    if not on_gpu:
        return float(event.self_cpu_time_total) if event.device_type == torch.autograd.DeviceType.CPU else 0.0
    if event.device_type != torch.autograd.DeviceType.CUDA:
        return 0.0
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def idle_gaps(events, on_gpu: bool) -> list[tuple[float, str, str]]:
    """The GPU's idle gaps over the profiled steps: (microseconds, kernel before, kernel after).

    Kernels and copies of all streams are merged into busy intervals; a gap is the time between two
    of them. The kernel after a gap says what the GPU waited for the host to queue.
    """
    import torch

    if not on_gpu:
        return []
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    gaps, end, before = [], None, ""
    for start, stop, name in kernels:
        if end is not None and start > end:
            gaps.append((float(start - end), before, name))
        if end is None or stop > end:
            end, before = stop, name
    return gaps


def print_gaps(gaps: list[tuple[float, str, str]], steps: int) -> dict:
    """Idle time per step, by size and by the kernel after the gap; returns the same as JSON."""
    if not gaps:
        return {}
    total = sum(g for g, _, _ in gaps)
    sizes = {
        "< 20 us": (0, 20),
        "20-200 us": (20, 200),
        "0.2-1 ms": (200, 1000),
        ">= 1 ms": (1000, float("inf")),
    }
    by_size = {
        label: sum(g for g, _, _ in gaps if lo <= g < hi) / steps / 1e3 for label, (lo, hi) in sizes.items()
    }
    print(
        f"\nGPU idle between kernels: {total / steps / 1e3:.1f} ms per step in {len(gaps) / steps:.0f} gaps"
    )
    print("  by gap size (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in by_size.items()))
    after: dict[str, float] = {}
    for g, _, name in gaps:
        if g >= 200:
            after[name[:70]] = after.get(name[:70], 0.0) + g
    print(f"\n{'gaps >= 0.2 ms, by the kernel after the gap':<90}{'ms/step':>10}")
    for name, g in sorted(after.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{name:<90}{g / steps / 1e3:>10.1f}")
    largest = sorted(gaps, reverse=True)[:10]
    print(
        "\nlargest gaps: "
        + "; ".join(f"{g / 1e3:.1f} ms before {n[:40]} (after {b[:30]})" for g, b, n in largest)
    )
    return {
        "idle_ms_per_step": total / steps / 1e3,
        "idle_ms_per_step_by_size": by_size,
        "idle_ms_per_step_by_next_kernel": {k: v / steps / 1e3 for k, v in after.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="default", choices=sorted(VARIANTS))
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model-dir", default="/tmp/l32_3b")
    ap.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default: 28; fewer for a smoke run)"
    )
    ap.add_argument("--data-dir", default="/tmp/l32_chats")
    ap.add_argument("--out", default="/tmp/slackdist_profile")
    ap.add_argument("--json", default="bench/results/profile_train.json")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from slackdist.cli import build_parser
    from slackdist.config import config_from_args
    from slackdist.train.recipe import LoRARecipe

    model = gpu_common.build_model_dir(args.model_dir, layers=args.layers)
    data = gpu_common.write_dataset(args.data_dir)
    argv = ["train", "--model", str(model), "--data", str(data), "--output", f"{args.out}_{args.variant}",
            "--max-steps", str(args.warm + args.steps), "--eval-every-n-steps", "0", "--save-every-n-steps", "0",
            "--seed", "0", *VARIANTS[args.variant]]  # fmt: skip
    cfg = config_from_args(build_parser().parse_args(argv))
    with profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []),
        schedule=schedule(wait=args.warm, warmup=0, active=args.steps, repeat=1),
    ) as prof:

        class Profiled(LoRARecipe):
            def step(self, micro_batches):  # noqa: ANN001, ANN202 - one profiler step per optimizer step
                started = time.perf_counter()
                stats = super().step(micro_batches)
                if self.state.global_step > args.warm:
                    self.profiled_seconds = (
                        getattr(self, "profiled_seconds", 0.0) + time.perf_counter() - started
                    )
                    self.profiled_tokens = getattr(self, "profiled_tokens", 0) + stats.input_tokens
                prof.step()
                return stats

        recipe = Profiled(cfg)
        recipe.setup()
        started = time.perf_counter()
        recipe.fit()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    recipe.cleanup()

    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        t = device_time_us(event, torch.cuda.is_available())
        if t > 0 and not event.key.startswith("ProfilerStep"):
            kernels[event.key] = kernels.get(event.key, 0.0) + t
    total = sum(kernels.values())
    by_category: dict[str, float] = {}
    for name, t in kernels.items():
        by_category[category(name)] = by_category.get(category(name), 0.0) + t
    step_s = recipe.profiled_seconds
    print(
        f"\nGPU: {gpu_common.gpu_name()}; variant {args.variant}; {args.steps} steps profiled after {args.warm}"
    )
    print(f"{recipe.plan.describe()}")
    unit = "GPU kernel" if torch.cuda.is_available() else "CPU op"
    print(f"step wall time {step_s / args.steps * 1e3:.0f} ms, {unit} time {total / args.steps / 1e3:.0f} ms "
          f"per step (busy {total / 1e6 / step_s:.0%}); {recipe.profiled_tokens / step_s:,.0f} tokens/s")  # fmt: skip
    print(f"\n{'category':<32}{'ms/step':>10}{'share':>8}")
    for label, t in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"{label:<32}{t / args.steps / 1e3:>10.1f}{t / total:>8.1%}")
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    print(f"\n{'top kernels':<90}{'ms/step':>10}")
    for name, t in top:
        print(f"{name[:88]:<90}{t / args.steps / 1e3:>10.1f}")
    host: dict[str, float] = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CPU and not event.key.startswith("ProfilerStep"):
            host[event.key] = host.get(event.key, 0.0) + float(event.self_cpu_time_total)
    top_host = sorted(host.items(), key=lambda kv: -kv[1])[:15]
    print(f"\n{'top host (CPU self time) ops':<90}{'ms/step':>10}")
    for name, t in top_host:
        print(f"{name[:88]:<90}{t / args.steps / 1e3:>10.1f}")
    gaps = print_gaps(idle_gaps(prof.events(), torch.cuda.is_available()), args.steps)
    graphs = dict(torch._dynamo.utils.counters["stats"])
    print(f"\ntorch.compile: {graphs}; graph breaks: {dict(torch._dynamo.utils.counters['graph_break'])}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "gpu": gpu_common.gpu_name(),
                "date": time.strftime("%Y-%m-%d"),
                "variant": args.variant,
                "plan": recipe.plan.describe(),
                "step_ms": step_s / args.steps * 1e3,
                "gpu_kernel_ms_per_step": total / args.steps / 1e3,
                "tokens_per_s": recipe.profiled_tokens / step_s,
                "wall_s": wall,
                "categories_ms_per_step": {k: v / args.steps / 1e3 for k, v in by_category.items()},
                "top_kernels_ms_per_step": {k: v / args.steps / 1e3 for k, v in top},
                "top_host_ops_ms_per_step": {k: v / args.steps / 1e3 for k, v in top_host},
                "dynamo_stats": graphs,
                "idle": gaps,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
