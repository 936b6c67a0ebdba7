"""Time from command to adapter: `slackdist train` with default flags beside the TRL SFTTrainer recipe.

What a user waits for is the whole process, not the steady speed: start-up, loading and quantizing
the base, planning, compiling, the steps, evals and saves. This script times `python -m slackdist
train --model M --data D --output O` from launch to exit (the adapter is saved) and, on the same
prepared records, the TRL recipe a user writes from TRL's docs (`../shared/gpu/peer_trl_e2e.py`:
QLoRA NF4, r 64, packing, assistant-only loss, micro-batch 2 x accumulation 2, 3 epochs), each in its
own process, and prints a table with our phase breakdown (from the `phases` entry training writes to
metrics.jsonl).

    # here, on a CPU: prepare the datasets (a real export and a synthetic one) and a BPE tokenizer
    python bench/time_to_model.py prepare --work .gpu/ttm \\
        --export houston=../shared/slack_exports/houstondatavis_2016 --synthetic-messages 7000
    # on the GPU machine (carry .gpu, .whl and .peer)
    python3 bench/time_to_model.py run --work .gpu/ttm --peer .peer/peer_trl_e2e.py --json $OUT/ttm.json

The model is Llama-3.2-3B-shaped with random weights (no weights can be downloaded there) and a
byte-level BPE tokenizer trained on the prepared records, so real Slack text gives real token counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common  # noqa: E402

# `slackdist train` flags on top of `--model --data --output` (nothing else: the user's command).
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "compile_on": ["--compile", "on"],  # and so FP8 base matmuls on a GPU with FP8 tensor cores
    "compile_off": ["--compile", "off"],
}
PHASES = ("start-up", "data", "load", "plan", "wrap", "steps", "warm-up", "eval", "best adapter",
          "checkpoints", "clear cache", "final save")  # fmt: skip
TOKENIZER_VOCAB = 32000


# ---------------------------------------------------------------- prepare (CPU)


def record_texts(data_dir: Path) -> list[str]:
    """Every message content of a prepared dataset's records."""
    texts = []
    for split in ("train", "validation", "test"):
        for line in (data_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            texts.extend(m["content"] for m in json.loads(line)["messages"])
    return texts


def prepare(args: argparse.Namespace) -> None:
    """Prepared datasets under WORK/data/<name> and the tokenizer under WORK/tokenizer."""
    import prepare_bench

    from slackdist.model.tiny import build_tiny_tokenizer

    work = Path(args.work)
    exports = dict(spec.split("=", 1) for spec in args.export)
    if args.synthetic_messages:
        synthetic = work / "exports" / "synthetic"
        if not synthetic.exists():
            prepare_bench.generate_export(synthetic, args.synthetic_messages, seed=1)
        exports["synthetic"] = str(synthetic)
    for name, export in exports.items():
        out = work / "data" / name
        if not out.exists():
            subprocess.run(["slackdist", "prepare", export, "--out", str(out)], check=True)
    corpus = [t for name in exports for t in record_texts(work / "data" / name)]
    tokenizer = build_tiny_tokenizer(TOKENIZER_VOCAB, corpus=corpus)
    tokenizer.save_pretrained(work / "tokenizer")
    for name in exports:
        ids = tokenizer(record_texts(work / "data" / name), add_special_tokens=False)["input_ids"]
        print(f"{name}: {sum(map(len, ids)):,} content tokens in all splits; tokenizer of {len(tokenizer)}")


# ---------------------------------------------------------------- run (GPU)


def user_env(pythonpath: str | None = None) -> dict[str, str]:
    """A timed process's environment: this one's (with a peer's own PYTHONPATH when given), as a user's is.

    The GPU machine sets PYTHONDONTWRITEBYTECODE=1 and ships torch without bytecode, so there every
    process would compile torch's Python source again, at import and in torch.compile's lazily imported
    modules (15-20 s of start-up against 3-5 s; 2026-12-07). A user's pip install leaves bytecode, and
    Python writes what is missing on the first import: so does every process timed here.
    """
    env = dict(gpu_common.peer_env(pythonpath) or os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_ours(name: str, model: Path, data: Path, work: Path, timeout: float) -> dict:
    out = work / "runs" / f"{data.name}_{name}"
    cmd = [sys.executable, "-m", "slackdist", "train", "--model", str(model), "--data", str(data),
           "--output", str(out), *VARIANTS[name]]  # fmt: skip
    subprocess.run(["rm", "-rf", str(out)], check=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=user_env(), timeout=timeout)
    wall = time.perf_counter() - started
    row = {"data": data.name, "run": name, "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"[{data.name} {name}] FAILED (exit {proc.returncode}):\n{tail}", flush=True)
        return {**row, "failed": True, "error": tail[-600:]}
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in entries if "step_seconds" in e]
    phases = next((e["phases"] for e in reversed(entries) if "phases" in e), {})
    notes = [line for line in proc.stderr.splitlines() if "memory plan:" in line or "compile:" in line]
    return {
        **row,
        "steps": steps[-1]["step"] if steps else 0,
        "tokens": sum(e["input_tokens"] for e in steps),
        "final_loss": steps[-1]["loss"] if steps else None,
        "peak_gib": max((e["peak_mem_gib"] for e in steps), default=0.0),
        "phases": phases,
        "notes": notes,
    }


def run_peer(
    script: str, model: Path, data: Path, work: Path, pythonpath: str | None, timeout: float
) -> dict:
    out = work / "runs" / f"{data.name}_trl"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, script, str(model), str(data), str(out)], capture_output=True,
                          text=True, env=user_env(pythonpath), timeout=timeout)  # fmt: skip
    wall = time.perf_counter() - started
    result = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    row = {"data": data.name, "run": "trl", "wall_s": round(wall, 1)}
    if proc.returncode != 0 or not result:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"[{data.name} trl] FAILED (exit {proc.returncode}):\n{tail}", flush=True)
        return {**row, "failed": True, "error": tail[-600:]}
    return {**row, **{k: result[0][k] for k in ("train_s", "steps", "train_loss", "peak_gib")}}


def print_table(rows: list[dict]) -> None:
    trl = {r["data"]: r["wall_s"] for r in rows if r["run"] == "trl" and not r.get("failed")}
    print(f"\n{'data':<11}{'run':<13}{'wall s':>8}{'x TRL':>7}{'steps':>7}  phases (s)")
    for r in rows:
        if r.get("failed"):
            print(f"{r['data']:<11}{r['run']:<13}{'failed':>8}")
            continue
        ratio = f"{trl[r['data']] / r['wall_s']:>7.2f}" if r["data"] in trl else f"{'':>7}"
        phases = r.get("phases") or {}
        detail = ", ".join(f"{k} {phases[k]:.1f}" for k in PHASES if phases.get(k))
        if r["run"] == "trl":
            detail = f"train() {r['train_s']:.1f}"
        print(f"{r['data']:<11}{r['run']:<13}{r['wall_s']:>8.1f}{ratio}{r.get('steps', 0):>7}  {detail}")


def warm_imports(peer: str | None, peer_pythonpath: str | None) -> dict[str, float]:
    """Import what each tool imports once, untimed, before any timed run; return the seconds each took.

    A user's installed packages have their bytecode compiled (pip compiles at install) and a second launch
    finds them in the page cache. The GPU machine's wheels are installed with `--no-compile` (and torch
    there has no bytecode), so without this the first timed process (ours) would also compile every
    module it imports and write its bytecode (`user_env`), and the next one would not.
    """
    # what `slackdist train` imports, at start-up and later (the optimizer; the loss plot at the end)
    ours = (
        "import slackdist.cli, slackdist.train.recipe, bitsandbytes.optim\n"
        "try: import matplotlib.pyplot\n"
        "except ImportError: pass"
    )
    imports = [("ours", ours, user_env())]
    if peer:
        imports.append(
            (
                "trl",
                "import trl, datasets, peft; from trl import SFTTrainer",
                user_env(peer_pythonpath),
            )
        )
    seconds = {}
    for name, code, env in imports:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        seconds[name] = round(time.perf_counter() - started, 1)
        print(f"first import ({name}, untimed): {seconds[name]} s, exit {proc.returncode}", flush=True)
    return seconds


def run(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    work = Path(args.work)
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    model = gpu_common.build_model_dir(args.model_dir, tokenizer=tokenizer)
    rows: list[dict] = []
    first_imports = warm_imports(args.peer, args.peer_pythonpath)

    def keep(row: dict) -> None:  # written after every run: a call cut short still returns what ran
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        result = {
            "gpu": gpu_common.gpu_name(),
            "date": time.strftime("%Y-%m-%d"),
            "first_imports_s": first_imports,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(result, indent=1))

    for data in [work / "data" / n for n in args.datasets.split(",")]:
        for name in args.variants.split(","):  # a name given twice runs twice (a warm compile cache)
            keep(run_ours(name, model, data, work, args.timeout))
        if args.peer:
            keep(run_peer(args.peer, model, data, work, args.peer_pythonpath, args.timeout))
    print(f"\nGPU: {gpu_common.gpu_name()}; wall = launch to exit (adapter saved), each run its own process")
    print_table(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="CPU: prepared datasets + tokenizer under --work")
    p.add_argument("--work", required=True)
    p.add_argument("--export", action="append", default=[], help="NAME=EXPORT_DIR (repeatable)")
    p.add_argument("--synthetic-messages", type=int, default=0, help="also a synthetic export of N messages")
    r = sub.add_parser("run", help="GPU: time ours and the peer on each prepared dataset")
    r.add_argument("--work", required=True)
    r.add_argument("--datasets", default="houston,synthetic")
    r.add_argument("--variants", default="default", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    r.add_argument("--model-dir", default="/tmp/ttm_3b", help="3B-shaped model, built here if missing")
    r.add_argument("--peer", default=None, help="path of peer_trl_e2e.py")
    r.add_argument("--peer-pythonpath", default=None)
    r.add_argument("--timeout", type=float, default=400, help="seconds per run")
    r.add_argument("--json", default="bench/results/time_to_model.json")
    args = ap.parse_args()
    prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
