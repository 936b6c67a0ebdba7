"""Training throughput of `slackdist train` on a Llama-3.2-3B-shaped model, beside the TRL peer.

Each variant runs the real `python -m slackdist train` in its own process (fresh CUDA memory
statistics) on the same synthetic chat data, for `--warm` + `--steps` optimizer steps, and is
timed from its metrics.jsonl over the steps after warm-up. Tokens are real (non-padding) input
tokens. The peer script (`--peer PATH`, normally a copy of ../shared/gpu/peer_trl_qlora.py) runs in
the same call on the same length distribution, so the ratio is measured on one machine.

    python bench/train_throughput.py --variants default,plain --peer .peer/peer_trl_qlora.py \
        --peer-configs seed,seed_liger --json $OUT/train_throughput.json

`--repeat N` runs our variants N rounds, interleaved (a, b, a, b, ...), and the table shows each variant's
median with its range: on one warm H100 the same tree's runs spread by 10% from call to call
(bench/README.md), so a single run each cannot tell two trees or variants apart by less than that.

`--quality-steps 100` instead trains `default` and `plain` (every optimisation off; `--quality-variants`
names another pair) for 100 steps with the same seed on learnable synthetic chats and reports the gap
between their loss curves.

MFU uses the common 6·N·T estimate (N = 3.21e9 base parameters) over the H100's dense bf16 peak
(989 TFLOP/s); frozen base weights get no weight gradient, so the true useful work is closer to
4·N·T: treat the figure as a comparison, not an absolute.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common  # noqa: E402

N_PARAMS = 3.21e9
PEAK_FLOPS = 989e12

# Each variant is a list of `slackdist train` flags on top of the shared ones.
VARIANTS: dict[str, list[str]] = {
    # the shipped defaults as a long run gets them: auto memory plan (measured at start-up, 70% of
    # the GPU), decoder layers compiled (`compile=auto` compiles runs of >= compile_min_steps steps;
    # a bench run is shorter, so the threshold is lowered to 0 here), varlen attention, chunked
    # cross-entropy, paged AdamW over one flat parameter
    "default": ["--compile-min-steps", "0"],
    # the shipped defaults as a short run gets them (eager: fewer steps than compile_min_steps)
    "default_short": [],
    # the long-run defaults with PEFT's own LoRA forward (a dropout mask and an A matmul per projection)
    "unshared": ["--compile-min-steps", "0", "--no-lora-share-inputs"],
    # the defaults held to 16 GiB on a big GPU
    "budget16": ["--memory-budget-gib", "16"],
    "budget16_unshared": ["--memory-budget-gib", "16", "--no-lora-share-inputs"],
    "eager": ["--compile", "off"],
    # the long-run defaults without FP8 base matmuls (fp8_matmul=auto uses them in compiled runs on
    # GPUs with FP8 tensor cores); FP8 eager, which auto never does
    "no_fp8": ["--compile-min-steps", "0", "--fp8-matmul", "off"],
    "fp8_eager": ["--compile", "off", "--fp8-matmul", "on"],
    # what session 1 shipped: checkpointing on, the configured 2 x 2 micro-batches, eager
    "fixed": ["--memory-plan", "fixed", "--compile", "off"],
    # every optimisation off: SDPA over whole packed rows, full-vocabulary logits, checkpointing, PEFT's LoRA forward
    "plain": ["--attn-implementation", "sdpa", "--loss-chunk-size", "0", "--memory-plan", "fixed",
              "--compile", "off", "--no-lora-share-inputs"],
    "fused_adamw": ["--optimizer", "adamw_torch_fused"],
    # a 24 GB card (23.99e9 bytes): the process may allocate no more, the defaults otherwise
    "card24": ["--max-memory-gib", "22.3"],
    "card24_long": ["--max-memory-gib", "22.3", "--compile-min-steps", "0"],
    "card24_long_no_fp8": ["--max-memory-gib", "22.3", "--compile-min-steps", "0", "--fp8-matmul", "off"],
    # the documented low-memory setting: the allocator refuses more than 12 GiB, the plan adapts
    "low_mem": ["--max-memory-gib", "12"],
    # no recomputation at 1 or 2 rows per forward (what rows per forward is worth, compiled)
    "rows1": ["--memory-plan", "fixed", "--micro-batch-size", "1", "--gradient-accumulation-steps", "4",
              "--no-gradient-checkpointing"],
    "rows2": ["--memory-plan", "fixed", "--no-gradient-checkpointing"],
}  # fmt: skip


def run_ours(
    name: str, flags: list[str], args: argparse.Namespace, model: Path, data: Path, *, warm: int, steps: int
) -> dict:
    out = Path(args.workdir) / f"run_{name}"
    cmd = [
        sys.executable, "-m", "slackdist", "train",
        "--model", str(model), "--data", str(data), "--output", str(out),
        "--max-steps", str(warm + steps), "--eval-every-n-steps", "0",
        "--save-every-n-steps", "0", "--log-every-n-steps", "1", "--seed", "0",
        *flags,
    ]  # fmt: skip
    subprocess.run(["rm", "-rf", str(out)], check=True)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as e:
        print(f"[{name}] timed out after {args.timeout} s", flush=True)
        return {"name": name, "failed": True, "error": f"timeout {args.timeout} s: {str(e.stderr)[-300:]}"}
    wall = time.perf_counter() - started
    plan = [line for line in proc.stderr.splitlines() if "memory plan:" in line or "compile:" in line]
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"[{name}] FAILED (exit {proc.returncode}):\n{tail}", flush=True)
        return {"name": name, "failed": True, "error": tail[-500:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "step_seconds" in r and r["step"] > warm]
    tokens = sum(r["input_tokens"] for r in timed)
    seconds = sum(r["step_seconds"] for r in timed)
    tps = tokens / seconds
    return {
        "name": name,
        "flags": " ".join(flags),
        "steps_timed": len(timed),
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tps, 1),
        "peak_gib": round(max(r["peak_mem_gib"] for r in timed), 2),
        "peak_reserved_gib": round(max(r.get("peak_reserved_gib", 0.0) for r in timed), 2),
        "mfu_6nt": round(6 * N_PARAMS * tps / PEAK_FLOPS, 3),
        "final_loss": timed[-1]["loss"] if timed else None,
        "losses": [r["loss"] for r in rows if "step_seconds" in r],
        "wall_s": round(wall, 1),
        # the untimed warm-up steps one by one: compilation shows here
        "warm_step_seconds": [
            round(r["step_seconds"], 2) for r in rows if "step_seconds" in r and r["step"] <= warm
        ],
        "plan": plan,
    }


def run_peer(
    script: str, configs: str, pythonpath: str | None, label: str, args: argparse.Namespace
) -> list[dict]:
    """A peer script in a subprocess (its own PYTHONPATH); its `RESULT {json}` lines are collected."""
    cmd = [sys.executable, script, "--configs", configs, "--steps", str(args.warm + args.steps),
           "--warm", str(args.warm)]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=gpu_common.peer_env(pythonpath), timeout=args.timeout
        )
    except subprocess.TimeoutExpired as e:
        print(f"[{label}] timed out after {args.timeout} s:\n{str(e.stdout)[-2000:]}", flush=True)
        return []
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        print(f"[{label}] exit {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}", flush=True)
    return [{"name": f"peer_{label}_{r['name']}", "tokens_per_s": r["tokens_per_s"], "peak_gib": r["peak_gib"],
             "steps_timed": r["steps_timed"], "tokens": r["tokens"]} for r in results]  # fmt: skip


def print_table(rows: list[dict]) -> None:
    base = {
        r["name"]: r["tokens_per_s"] for r in rows if r["name"].startswith("peer_") and "tokens_per_s" in r
    }
    header = f"{'run':<24}{'tokens/s':>10}{'peak GiB':>10}{'reserved':>10}{'MFU(6NT)':>10}" + "".join(
        f"{'x ' + k.removeprefix('peer_'):>20}" for k in base
    )
    print(header)
    for r in rows:
        if r.get("failed"):
            print(f"{r['name']:<24}{'failed':>10}")
            continue
        ratios = "".join(f"{r['tokens_per_s'] / v:>20.2f}" for v in base.values())
        mfu = f"{r['mfu_6nt']:>10.3f}" if "mfu_6nt" in r else f"{'':>10}"
        reserved = f"{r['peak_reserved_gib']:>10.2f}" if r.get("peak_reserved_gib") else f"{'':>10}"
        spread = f"  (median of {r['runs']}: {r['range'][0]:.0f}-{r['range'][1]:.0f})" if "range" in r else ""
        print(
            f"{r['name']:<24}{r['tokens_per_s']:>10.0f}{r['peak_gib']:>10.2f}{reserved}{mfu}{ratios}{spread}"
        )


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per name: the run of median tokens/s (the lower middle of an even count), with
    `runs` and `range` (the lowest and highest tokens/s) added when the name ran more than once.
    Failed runs are left out of a name that has others; order follows each name's first row."""
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    out = []
    for runs in by_name.values():
        ok = sorted((r for r in runs if not r.get("failed")), key=lambda r: r["tokens_per_s"])
        if len(runs) == 1 or not ok:
            out.append(runs[0])
            continue
        speeds = [r["tokens_per_s"] for r in ok]
        out.append({**ok[(len(ok) - 1) // 2], "runs": len(runs), "range": [speeds[0], speeds[-1]]})
    return out


def compare_quality(a: dict, b: dict, window: int = 10) -> dict:
    """Loss curves of two runs on the same data and seed: the largest relative gap between their
    `window`-step moving averages, and between their means over the last `window` steps."""
    la, lb = a["losses"], b["losses"]
    n = min(len(la), len(lb))
    avg = lambda xs, i: sum(xs[i - window : i]) / window  # noqa: E731
    gaps = [abs(avg(la, i) - avg(lb, i)) / avg(lb, i) for i in range(window, n + 1)]
    return {
        "runs": [a["name"], b["name"]],
        "steps": n,
        "first_loss": [la[0], lb[0]],
        f"last_{window}_mean": [round(avg(la, n), 4), round(avg(lb, n), 4)],
        "last_gap": round(abs(avg(la, n) - avg(lb, n)) / avg(lb, n), 5),
        "max_window_gap": round(max(gaps), 5),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="default,plain", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warm", type=int, default=8, help="untimed warm-up steps (compilation happens here)")
    ap.add_argument(
        "--repeat", type=int, default=1, help="rounds of our variants, interleaved; the table shows medians"
    )
    ap.add_argument(
        "--quality-steps",
        type=int,
        default=0,
        help="instead: train `default` and `plain` this many steps on learnable data, compare losses",
    )
    ap.add_argument(
        "--quality-variants", default="default,plain", help="the two variants --quality-steps compares"
    )
    ap.add_argument("--model-dir", default="/tmp/l32_3b", help="built here if missing")
    ap.add_argument("--data-dir", default="/tmp/l32_chats", help="built here if missing")
    ap.add_argument("--workdir", default="/tmp/slackdist_bench")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per run")
    ap.add_argument("--peer", default=None, help="path of peer_trl_qlora.py to run beside ours")
    ap.add_argument("--peer-configs", default="seed,seed_liger")
    ap.add_argument("--peer-pythonpath", default=None, help="PYTHONPATH for the peer (its own packages)")
    ap.add_argument("--unsloth", default=None, help="path of peer_unsloth.py: Unsloth as another column")
    ap.add_argument("--unsloth-configs", default="d05", help="d05 = the recipe's LoRA dropout 0.05")
    ap.add_argument("--unsloth-pythonpath", default=None, help="PYTHONPATH with Unsloth's own site dir first")
    ap.add_argument("--json", default="bench/results/train_throughput.json")
    args = ap.parse_args()  # fmt: skip

    model = gpu_common.build_model_dir(args.model_dir)
    result: dict = {"gpu": gpu_common.gpu_name(), "date": time.strftime("%Y-%m-%d")}
    if args.quality_steps:
        data = gpu_common.write_dataset(args.data_dir + "_learnable", vocab=4000)
        runs = []
        for name in args.quality_variants.split(","):
            runs.append(run_ours(name, VARIANTS[name], args, model, data, warm=0, steps=args.quality_steps))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "losses"}), flush=True)
        result.update(
            rows=runs, quality=compare_quality(*runs) if not any(r.get("failed") for r in runs) else None
        )
        print(json.dumps(result["quality"]), flush=True)
    else:
        data = gpu_common.write_dataset(args.data_dir)
        rows = []
        for round_ in range(args.repeat):
            for name in args.variants.split(","):
                row = run_ours(name, VARIANTS[name], args, model, data, warm=args.warm, steps=args.steps)
                rows.append({**row, "round": round_})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
        if args.peer:
            rows.extend(run_peer(args.peer, args.peer_configs, args.peer_pythonpath, "trl", args))
        if args.unsloth:
            rows.extend(
                run_peer(args.unsloth, args.unsloth_configs, args.unsloth_pythonpath, "unsloth", args)
            )
        print(f"\nGPU: {gpu_common.gpu_name()}, {args.steps} steps timed after {args.warm} warm-up")
        medians = median_rows(rows)
        print_table(medians)
        result["rows"] = rows
        result["medians"] = [{k: v for k, v in r.items() if k != "losses"} for r in medians]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
