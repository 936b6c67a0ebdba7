"""Run `slackdist train` under each launch config on a Llama-3.2-3B-shaped model: train, preempt, resume, merge.

    python3 bench/gpu_train_matrix.py [--configs single_gpu,fsdp,fsdp_offload,deepspeed_zero3] [--steps 40]
        [--preempt-at 20] [--layers N] [--work /tmp/slackdist_matrix] [-- more slackdist train args]

On the GPU machine (bitsandbytes comes as a wheel, see ../shared/gpu/README.md):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/bitsandbytes-*.whl \
      && export PYTHONPATH=/tmp/site:$PWD && python3 bench/gpu_train_matrix.py

For each launch config, at `--num_processes N` (`--num-processes`, default 1) through `scripts/slurm_launch.sh --node` (the same per-node
command the SLURM scripts run, with `--resume auto`):
  1. train with 4-bit weights; when metrics.jsonl shows step `--preempt-at`, send SIGUSR1 (as SLURM would
     before the time limit): the run must checkpoint and exit 75;
  2. run the same command again: it resumes from that checkpoint and trains to `--steps`;
  3. `slackdist merge` the final adapter (bf16, sharded) and compare the merged model's logits with base +
     adapter on the GPU;
  4. record tokens/s (median over steps after warm-up, all steps of both runs), peak GPU memory, load and
     save times into $OUT/train_matrix.json (rewritten after each config), and copy each run's metrics.jsonl
     and log next to it.

The model, tokenizer and data come from bench/gpu_common.py: random init with the Llama-3.2-3B shape
(`--layers` fewer for a quick check), a word-level tokenizer with the Llama 3 special tokens at their real
ids and our chat template, and chat records of the peer's lognormal lengths (median ~200, max 2000).

deepspeed is not installed on the GPU machine: that config is recorded as skipped unless `import deepspeed`
works.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common  # noqa: E402  (the 3B-shaped model, its tokenizer and the synthetic chat data)

LAUNCH = REPO / "scripts" / "slurm_launch.sh"
PREEMPTED_EXIT_CODE = 75


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return entries


def launch(
    config: str, args: argparse.Namespace, data: Path, model: Path, out: Path, log: Path
) -> subprocess.Popen:
    env = {
        **os.environ,
        "LAUNCH_CONFIG": f"launch_configs/{config}.yaml",
        "GPUS_PER_NODE": str(args.num_processes),
        "SLURM_NNODES": "1",
    }
    train_args = [
        "--data",
        str(data),
        "--output",
        str(out),
        "--model",
        str(model),
        "--max-steps",
        str(args.steps),
        "--set",
        f"train.save_every_n_steps={args.save_every}",
        "--set",
        f"train.eval_every_n_steps={args.eval_every}",
        "--set",
        "train.eval_max_batches=4",
        "--set",
        f"train.micro_batch_size={args.micro_batch_size}",
        "--set",
        f"train.gradient_accumulation_steps={args.accumulation}",
        "--set",
        f"train.max_seq_len={args.max_seq_len}",
        *args.extra,
    ]
    handle = log.open("a", encoding="utf-8")
    return subprocess.Popen(
        ["bash", str(LAUNCH), "--node", "--", *train_args],
        cwd=REPO,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -9


def run_config(
    config: str, args: argparse.Namespace, data: Path, model: Path, results_dir: Path
) -> dict[str, Any]:
    out = Path(args.work) / f"out-{config}"
    shutil.rmtree(out, ignore_errors=True)
    log = results_dir / f"{config}.log"
    log.unlink(missing_ok=True)
    record: dict[str, Any] = {"config": config, "num_processes": args.num_processes}

    # 1. train until --preempt-at, then SIGUSR1 -> checkpoint -> exit 75
    start = time.perf_counter()
    proc = launch(config, args, data, model, out, log)
    deadline = time.monotonic() + args.timeout
    while proc.poll() is None and not any(m.get("step", 0) >= args.preempt_at for m in read_metrics(out)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
    record["preempt_exit"] = wait(proc, args.timeout)
    checkpoints = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    record["preempted_at_step"] = int(checkpoints[-1].name.removeprefix("step-")) if checkpoints else None
    record["run1_s"] = round(time.perf_counter() - start, 1)
    if record["preempt_exit"] != PREEMPTED_EXIT_CODE:
        record["error"] = (
            f"first run exited {record['preempt_exit']} (expected {PREEMPTED_EXIT_CODE}); see {log.name}"
        )
        return record

    # 2. the same command again resumes (--resume auto) and finishes
    start = time.perf_counter()
    record["resume_exit"] = wait(launch(config, args, data, model, out, log), args.timeout)
    record["run2_s"] = round(time.perf_counter() - start, 1)
    metrics = read_metrics(out)
    shutil.copyfile(out / "metrics.jsonl", results_dir / f"{config}.metrics.jsonl")
    steps = [m for m in metrics if "loss" in m]
    record["steps"] = len(steps)
    record["final_loss"] = steps[-1]["loss"] if steps else None
    # leave out the warm-up steps of both processes
    resumed_at = record["preempted_at_step"]
    warm = [
        m["tokens_per_s"] for m in steps if m["step"] > args.warmup and not 0 < m["step"] - resumed_at <= 2
    ]
    record["tokens_per_s_median"] = round(statistics.median(warm), 1) if warm else None
    record["tokens_per_step"] = args.micro_batch_size * args.accumulation * args.max_seq_len
    record["peak_mem_gib"] = round(max((m["peak_mem_gib"] for m in steps), default=0.0), 2)
    record["eval_loss"] = [m["eval_loss"] for m in metrics if "eval_loss" in m][-1:] or None
    record["checkpoint_gib"] = (
        round(
            max(
                (
                    sum(f.stat().st_size for f in c.rglob("*") if f.is_file())
                    for c in (out / "checkpoints").iterdir()
                ),
                default=0,
            )
            / 2**30,
            3,
        )
        if (out / "checkpoints").is_dir()
        else None
    )
    if record["resume_exit"] != 0:
        record["error"] = f"resumed run exited {record['resume_exit']}; see {log.name}"
        return record

    # 3. merge, then compare merged logits with base + adapter
    merged = Path(args.work) / f"merged-{config}"
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "slackdist",
            "merge",
            "--adapter",
            str(out),
            "--output",
            str(merged),
            "--dtype",
            "bf16",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    record["merge_s"] = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        record["error"] = "merge failed: " + proc.stderr[-1500:]
        return record
    record["merged_safetensors_files"] = len(list(merged.glob("*.safetensors")))
    record["merged_vs_adapter_max_abs_logit_diff"] = compare_merged(model, out, merged)
    if not args.keep:
        shutil.rmtree(merged, ignore_errors=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return record


def compare_merged(base: Path, adapter: Path, merged: Path) -> float | None:
    """Max |logit difference| between the merged model and base + adapter (bf16, on the GPU if present)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.randint(1000, 120000, (1, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16, device_map={"": device})
        merged_logits = m(input_ids=ids).logits.float()
        del m
        p = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map={"": device}),
            str(adapter),
        )
        ref = p(input_ids=ids).logits.float()
        del p
    if device == "cuda":
        torch.cuda.empty_cache()
    return round(float((merged_logits - ref).abs().max()), 4)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="single_gpu,fsdp,fsdp_offload,deepspeed_zero3")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps in all (>= 30)")
    parser.add_argument("--preempt-at", type=int, default=20, help="send SIGUSR1 once this step is logged")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the tokens/s median")
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--num-processes", type=int, default=1, help="GPUs (processes) per run")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 28, the 3B shape)")
    parser.add_argument("--train-conversations", type=int, default=1500)
    parser.add_argument("--work", default="/tmp/slackdist_matrix")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints and merged models")
    parser.add_argument("extra", nargs="*", help="more `slackdist train` arguments (after --)")
    args = parser.parse_args()

    results_dir = Path(os.environ.get("OUT", Path(args.work) / "results"))
    results_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = gpu_common.build_model_dir(work / f"model-l{args.layers or 28}", layers=args.layers)
    data = gpu_common.write_dataset(work / "data", train=args.train_conversations, validation=32)
    setup_s = round(time.perf_counter() - t0, 1)
    results: dict[str, Any] = {"layers": args.layers or 28, "setup_s": setup_s, "runs": []}
    try:
        import torch

        results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        results["torch"] = torch.__version__
    except ImportError:
        pass
    for config in args.configs.split(","):
        if config == "deepspeed_zero3":
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                results["runs"].append({"config": config, "skipped": "deepspeed is not installed"})
                continue
        record = run_config(config, args, data, model, results_dir)
        print("RESULT", json.dumps(record), flush=True)
        results["runs"].append(record)
        (results_dir / "train_matrix.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (results_dir / "train_matrix.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    return 0 if all("error" not in r for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
