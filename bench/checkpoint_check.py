"""Do FSDP and DeepSpeed checkpoints hold only what trains, and does resuming from one equal the run it came from?

    python3 bench/checkpoint_check.py --out $OUT/checkpoint_check.json
        [--configs fsdp1,fsdp2,deepspeed_zero3] [--steps 8] [--save-at 4] [--layers 2] [--max-seq-len 512]
    python3 bench/checkpoint_check.py --configs cpu --tiny --out /tmp/checkpoint_check.json   (the same flow on a CPU)

On the GPU machine (bitsandbytes, and deepspeed for its row, come as wheels: bench/README.md), one GPU:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD && python3 bench/checkpoint_check.py --out $OUT/checkpoint_check.json

For each config, with `--num_processes 1`, through `accelerate launch --config_file launch_configs/<file>
--num_processes 1 -m slackdist train` on a Llama-3.2-3B-shaped model cut to `--layers` decoder layers (4-bit
NF4 + LoRA r64 on the seven projections and the tied LM head, LoRA dropout on), micro-batch 2 x accumulation
2 rows of `--max-seq-len` tokens of learnable synthetic chats:

  1. the uninterrupted run: `--steps` optimizer steps, a checkpoint every `--save-at` steps;
  2. its step-`--save-at` checkpoint copied into a fresh output folder, and the same command with
     `--resume auto`: it trains the remaining steps;
  3. compared: the loss of every resumed step with the uninterrupted run's, and the LoRA weights of both runs'
     last checkpoints: how far the resumed run's are from the uninterrupted run's, relative to how far the
     uninterrupted run moved them after the step-`--save-at` checkpoint (a resume that lost the optimizer's moments or the dropout RNG
     moves them differently by far more than 1%);
  4. the checkpoint: its manifest verifies; its size beside the adapter's and the base model's; its sharded
     model state (DCP `trainable/`, DeepSpeed's module states) holds LoRA tensors only.

Configs: fsdp1 = launch_configs/fsdp.yaml; fsdp2 = fsdp.yaml with `--fsdp_version 2
--fsdp_reshard_after_forward true` (as that file's header says); deepspeed_zero3 =
launch_configs/deepspeed_zero3.yaml (reported as skipped when deepspeed is not importable); fsdp_offload,
single_gpu and cpu (with `--tiny`) on request. Configs not started within `--budget` seconds are reported as
skipped (each training run is killed after `--timeout`), so the whole check fits one call of the GPU tool. A config that fails is recorded with its error and the tail of its log; the
others still run. It prints a `RESULT {json}` line per config, rewrites the JSON after each one, and ends with
a table. Exit code 0 when every config that ran passed.

Pass: every resumed step's loss within 1e-3 (relative) of the uninterrupted run's, the weights within 1% of
the post-checkpoint update, the manifest verifies, no non-LoRA tensor in the model state, and the checkpoint's
training state (all but tokenizer and config files) at most 6x the adapter: LoRA weights, their copy in the
sharded state and two Adam moments make 4x, DeepSpeed's bf16 module copy a little more; the frozen base
would add the whole 4-bit model. GPU kernels (attention backward) are not bitwise deterministic, hence the
tolerances; on the CPU the runs agree exactly.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))
import gpu_common  # noqa: E402  (the 3B-shaped model, its tokenizer and the synthetic chat data)

# name -> (launch config, extra `accelerate launch` flags, needs CUDA)
CONFIGS: dict[str, tuple[str, list[str], bool]] = {
    "fsdp1": ("fsdp.yaml", [], True),
    "fsdp2": ("fsdp.yaml", ["--fsdp_version", "2", "--fsdp_reshard_after_forward", "true"], True),
    "deepspeed_zero3": ("deepspeed_zero3.yaml", [], True),
    "fsdp_offload": ("fsdp_offload.yaml", [], True),
    "single_gpu": ("single_gpu.yaml", [], True),
    "cpu": ("cpu.yaml", [], False),
}
LOSS_RTOL = 1e-3
UPDATE_RTOL = 1e-2
MAX_STATE_PER_ADAPTER = 6.0
# Files every model folder carries (tokenizer, config): not training state.
DESCRIPTION_PREFIXES = ("tokenizer", "special_tokens", "chat_template", "slackdist_", "manifest")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_losses(out: Path) -> dict[int, float]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    losses = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in entry:
            losses[int(entry["step"])] = float(entry["loss"])
    return losses


def train_command(config: str, args: argparse.Namespace, model: Path, data: Path, out: Path) -> list[str]:
    launch_config, flags, _ = CONFIGS[config]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(REPO / "launch_configs" / launch_config), "--num_processes", "1"]
    launch += ["--main_process_port", str(free_port()), *flags]
    settings = {
        "train.save_every_n_steps": args.save_at,
        "train.keep_last_n_checkpoints": 4,
        "train.eval_every_n_steps": 0,
        "train.eval_max_batches": 2,
        "train.micro_batch_size": 2,
        "train.gradient_accumulation_steps": 2,
        "train.max_seq_len": args.max_seq_len,
        "train.memory_plan": "fixed",
    }
    train = ["-m", "slackdist", "train", "--data", str(data), "--output", str(out), "--model", str(model)]
    train += ["--max-steps", str(args.steps)]
    for key, value in settings.items():
        train += ["--set", f"{key}={value}"]
    return [*launch, *train]


def run(command: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run one training command (own process group, output appended to `log`); (exit code, seconds)."""
    start = time.perf_counter()
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -9
    return code, round(time.perf_counter() - start, 1)


def folder_bytes(folder: Path, *, training_state_only: bool = False) -> int:
    return sum(
        p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and not (training_state_only and p.name.startswith(DESCRIPTION_PREFIXES))
    )


def sharded_model_keys(checkpoint: Path) -> tuple[list[str], str]:
    """The model-state tensor names a checkpoint's sharded state holds, and where they were read."""
    trainable = checkpoint / "trainable"
    if trainable.is_dir():
        import torch.distributed.checkpoint as dcp

        keys = dcp.FileSystemReader(str(trainable)).read_metadata().state_dict_metadata.keys()
        return sorted(k.removeprefix("model.") for k in keys if k.startswith("model.")), "trainable/.metadata"
    module_states = sorted(checkpoint.glob("pytorch_model/*model_states.pt"))
    if module_states:
        import torch

        keys: set[str] = set()
        for path in module_states:
            module = torch.load(path, map_location="cpu", weights_only=False).get("module") or {}
            keys.update(module)
        return sorted(keys), ", ".join(p.name for p in module_states)
    return [], "no sharded model state (the adapter file holds the weights)"


def compare_weights(reference: Path, resumed: Path, at_checkpoint: Path) -> dict[str, float]:
    """max over LoRA tensors of |resumed - reference| / |reference - at checkpoint| (norms), and the largest
    absolute difference."""
    from safetensors.torch import load_file

    ref, res, before = (
        load_file(p / "adapter_model.safetensors") for p in (reference, resumed, at_checkpoint)
    )
    if ref.keys() != res.keys():
        raise RuntimeError(f"the resumed adapter has other tensors ({len(res)} vs {len(ref)})")
    worst, max_abs = 0.0, 0.0
    for key in ref:
        a, b, c = ref[key].double(), res[key].double(), before[key].double()
        moved = float((a - c).norm())
        worst = max(worst, float((b - a).norm()) / max(moved, 1e-12))
        max_abs = max(max_abs, float((b - a).abs().max()))
    return {"update_rel_diff": worst, "max_abs_weight_diff": max_abs, "tensors": len(ref)}


def check_config(
    config: str, args: argparse.Namespace, model: Path, data: Path, results_dir: Path
) -> dict[str, Any]:
    from slackdist.train.manifest import verify_checkpoint

    work = Path(args.work) / config
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = results_dir / f"checkpoint_check_{config}.log"
    log.unlink(missing_ok=True)
    full = work / "uninterrupted"
    command = train_command(config, args, model, data, full)
    record: dict[str, Any] = {"config": config, "command": " ".join(command)}

    # 1. uninterrupted
    code, record["uninterrupted_s"] = run(command, log, args.timeout)
    checkpoint = full / "checkpoints" / f"step-{args.save_at:06d}"
    if code != 0 or not checkpoint.is_dir():
        raise RuntimeError(f"the uninterrupted run exited {code} without {checkpoint.name}")

    # 4. what the checkpoint holds
    manifest = verify_checkpoint(checkpoint)
    record.update(backend=manifest.backend, layout=manifest.layout, checkpoint_files=sorted(manifest.files))
    adapter = (checkpoint / "adapter_model.safetensors").stat().st_size
    state = folder_bytes(checkpoint, training_state_only=True)
    try:
        keys, source = sharded_model_keys(checkpoint)
    except Exception as e:  # e.g. DeepSpeed's files need deepspeed's classes to unpickle
        keys, source = [], f"unreadable ({type(e).__name__}: {e})"
    record.update(
        entries_mib={
            p.name: round((folder_bytes(p) if p.is_dir() else p.stat().st_size) / 2**20, 2)
            for p in sorted(checkpoint.iterdir())
        },
        checkpoint_mib=round(folder_bytes(checkpoint) / 2**20, 1),
        training_state_mib=round(state / 2**20, 1),
        adapter_mib=round(adapter / 2**20, 1),
        base_model_mib=round(folder_bytes(model) / 2**20, 1),
        state_per_adapter=round(state / adapter, 2),
        sharded_model_keys=len(keys),
        sharded_model_keys_source=source,
        non_lora_keys=[k for k in keys if ".lora_" not in k][:5],
    )

    # 2. resume from the step-k checkpoint in a fresh folder
    resumed = work / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoints" / checkpoint.name)
    command = [*train_command(config, args, model, data, resumed), "--resume", "auto"]
    code, record["resumed_s"] = run(command, log, args.timeout)
    if code != 0:
        raise RuntimeError(f"the resumed run exited {code}")

    # 3. compare
    reference, again = read_losses(full), read_losses(resumed)
    last = (
        Path("checkpoints") / f"step-{args.steps:06d}"
    )  # the last weights (OUT's root may hold the best eval's)
    expected = [s for s in sorted(reference) if s > args.save_at]
    if sorted(again) != expected:
        raise RuntimeError(f"the resumed run logged steps {sorted(again)}, expected {expected}")
    gaps = [abs(again[s] - reference[s]) / max(abs(reference[s]), 1e-12) for s in expected]
    record.update(
        resumed_steps=len(expected),
        losses={s: [reference[s], again[s]] for s in expected},
        max_loss_rel_diff=max(gaps),
        **compare_weights(full / last, resumed / last, checkpoint),
    )
    problems = []
    if record["max_loss_rel_diff"] > LOSS_RTOL:
        problems.append(f"loss differs by {record['max_loss_rel_diff']:.2e} (> {LOSS_RTOL:g})")
    if record["update_rel_diff"] > UPDATE_RTOL:
        problems.append(
            f"weights differ by {record['update_rel_diff']:.2%} of the update (> {UPDATE_RTOL:.0%})"
        )
    if record["non_lora_keys"]:
        problems.append(f"non-LoRA tensors in the model state: {record['non_lora_keys']}")
    if record["state_per_adapter"] > MAX_STATE_PER_ADAPTER:
        problems.append(
            f"training state is {record['state_per_adapter']}x the adapter (> {MAX_STATE_PER_ADAPTER:g}x)"
        )
    record["passed"] = not problems
    if problems:
        record["error"] = "; ".join(problems)
    return record


def print_table(results: list[dict[str, Any]]) -> None:
    header = (
        f"{'config':<16} {'status':<7} {'layout':<9} {'resumed':>7} {'max Δloss':>10} {'Δw/update':>10} "
        f"{'ckpt MiB':>9} {'state MiB':>9} {'adapter':>8} {'base MiB':>9} {'non-LoRA':>8} {'s':>6}"
    )
    print(header)
    for r in results:
        if "skipped" in r or "resumed_steps" not in r:
            status = "skipped" if "skipped" in r else "FAILED"
            print(f"{r['config']:<16} {status:<7} {r.get('skipped') or r.get('error', '')}")
            continue
        print(
            f"{r['config']:<16} {'ok' if r['passed'] else 'FAILED':<7} {r['layout']:<9} {r['resumed_steps']:>7} "
            f"{r['max_loss_rel_diff']:>10.2e} {r['update_rel_diff']:>10.2e} {r['checkpoint_mib']:>9.1f} "
            f"{r['training_state_mib']:>9.1f} {r['adapter_mib']:>8.1f} {r['base_model_mib']:>9.1f} "
            f"{len(r['non_lora_keys']):>8} {r['uninterrupted_s'] + r['resumed_s']:>6.0f}"
        )
        if not r["passed"]:
            print(f"{'':<16} {r['error']}")


def skip_reason(config: str) -> str | None:
    needs_cuda = CONFIGS[config][2]
    if needs_cuda:
        import torch

        if not torch.cuda.is_available():
            return "needs a CUDA GPU"
    if config == "deepspeed_zero3" and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not importable"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON results file (rewritten after each config)")
    parser.add_argument("--configs", default="fsdp1,fsdp2,deepspeed_zero3", help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of the uninterrupted run")
    parser.add_argument("--save-at", type=int, default=4, help="checkpoint every N steps; resume from step N")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 3B-shaped model")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead (for a CPU run)")
    parser.add_argument("--work", default="/tmp/slackdist_checkpoint_check")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per training run")
    parser.add_argument(
        "--budget", type=float, default=330, help="seconds after which configs not yet started are skipped"
    )
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not 0 < args.save_at < args.steps:
        parser.error(f"unknown configs {unknown}" if unknown else "need 0 < --save-at < --steps")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.tiny:
        from slackdist.model.tiny import write_tiny_model

        model = work / "model-tiny"
        if not (model / "config.json").is_file():
            write_tiny_model(model)
    else:
        model = gpu_common.build_model_dir(work / f"model-l{args.layers}", layers=args.layers)
    data = gpu_common.write_dataset(work / "data", train=200, validation=16, vocab=2000)
    results: dict[str, Any] = {
        "device": gpu_common.gpu_name(),
        "model": "tiny" if args.tiny else f"Llama-3.2-3B shape, {args.layers} layers",
        "steps": args.steps,
        "save_at": args.save_at,
        "max_seq_len": args.max_seq_len,
        "setup_s": round(time.perf_counter() - t0, 1),
        "runs": [],
    }
    for config in configs:
        reason = skip_reason(config)
        if reason is None and time.perf_counter() - t0 > args.budget:
            reason = f"the --budget of {args.budget:g} s was spent before it started"
        if reason:
            record: dict[str, Any] = {"config": config, "skipped": reason}
        else:
            try:
                record = check_config(config, args, model, data, out.parent)
            except Exception as e:  # one config's failure must not stop the others
                log = out.parent / f"checkpoint_check_{config}.log"
                tail = log.read_text(encoding="utf-8", errors="replace")[-3000:] if log.is_file() else ""
                record = {
                    "config": config,
                    "passed": False,
                    "error": f"{type(e).__name__}: {e}",
                    "log_tail": tail,
                }
        print("RESULT", json.dumps(record), flush=True)
        results["runs"].append(record)
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print()
    print_table(results["runs"])
    return 0 if all(r.get("passed", True) for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
