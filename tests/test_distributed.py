"""A real 2-process run on the CPU (DDP over gloo) equals a 1-process run with the same global batch, and
each one's checkpoint resumes on the other's number of processes.

`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m slackdist train ...` (DESIGN.md: `accelerate launch` on
a CPU-only machine starts one process whatever num_processes says). 2 processes x 1 row x 2 accumulation
and 1 process x 1 row x 4 accumulation take the same rows in every optimizer step, and the loss is
normalised by the label tokens of the whole step, so the losses and the adapter must agree. LoRA dropout
is off here: each rank draws its own masks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import read_metrics, tiny_config, torchrun, write_dataset

from slackdist.config import save_config
from slackdist.train.manifest import verify_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_training(cfg, tmp_path: Path, *, processes: int) -> subprocess.CompletedProcess:
    path = tmp_path / f"config-{processes}.yaml"
    save_config(cfg, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "slackdist", "train", "--config", str(path)]
    else:
        cmd = [*torchrun(processes), "-m", "slackdist", "train", "--config", str(path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_two_process_ddp_equals_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from slackdist.data.examples import load_examples
    from slackdist.model.load import load_tokenizer
    from slackdist.train.packing import pack

    data = write_dataset(tmp_path / "data", n_train=21, n_val=5, seed=2)
    common = {
        "train.num_epochs": 2,
        "train.max_seq_len": 128,
        "train.micro_batch_size": 1,
        "train.eval_every_n_steps": 3,
        "train.save_every_n_steps": 4,
        "lora.dropout": 0.0,
        "model.load_in_4bit": True,
    }
    # precondition: the rows do not fill the last step, so filler micro-batches are exercised
    examples = load_examples(
        data / "train.jsonl",
        load_tokenizer(str(tiny_model_dir)),
        train_on="assistant",
        max_seq_len=128,
    )
    assert any(len(pack(examples, 128, seed=42, epoch=e)) % 4 for e in range(2))

    two = tiny_config(
        tiny_model_dir, data, tmp_path / "two", **common, **{"train.gradient_accumulation_steps": 2}
    )
    one = tiny_config(
        tiny_model_dir, data, tmp_path / "one", **common, **{"train.gradient_accumulation_steps": 4}
    )
    proc_two = run_training(two, tmp_path, processes=2)
    run_training(one, tmp_path, processes=1)

    # both ranks trained: the summed label tokens and the losses of every step equal the 1-process run
    m_two, m_one = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    steps_two = [m for m in m_two if "loss" in m]
    steps_one = [m for m in m_one if "loss" in m]
    assert (
        [m["step"] for m in steps_two] == [m["step"] for m in steps_one] == list(range(1, len(steps_one) + 1))
    )
    assert [m["label_tokens"] for m in steps_two] == [m["label_tokens"] for m in steps_one]
    for a, b in zip(steps_two, steps_one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]
    evals_two = {m["step"]: m["eval_loss"] for m in m_two if "eval_loss" in m}
    evals_one = {m["step"]: m["eval_loss"] for m in m_one if "eval_loss" in m}
    assert evals_two.keys() == evals_one.keys()
    assert evals_two == pytest.approx(evals_one, abs=1e-4)
    w_two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    w_one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert w_two.keys() == w_one.keys()
    for key in w_two:
        torch.testing.assert_close(w_two[key], w_one[key], atol=1e-4, rtol=1e-3)

    # only rank 0 wrote: one line per step, one TensorBoard file, one summary; every rank its RNG state
    # (TensorBoard names its files events.out.tfevents.<time>.<host>.<pid>.<n>; hparams get a second file)
    writers = {
        re.sub(r"^events\.out\.tfevents\.\d+\.|\.\d+$", "", p.name)
        for p in (tmp_path / "two" / "runs").rglob("events.out.tfevents.*")
    }
    assert len(writers) == 1
    assert proc_two.stdout.count("done:") == 1 and proc_two.stdout.count("training ") == 1
    for checkpoint in (tmp_path / "two" / "checkpoints").iterdir():
        assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {
            "random_states_0.pkl",
            "random_states_1.pkl",
        }

    # a 2-process checkpoint resumes on 1 process, and a 1-process one on 2 (same rows, continued where
    # it stopped; the second process has no RNG state of its own in the checkpoint)
    for source, processes, accumulation in (("two", 1, 4), ("one", 2, 2)):
        first = sorted((tmp_path / source / "checkpoints").iterdir())[0]
        assert verify_checkpoint(first).world_size == 3 - processes
        out = tmp_path / f"resume-{source}"
        shutil.copytree(first, out / "checkpoints" / first.name)
        resume = tiny_config(
            tiny_model_dir,
            data,
            out,
            **common,
            **{"train.gradient_accumulation_steps": accumulation, "train.resume": "auto"},
        )
        run_training(resume, tmp_path, processes=processes)
        resumed = [m for m in read_metrics(out) if "loss" in m]
        assert resumed[0]["step"] == int(first.name.removeprefix("step-")) + 1
        assert resumed[-1]["step"] == steps_one[-1]["step"]
        for m in resumed:
            assert m["loss"] == pytest.approx(steps_one[m["step"] - 1]["loss"], abs=1e-4), (source, m["step"])
        w_resumed = load_file(out / "adapter_model.safetensors")
        for key in w_one:
            torch.testing.assert_close(w_resumed[key], w_one[key], atol=1e-4, rtol=1e-3)
