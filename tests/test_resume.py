"""Resume: a run stopped after step k and resumed equals an uninterrupted run at every later step.

The interrupted runs are real `slackdist train` processes: one killed with SIGKILL (no chance to save
anything after its last periodic checkpoint), one preempted with SIGTERM (it finishes the step, writes a
checkpoint and exits 75). Both resume with `--resume auto`. LoRA dropout is on, so the dropout RNG state
must come back too. CPU, fixed seed, fp32: the losses must agree within 1e-5.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import read_metrics, step_losses, tiny_config, write_dataset

from slackdist.config import save_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def config_for(model_dir: Path, data_dir: Path, out: Path, **overrides):
    values = {
        "train.num_epochs": 4,
        "train.max_seq_len": 128,
        "train.micro_batch_size": 1,
        "train.gradient_accumulation_steps": 2,
        "train.eval_every_n_steps": 4,
        "train.early_stopping_patience": 0,
        "lora.dropout": 0.1,
    }
    values.update(overrides)
    return tiny_config(model_dir, data_dir, out, **values)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "prepared", n_train=24, n_val=6, seed=1)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from slackdist.train.recipe import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = train(config_for(tiny_model_dir, data_dir, out))
    assert result.global_step >= 20
    return result


def start_training(cfg, tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "slackdist", "train", "--config", str(path)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 180) -> None:
    """Poll metrics.jsonl until the run has logged `step` (the file is the run's own progress report)."""
    deadline = time.monotonic() + timeout
    while not any(m.get("step", 0) >= step and "loss" in m for m in read_metrics(out)):
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training made no progress")
        time.sleep(0.05)


def assert_continues_like(resumed, reference, from_step: int) -> None:
    later = [s for s in reference.losses if s > from_step]
    assert later, "nothing left to resume"
    assert sorted(resumed.losses) == later  # the resumed run did exactly the remaining steps
    for step in later:
        assert resumed.losses[step] == pytest.approx(reference.losses[step], abs=1e-5), f"step {step}"
    for step, loss in resumed.eval_losses.items():
        assert loss == pytest.approx(reference.eval_losses[step], abs=1e-5), f"eval at step {step}"
    assert resumed.best_step == reference.best_step
    assert resumed.best_eval_loss == pytest.approx(reference.best_eval_loss, abs=1e-5)


def assert_same_adapter(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)


def test_killed_run_resumes_exactly(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, uninterrupted
) -> None:
    from slackdist.train.recipe import train

    out = tmp_path / "out"
    proc = start_training(
        config_for(tiny_model_dir, data_dir, out, **{"train.save_every_n_steps": 3}), tmp_path
    )
    wait_for_step(proc, out, 4)  # step 3's checkpoint is complete before step 4 starts
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert checkpoints, "no checkpoint before the kill"
    saved_step = int(checkpoints[-1].removeprefix("step-"))
    assert saved_step < uninterrupted.global_step

    resumed = train(
        config_for(tiny_model_dir, data_dir, out, **{"train.save_every_n_steps": 3, "train.resume": "auto"})
    )
    assert resumed.resumed_from == out / "checkpoints" / checkpoints[-1]
    assert_continues_like(resumed, uninterrupted, saved_step)
    assert_same_adapter(out, uninterrupted.output_dir)
    # metrics.jsonl reads as one run: each step once, the killed run's extra steps replaced
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == sorted(set(steps)) == list(range(1, uninterrupted.global_step + 1))
    assert step_losses(out) == pytest.approx(step_losses(uninterrupted.output_dir), abs=1e-5)


def test_sigterm_checkpoints_exits_75_and_resume_auto_continues(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, uninterrupted
) -> None:
    from slackdist.train.recipe import PREEMPTED_EXIT_CODE, train

    out = tmp_path / "out"
    proc = start_training(config_for(tiny_model_dir, data_dir, out), tmp_path)  # no periodic checkpoints
    wait_for_step(proc, out, 2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE == 75, output[-3000:]
    assert "preempted (SIGTERM)" in output

    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    stopped = state["global_step"]
    assert 2 <= stopped < uninterrupted.global_step and not state["finished"]
    assert max(m["step"] for m in read_metrics(out)) == stopped  # it finished the step it was in, no more
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a preempted run

    resumed = train(config_for(tiny_model_dir, data_dir, out, **{"train.resume": "auto"}))
    assert resumed.resumed_from == checkpoints[0]
    assert_continues_like(resumed, uninterrupted, stopped)
    assert_same_adapter(out, uninterrupted.output_dir)

    # resuming a finished run does nothing more
    again = train(config_for(tiny_model_dir, data_dir, out, **{"train.resume": "auto"}))
    assert again.losses == {} and again.global_step == uninterrupted.global_step
