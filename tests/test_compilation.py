"""torch.compile of the decoder layers (slackdist/model/compilation.py) gives the eager model's loss and gradients."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import (
    assert_same_loss_and_grads,
    loss_and_grads,
    packed_batch,
    tiny_config,
    tiny_peft_model,
    write_dataset,
)

import slackdist.train.recipe as recipe
from slackdist.model.compilation import (
    compile_decoder_layers,
    compile_job_id,
    compiled_before,
    decoder_layers,
    should_compile,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_decoder_layers_are_found_through_peft(tiny_model_dir: Path) -> None:
    model = tiny_peft_model(tiny_model_dir)
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in layers)


def test_compiled_layers_match_eager(tiny_model_dir: Path) -> None:
    """Same loss and LoRA gradients, over packed rows of two lengths (dynamic shapes, varlen attention
    outside the graph). aot_eager traces through dynamo and autograd as inductor does, without a C compiler."""
    torch._dynamo.reset()
    eager = tiny_peft_model(tiny_model_dir)
    compiled = tiny_peft_model(tiny_model_dir)
    assert compile_decoder_layers(compiled, backend="aot_eager") == eager.config.num_hidden_layers
    for length, seed in ((40, 1), (57, 2), (33, 3)):
        batch = packed_batch(length, seed, eager.config.vocab_size)
        assert_same_loss_and_grads(loss_and_grads(eager, batch), loss_and_grads(compiled, batch))
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("setting", "device", "sharded", "steps", "expected"),
    [
        ("auto", "cuda", False, 150, True),
        ("auto", "cuda", False, 149, False),  # too short a run to repay compiling
        ("auto", "cuda", True, 1000, False),
        ("auto", "cpu", False, 1000, False),
        ("on", "cpu", False, 1, True),
        ("off", "cuda", False, 1000, False),
    ],
)
def test_should_compile(setting: str, device: str, sharded: bool, steps: int, expected: bool) -> None:
    on, why = should_compile(setting, device_type=device, sharded=sharded, steps=steps, min_steps=150)
    assert on is expected
    assert why


def test_compile_job_id_names_the_workload(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_peft_model(tiny_model_dir)
    cpu = torch.device("cpu")
    job = compile_job_id(model, device=cpu, settings={"lora": {"r": 4}})
    assert job.startswith("slackdist-")
    assert compile_job_id(model, device=cpu, settings={"lora": {"r": 4}}) == job
    assert compile_job_id(model, device=cpu, settings={"lora": {"r": 8}}) != job
    model.config.hidden_size += 1
    assert compile_job_id(model, device=cpu, settings={"lora": {"r": 4}}) != job
    monkeypatch.setattr(torch.compiler.config, "job_id", "users-own")
    assert compile_job_id(model, device=cpu, settings={"lora": {"r": 4}}) == "users-own"


COMPILE_TWICE = """
import json, sys, torch
from train_helpers import loss_and_grads, packed_batch, tiny_peft_model
from slackdist.model.compilation import compile_decoder_layers, compile_job, compiled_before

graphs = []
def counting(gm, inputs):
    graphs.append(len(inputs))
    return gm.forward

job = "slackdist-test"
warm = compiled_before(job)
torch.manual_seed(0)
model = tiny_peft_model(sys.argv[1])
compile_decoder_layers(model, backend=counting)
with compile_job(job):
    for length, seed in ((40, 1), (57, 2), (33, 3)):
        loss_and_grads(model, packed_batch(length, seed, model.config.vocab_size))
print(json.dumps({"warm": warm, "after": compiled_before(job), "graphs": len(graphs)}))
"""


def test_a_second_run_of_a_workload_compiles_once_dynamic(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The first run compiles static, then again dynamic when the packed length changes, and leaves dynamo's
    profile of its job in the compile cache; the next process finds it (a warm workload) and compiles
    each layer graph once, dynamic from the start."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", COMPILE_TWICE, str(tiny_model_dir)],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert (first["warm"], first["after"]) == (False, True)
    assert second["warm"] is True
    assert 0 < second["graphs"] < first["graphs"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
        assert compiled_before("slackdist-test")
        assert not compiled_before("slackdist-other")


def test_a_compiled_run_compiles_under_its_workloads_job_id(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`slackdist train --compile on` leaves dynamo's profile of its workload in the compile cache, and the
    next run of the same workload says it compiles from the cache."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    # aot_eager: dynamo and autograd's tracing as inductor runs them, without a C compiler
    monkeypatch.setattr(
        recipe, "compile_decoder_layers", functools.partial(compile_decoder_layers, backend="aot_eager")
    )
    data = write_dataset(tmp_path / "data", n_train=8, n_val=0)
    caplog.set_level(logging.WARNING)
    logs = []
    for run in range(2):
        torch._dynamo.reset()
        cfg = tiny_config(
            tiny_model_dir, data, tmp_path / f"out{run}", **{"train.compile": "on", "train.max_steps": 2}
        )
        recipe.train(cfg)
        logs.append([r.getMessage() for r in caplog.records if r.getMessage().startswith("compile:")])
        caplog.clear()
    profiles = list((tmp_path / "cache" / "dynamo").glob("code_state_slackdist-*.pkl"))
    assert len(profiles) == 1
    assert "first steps compile" in logs[0][0]
    assert "compiled before" in logs[1][0]
    torch._dynamo.reset()
