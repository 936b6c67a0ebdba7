"""Training data start-up and memory: the JSONL reader (a code tree from before) vs the `datasets` layer.

    python bench/data_bench.py --model /tmp/smol --baseline /tmp/base        # 1,000,000 messages
    python bench/data_bench.py --prepared data/prepared --model DIR --baseline DIR --json /tmp/d.json

Prepares a deterministic synthetic export once (`bench/prepare_bench.py`'s generator, then
`slackdist prepare` with its defaults; not timed), or takes `--prepared DIR`. Then each row runs in
its own process what `slackdist train` runs before its first step — the tokenizer, then
`slackdist.train.batches.load_training_examples` on the prepared folder and the first epoch's
packing — and then builds the micro-batches of 300 optimizer steps exactly as the loop does
(`Epoch` rows -> `make_step_inputs`, 2 x 2 rows of 2048 tokens a step):

- `baseline tree`: the code tree `--baseline` (this repository before a change; first, 7627c91: JSON Lines read into
  Python lists, tokenized every run);
- `datasets, first run`: this tree with an empty `datasets` cache (JSONL -> Arrow, then tokenized
  with `Dataset.map`, written to the cache);
- `datasets, second run`: the same again (both found in the cache by fingerprint);
- `save_to_disk folder, first run`: the records written once with `DatasetDict.save_to_disk`
  (not timed) and read from there with an empty cache: what writing Arrow beside the JSONL in
  `prepare` would save on a first run.

Reported: seconds to the first step (imports included) and for the data alone, the main process's
resident memory after the data is loaded (all of it, and its anonymous part, which excludes the
memory-mapped Arrow files the page cache holds), the peak resident memory of the process tree
(tokenizing workers included, sampled every 20 ms), the data handling per optimizer step, tokens per
step, and a SHA-256 of every row fed in those steps (token ids, labels, positions): equal digests
mean the loop trains on the same batches in the same order.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "data_bench.json"
STEPS = 300
MAX_SEQ_LEN = 2048

# Runs in the child under PYTHONPATH=<code tree>: only names both trees have.
_CHILD = r"""
import hashlib, json, sys, time
T0 = time.perf_counter()
import numpy as np
from accelerate import Accelerator
from slackdist.config import load_config
from slackdist.model.load import load_tokenizer
from slackdist.train.batches import Epoch, load_training_examples, rank_steps
from slackdist.train.distributed import Topology
from slackdist.train.step import make_step_inputs

def memory():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon")}

data, model, max_seq_len, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = load_config(overrides={"train.data_dir": data, "model.base_model": model, "train.max_seq_len": max_seq_len})
tokenizer = load_tokenizer(model)
accelerator = Accelerator(cpu=True)
before = memory()
t1 = time.perf_counter()
train, val = load_training_examples(cfg.train, tokenizer, accelerator)
epoch = Epoch(train, index=0, t=cfg.train)
t2 = time.perf_counter()
after = memory()
topology = Topology.of(accelerator)
t3 = time.perf_counter()
done = tokens = 0
digest = hashlib.sha256()  # of every row fed, in order: the same batches in both trees
for micro in rank_steps(epoch, rows_per_forward=2, accumulation=2, topology=topology):
    inputs = make_step_inputs(micro, pad_id=tokenizer.pad_token_id, device=accelerator.device, varlen=False)
    tokens += inputs.input_tokens
    for row in (row for rows in micro for row in rows):
        for ints in (row.input_ids, row.labels, row.position_ids):
            digest.update(np.asarray(ints, dtype=np.int64).tobytes())
    done += 1
    if done == steps:
        break
t4 = time.perf_counter()
print(json.dumps({
    "to_first_step_s": t2 - T0, "data_s": t2 - t1, "conversations": len(train), "validation": len(val),
    "rows": len(epoch), "rss_before_data": before["VmRSS"], "rss_after_data": after["VmRSS"],
    "anon_before_data": before["RssAnon"], "anon_after_data": after["RssAnon"],
    "step_data_us": 1e6 * (t4 - t3) / done, "steps_measured": done, "tokens_per_step": tokens / done,
    "batches_sha256": digest.hexdigest(),
}))
"""


def run_child(code: Path, data: Path, model: Path, cache: Path) -> dict:
    """One row: the child under `code` with the `datasets` cache in `cache`; peak RSS of its process tree.

    Raises:
        RuntimeError: the child failed.
    """
    import psutil

    env = {**os.environ, "PYTHONPATH": str(code), "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env["TQDM_DISABLE"] = "1"
    start = time.perf_counter()
    # Output goes to files: progress bars would fill a pipe nobody reads while the child runs.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(data), str(model), str(MAX_SEQ_LEN), str(STEPS)],
            cwd=code,
            stdout=out,
            stderr=err,
            text=True,
            env=env,
        )
        peak, ps = 0, psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"child ({code}) failed:\n{stderr[-3000:]}")
    row = json.loads(stdout.strip().splitlines()[-1])
    row["peak_rss_tree"] = peak
    row["wall_s"] = time.perf_counter() - start
    return row


def prepare_export(workdir: Path, messages: int) -> Path:
    """Generate the synthetic export and `slackdist prepare` it with the defaults (not timed)."""
    sys.path.insert(0, str(REPO / "bench"))
    from prepare_bench import generate_export

    export, prepared = workdir / "export", workdir / "prepared"
    if not (prepared / "train.jsonl").is_file():
        if not export.is_dir():
            generate_export(export, messages)
        subprocess.run(
            [sys.executable, "-m", "slackdist", "prepare", str(export), "--out", str(prepared)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"},
            check=True,
            capture_output=True,
        )
    return prepared


def save_to_disk_copy(prepared: Path, target: Path) -> Path:
    """The prepared JSONL as a `DatasetDict.save_to_disk` folder (a throwaway cache; not timed)."""
    from datasets import DatasetDict, load_dataset

    if not (target / "dataset_dict.json").is_file():
        with tempfile.TemporaryDirectory() as cache:
            files = {s: str(prepared / f"{s}.jsonl") for s in ("train", "validation", "test")}
            splits = {
                s: load_dataset("json", data_files=f, split="train", cache_dir=cache)
                for s, f in files.items()
            }
            DatasetDict(splits).save_to_disk(str(target))
    return target


def run(args: argparse.Namespace) -> dict:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="data_bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    prepared = args.prepared or prepare_export(workdir, args.messages)
    report = json.loads((prepared / "report.json").read_text(encoding="utf-8"))
    caches = {name: workdir / f"cache-{name}" for name in ("baseline", "datasets", "saved")}
    for cache in caches.values():
        shutil.rmtree(cache, ignore_errors=True)
    saved = save_to_disk_copy(prepared, workdir / "saved")
    rows = []
    plan = [
        ("baseline tree", args.baseline, prepared, caches["baseline"]),
        ("datasets, first run", REPO, prepared, caches["datasets"]),
        ("datasets, second run", REPO, prepared, caches["datasets"]),
        ("save_to_disk folder, first run", REPO, saved, caches["saved"]),
    ]
    for name, code, data, cache in plan:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.append({"path": name, "code": str(code), **run_child(code, data, args.model, cache)})
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} before the run",
        "messages": report["totals"]["messages"],
        "splits": report["totals"]["splits"],
        "jsonl_bytes": sum((prepared / f"{s}.jsonl").stat().st_size for s in ("train", "validation", "test")),
        "model": str(args.model),
        "max_seq_len": MAX_SEQ_LEN,
        "rows": rows,
    }


def print_table(result: dict) -> None:
    mib = 2**20
    splits = ", ".join(f"{n:,} {name}" for name, n in result["splits"].items())
    print(
        f"{result['messages']:,} messages -> {splits} conversations, {result['jsonl_bytes'] / mib:.0f} MiB of "
        f"JSONL; tokenizer {result['model']}; {result['machine']}"
    )
    header = (
        "| path | to first step | data | RSS after data (anon) | data's RSS (anon) | peak RSS, all processes "
        "| data per step | tokens per step | batches (sha256) |"
    )
    print(header)
    print("|---" * 9 + "|")
    for r in result["rows"]:
        print(
            f"| {r['path']} | {r['to_first_step_s']:.1f} s | {r['data_s']:.1f} s | "
            f"{r['rss_after_data'] / mib:,.0f} MiB ({r['anon_after_data'] / mib:,.0f}) | "
            f"{(r['rss_after_data'] - r['rss_before_data']) / mib:+,.0f} MiB "
            f"({(r['anon_after_data'] - r['anon_before_data']) / mib:+,.0f}) | {r['peak_rss_tree'] / mib:,.0f} MiB | "
            f"{r['step_data_us'] / 1000:.2f} ms | {r['tokens_per_step']:,.0f} | {r['batches_sha256'][:12]} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="model folder whose tokenizer is used")
    parser.add_argument(
        "--baseline",
        type=Path,
        required=True,
        help="code tree to compare with (`git archive REV`; 7627c91 = the JSONL reader)",
    )
    parser.add_argument(
        "--prepared", type=Path, default=None, help="a prepared folder (default: generate one)"
    )
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages in the synthetic export")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="export, prepared data and caches (default: $TMPDIR)"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the result goes")
    args = parser.parse_args(argv)
    result = run(args)
    print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
