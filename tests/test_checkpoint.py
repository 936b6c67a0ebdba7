"""Checkpoints: only what training changes, a manifest that catches damage, resume that skips damaged ones,
adapters checked when they load, and FSDP checkpoints that resume on another number of processes.

The corrupted checkpoints are real ones from a real `slackdist train` run on the tiny model, damaged on disk
the way a full disk, a killed copy or a stray edit damages them. FSDP runs on the CPU through torch's own
FSDP1 / FSDP2 over gloo (tests/fsdp_checkpoint_worker.py): Accelerate falls back to DDP on a CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_helpers import read_metrics, tiny_config, torchrun, write_dataset

from slackdist.config import save_config
from slackdist.errors import SlackdistError
from slackdist.model.adapter import UPDATES_METADATA, check_adapter_file
from slackdist.train.checkpoint import prune_checkpoints, resolve_resume
from slackdist.train.manifest import (
    BLOCK_BYTES,
    InvalidCheckpoint,
    hash_files,
    verify_checkpoint,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fsdp_checkpoint_worker.py")
STEP = "checkpoints/step-{:06d}"


def run_cli(cfg, tmp_path: Path, command: str = "train", *extra: str) -> int:
    from slackdist.cli import main

    path = tmp_path / f"config-{command}.yaml"
    save_config(cfg, path)
    return main([command, "--config", str(path), *extra])


# ------------------------------------------------------------------ the manifest on its own


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A checkpoint-like folder: a file of two hash blocks and a bit, a nested file, a small JSON file."""
    root = tmp_path / "step-000010"
    (root / "trainable").mkdir(parents=True)
    (root / "optimizer.bin").write_bytes(os.urandom(2 * BLOCK_BYTES + 123))
    (root / "trainable" / "__0_0.distcp").write_bytes(os.urandom(1000))
    (root / "trainer_state.json").write_text('{"global_step": 10}')
    write_manifest(root, step=10, backend="fsdp1", world_size=2, layout="dcp")
    return root


def test_manifest_lists_every_file_and_verifies_an_untouched_folder(folder: Path) -> None:
    manifest = verify_checkpoint(folder)
    assert (manifest.step, manifest.backend, manifest.world_size, manifest.layout) == (10, "fsdp1", 2, "dcp")
    assert set(manifest.files) == {"optimizer.bin", "trainable/__0_0.distcp", "trainer_state.json"}
    assert manifest.files["optimizer.bin"].size == 2 * BLOCK_BYTES + 123


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (
            lambda f: os.truncate(f / "optimizer.bin", BLOCK_BYTES),
            "optimizer.bin: 16,777,216 bytes, the manifest says",
        ),
        (lambda f: _flip_byte(f / "optimizer.bin", BLOCK_BYTES + 7), "optimizer.bin: content differs"),
        (lambda f: _flip_byte(f / "optimizer.bin", 2 * BLOCK_BYTES + 122), "optimizer.bin: content differs"),
        (lambda f: (f / "trainable" / "__0_0.distcp").unlink(), "trainable/__0_0.distcp: missing"),
        (
            lambda f: (f / "trainer_state.json").write_text('{"global_step": 1'),
            "trainer_state.json: 17 bytes",
        ),
        (
            lambda f: (f / "manifest.json").write_text('{"format": 1, "files": '),
            "manifest.json: not valid JSON",
        ),
        (
            lambda f: (f / "manifest.json").write_text('{"format": 7}'),
            "manifest.json: not a slackdist checkpoint",
        ),
        (lambda f: (f / "manifest.json").unlink(), "manifest.json: missing"),
    ],
    ids=[
        "truncated",
        "byte-in-2nd-block",
        "last-byte",
        "missing",
        "bad-json",
        "bad-manifest",
        "old-manifest",
        "none",
    ],
)
def test_manifest_names_the_damaged_file(folder: Path, damage, expected: str) -> None:
    damage(folder)
    with pytest.raises(InvalidCheckpoint, match=expected.replace("(", r"\(")) as info:
        verify_checkpoint(folder)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=3000), flip=st.integers(min_value=0))
def test_hash_is_the_content(data: bytes, flip: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a", Path(tmp) / "b"
        a.write_bytes(data)
        b.write_bytes(data)
        hashes = hash_files([a, b])
        assert hashes[a] == hashes[b]
        if data:
            _flip_byte(b, flip % len(data))
            assert hash_files([b])[b] != hashes[a]


# ------------------------------------------------------------------ real checkpoints, damaged


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 6-step run (LoRA dropout on) with checkpoints at steps 2, 4 and 6. Read-only: copy it."""
    from slackdist.train.recipe import train

    root = tmp_path_factory.mktemp("run")
    data = write_dataset(root / "data", n_train=16, n_val=4, seed=3)
    train(run_config(tiny_model_dir, data, root / "out"))
    return root / "out"


def run_config(tiny_model_dir: Path, data: Path, out: Path, **overrides):
    values = {
        "train.num_epochs": 10,
        "train.max_steps": 6,
        "train.micro_batch_size": 1,
        "train.save_every_n_steps": 2,
        "train.keep_last_n_checkpoints": 3,
        "lora.dropout": 0.1,
    }
    return tiny_config(tiny_model_dir, data, out, **{**values, **overrides})


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained_run.parent / "data", tmp_path / "data")
    return Path(shutil.copytree(trained_run, tmp_path / "out"))


def _zero_one_lora_b(path: Path) -> str:
    """Zero the first lora_B tensor of an adapter file, keeping its metadata (same size on disk)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if ".lora_B." in k)
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, str(path), metadata=metadata)
    return key


DAMAGE = {
    "truncated-rng": (
        lambda c: os.truncate(c / "random_states_0.pkl", 100),
        "random_states_0.pkl: 100 bytes",
    ),
    "bad-json": (
        lambda c: (c / "trainer_state.json").write_text('{"global_step": 6,'),
        "trainer_state.json: 18 bytes",
    ),
    "missing-file": (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin: missing"),
    "zeroed-adapter": (
        lambda c: _zero_one_lora_b(c / "adapter_model.safetensors"),
        "adapter_model.safetensors: content",
    ),
    "bad-manifest": (lambda c: (c / "manifest.json").write_text("{"), "manifest.json: not valid JSON"),
}


def test_checkpoints_hold_only_what_training_changes(trained_run: Path) -> None:
    checkpoints = sorted((trained_run / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-000002", "step-000004", "step-000006"]
    for checkpoint in checkpoints:
        manifest = verify_checkpoint(checkpoint)
        assert (manifest.backend, manifest.world_size, manifest.layout) == ("single", 1, "adapter")
        state = {
            name for name in manifest.files if not name.startswith(("tokenizer", "special_tokens", "chat_"))
        }
        assert state == {
            "adapter_model.safetensors",
            "adapter_config.json",
            "optimizer.bin",
            "scheduler.bin",
            "random_states_0.pkl",
            "trainer_state.json",
            "slackdist_config.yaml",
            "slackdist_inference.json",
        }
        with safe_open(str(checkpoint / "adapter_model.safetensors"), framework="pt") as f:
            assert int(f.metadata()[UPDATES_METADATA]) >= 1
        # the optimizer state is that of the LoRA weights alone (one flat parameter of their size)
        lora = sum(t.numel() for t in load_file(checkpoint / "adapter_model.safetensors").values())
        optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
        assert [s["exp_avg"].numel() for s in optimizer["state"].values()] == [lora]


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_auto_skips_a_damaged_newest_checkpoint(run_copy: Path, kind: str, caplog) -> None:
    damage, expected = DAMAGE[kind]
    damage(run_copy / STEP.format(6))
    with caplog.at_level(logging.WARNING, logger="slackdist.train.checkpoint"):
        assert resolve_resume("auto", run_copy) == run_copy / STEP.format(4)
    skipped = [r.getMessage() for r in caplog.records if "resume: skipped" in r.getMessage()]
    assert len(skipped) == 1 and "\n" not in skipped[0]
    assert "step-000006" in skipped[0] and expected in skipped[0]
    # named explicitly, the damaged checkpoint is an error, not a fallback
    with pytest.raises(InvalidCheckpoint, match=expected):
        resolve_resume(str(run_copy / STEP.format(6)), run_copy)


def test_resume_auto_with_no_valid_checkpoint_is_one_line_error(
    run_copy: Path, tiny_model_dir: Path, tmp_path: Path, capsys, caplog
) -> None:
    for step, kind in zip((2, 4, 6), ("truncated-rng", "missing-file", "bad-json"), strict=True):
        DAMAGE[kind][0](run_copy / STEP.format(step))
    cfg = run_config(tiny_model_dir, tmp_path / "data", run_copy, **{"train.resume": "auto"})
    capsys.readouterr()
    assert run_cli(cfg, tmp_path) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [
        r.getMessage().count("resume: skipped") for r in caplog.records if "skipped" in r.getMessage()
    ] == [1] * 3
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "none of its 3 checkpoints" in errors[0]


def test_resume_auto_falls_back_and_continues_exactly(run_copy: Path, tiny_model_dir: Path, caplog) -> None:
    """The newest checkpoint's RNG state is truncated: resume takes step 4 and, LoRA dropout and all, trains
    steps 5 and 6 exactly as the run did; step 6's checkpoint is written again, valid."""
    from slackdist.train.recipe import train

    before = {m["step"]: m["loss"] for m in read_metrics(run_copy) if "loss" in m}
    final = load_file(run_copy / "adapter_model.safetensors")
    DAMAGE["truncated-rng"][0](run_copy / STEP.format(6))
    cfg = run_config(tiny_model_dir, run_copy.parent / "data", run_copy, **{"train.resume": "auto"})
    result = train(cfg)
    assert result.resumed_from == run_copy / STEP.format(4)
    assert sorted(result.losses) == [5, 6]
    for step, loss in result.losses.items():
        assert loss == pytest.approx(before[step], abs=1e-6), step
    again = load_file(run_copy / "adapter_model.safetensors")
    for key in final:
        torch.testing.assert_close(again[key], final[key], atol=1e-6, rtol=1e-5)
    assert verify_checkpoint(run_copy / STEP.format(6)).step == 6


def test_a_checkpoint_of_another_layout_or_deepspeed_world_size_is_refused() -> None:
    from slackdist.train.checkpoint import check_resumable
    from slackdist.train.distributed import Topology
    from slackdist.train.manifest import Manifest

    def manifest(backend: str, layout: str, world_size: int) -> Manifest:
        return Manifest(step=4, backend=backend, world_size=world_size, layout=layout, files={})

    def topology(backend: str, world_size: int) -> Topology:
        return Topology(backend, world_size, 0, torch.device("cpu"))

    check_resumable(manifest("ddp", "adapter", 2), topology("single", 1), "ck")  # any number of processes
    check_resumable(manifest("fsdp1", "dcp", 8), topology("fsdp2", 2), "ck")
    check_resumable(manifest("deepspeed", "deepspeed", 2), topology("deepspeed", 2), "ck")
    with pytest.raises(SlackdistError, match="ck: written by a fsdp1 run, whose optimizer state \\(dcp\\)"):
        check_resumable(manifest("fsdp1", "dcp", 1), topology("single", 1), "ck")
    with pytest.raises(SlackdistError, match="written by 2 DeepSpeed processes.*this run has 4"):
        check_resumable(manifest("deepspeed", "deepspeed", 2), topology("deepspeed", 4), "ck")


def test_prune_drops_checkpoints_of_an_abandoned_timeline(run_copy: Path) -> None:
    """After resuming from step 4 past a damaged step 6, the next save (step 5) must not keep step 6 as one
    of the newest and delete the checkpoint just written."""
    shutil.copytree(run_copy / STEP.format(4), run_copy / STEP.format(5))
    removed = prune_checkpoints(run_copy, 1, newest=5)
    assert sorted(p.name for p in removed) == ["step-000002", "step-000004", "step-000006"]
    assert [p.name for p in (run_copy / "checkpoints").iterdir()] == ["step-000005"]


# ------------------------------------------------------------------ adapters checked where they load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commands(model_dir: Path, tmp_path: Path) -> dict[str, list[str]]:
    """chat, eval, merge and serve on one model folder (each must refuse it before doing anything)."""
    return {
        "chat": ["chat", "--model-dir", str(model_dir), "--prompt", "hi"],
        "eval": ["eval", "--model-dir", str(model_dir), "--data", str(tmp_path / "data")],
        "merge": ["merge", "--adapter", str(model_dir), "--output", str(tmp_path / "merged")],
        "serve": ["serve", "--model-dir", str(model_dir), "--port", str(_free_port())],
    }


def _assert_refused_everywhere(model_dir: Path, tmp_path: Path, expected: str, capsys) -> None:
    from slackdist.cli import main

    for name, argv in _commands(model_dir, tmp_path).items():
        capsys.readouterr()
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert "Traceback" not in err and len(errors) == 1, (name, err[-2000:])
        assert expected in errors[0], (name, errors[0])
    assert not (tmp_path / "merged").exists()


def test_zeroed_lora_b_of_a_trained_adapter_is_refused_by_chat_eval_merge_serve(
    run_copy: Path, tmp_path: Path, capsys
) -> None:
    key = _zero_one_lora_b(run_copy / "adapter_model.safetensors")
    _assert_refused_everywhere(
        run_copy, tmp_path, f"1 lora_B tensors are all zeros after training (first: {key})", capsys
    )


def test_adapter_with_missing_tensors_is_refused_by_chat_eval_merge_serve(
    run_copy: Path, tmp_path: Path, capsys
) -> None:
    path = run_copy / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    lost = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    del tensors[lost]
    save_file(tensors, str(path), metadata=metadata)
    _assert_refused_everywhere(
        run_copy,
        tmp_path,
        "lora_A/lora_B missing for 1 of 15 LoRA modules (first: base_model.model.model.layers.1.mlp.down_proj)",
        capsys,
    )


def test_truncated_adapter_is_refused_by_chat_eval_merge_serve(
    run_copy: Path, tmp_path: Path, capsys
) -> None:
    os.truncate(run_copy / "adapter_model.safetensors", 4096)
    _assert_refused_everywhere(run_copy, tmp_path, "cannot load the adapter onto", capsys)


def test_an_adapter_that_changes_nothing_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An adapter from elsewhere (no training record in its metadata) whose every lora_B is zero."""
    from inference_helpers import write_tiny_adapter

    from slackdist.model.load import load_for_inference

    folder = write_tiny_adapter(tiny_model_dir, tmp_path / "adapter", scale=0.0)
    with pytest.raises(SlackdistError, match="every lora_B tensor is zero"):
        load_for_inference(str(folder), device="cpu")
    nonzero = write_tiny_adapter(tiny_model_dir, tmp_path / "nonzero")
    assert load_for_inference(str(nonzero), device="cpu").kind == "adapter"


def test_check_adapter_file_rules(tmp_path: Path) -> None:
    modules = ["base_model.model.lm_head", "base_model.model.model.layers.0.self_attn.q_proj"]
    good = {
        "base_model.model.lm_head.lora_A.weight": torch.ones(2, 4),
        "base_model.model.lm_head.lora_B.weight": torch.ones(8, 2),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 4),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(4, 2),
    }
    save_file(good, tmp_path / "good.safetensors")
    assert check_adapter_file(tmp_path / "good.safetensors", modules, trained=True) == 4
    # what a stock peft save under FSDP1 writes: only lm_head's LoRA
    save_file({k: v for k, v in good.items() if "lm_head" in k}, tmp_path / "lost.safetensors")
    with pytest.raises(SlackdistError, match="missing for 1 of 2 LoRA modules"):
        check_adapter_file(tmp_path / "lost.safetensors", modules, trained=True)
    zero_b = dict(good, **{"base_model.model.lm_head.lora_B.weight": torch.zeros(8, 2)})
    for updates, trained in (("0", False), ("3", True)):
        save_file(zero_b, tmp_path / "zero.safetensors", metadata={"format": "pt", UPDATES_METADATA: updates})
        assert (
            check_adapter_file(tmp_path / "zero.safetensors", modules, trained=False) == 4
        )  # before training
        if trained:  # the file's own record decides when the caller does not know
            with pytest.raises(SlackdistError, match="1 lora_B tensors are all zeros after training"):
                check_adapter_file(tmp_path / "zero.safetensors", modules)
        else:
            assert check_adapter_file(tmp_path / "zero.safetensors", modules) == 4


# ------------------------------------------------------------------ FSDP: DCP checkpoints, any number of processes


def run_worker(backend: str, processes: int, model_dir: Path, work: Path, **options) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    argv = [str(WORKER), backend, str(model_dir), str(work), "--steps", "6", "--save-at", "3"]
    if options.get("resume_from"):
        argv += ["--resume-from", str(options["resume_from"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    proc = subprocess.run([*torchrun(processes), *argv], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((work / "result.json").read_text())
    result["losses"] = {int(k): v for k, v in result["losses"].items()}
    result["final"] = load_file(work / "final.safetensors")
    return result


@pytest.fixture(scope="module")
def fsdp_runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """Uninterrupted 6-step runs that checkpoint at step 3: FSDP1 on 2 processes, FSDP2 on 1."""
    root = tmp_path_factory.mktemp("fsdp")
    return {
        name: (run_worker(backend, processes, tiny_model_dir, root / name), root / name / "checkpoint")
        for name, backend, processes in (("fsdp1x2", "fsdp1", 2), ("fsdp2x1", "fsdp2", 1))
    }


@pytest.mark.slow
def test_fsdp1_and_fsdp2_train_alike(fsdp_runs) -> None:
    (one, _), (two, _) = fsdp_runs["fsdp1x2"], fsdp_runs["fsdp2x1"]
    assert one["losses"] == pytest.approx(two["losses"], abs=1e-6)
    for key in one["final"]:
        torch.testing.assert_close(one["final"][key], two["final"][key], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_fsdp_checkpoint_holds_only_lora_weights_and_their_optimizer_state(fsdp_runs) -> None:
    import torch.distributed.checkpoint as dcp

    for name, (result, checkpoint) in fsdp_runs.items():
        keys = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata.keys()
        weights = [k for k in keys if k.startswith("model.")]
        states = {k.rsplit(".", 1)[0] for k in keys if k.startswith("optimizer.state.")}
        assert len(weights) == len(result["final"]) == 2 * 15, (
            name
        )  # lora_A + lora_B of 7 x 2 layers + lm_head
        assert all(".lora_A." in k or ".lora_B." in k for k in weights), name
        assert {k.removeprefix("model.") for k in weights} == {
            k.removeprefix("optimizer.state.") for k in states
        }, name
        assert {k.rsplit(".", 1)[1] for k in keys if k.startswith("optimizer.state.")} == {
            "step",
            "exp_avg",
            "exp_avg_sq",
        }
        files = sorted(p.name for p in checkpoint.iterdir())
        assert files == [".metadata", *(f"__{r}_0.distcp" for r in range(int(name[-1])))], name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("saved", "backend", "processes"),
    [("fsdp1x2", "fsdp1", 1), ("fsdp2x1", "fsdp2", 2), ("fsdp2x1", "fsdp1", 2)],
    ids=["fsdp1-2to1", "fsdp2-1to2", "fsdp2-to-fsdp1-1to2"],  # the last: FSDP1's sharded (FULL_SHARD) load
)
def test_fsdp_checkpoint_resumes_on_another_number_of_processes(
    fsdp_runs, tiny_model_dir: Path, tmp_path: Path, saved: str, backend: str, processes: int
) -> None:
    reference, checkpoint = fsdp_runs[saved]
    resumed = run_worker(backend, processes, tiny_model_dir, tmp_path / "resumed", resume_from=checkpoint)
    assert sorted(resumed["losses"]) == [4, 5, 6]
    assert resumed["losses"][4] != pytest.approx(resumed["untrained_loss"], abs=1e-3)  # the weights came back
    for step in (4, 5, 6):  # and the optimizer state: Adam without its moments takes other steps
        assert resumed["losses"][step] == pytest.approx(reference["losses"][step], abs=1e-6), step
    for key in reference["final"]:
        torch.testing.assert_close(resumed["final"][key], reference["final"][key], atol=1e-6, rtol=1e-5)
