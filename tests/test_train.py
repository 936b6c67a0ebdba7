"""`slackdist train` end to end on the CPU with the tiny model, and the pieces it is built from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from train_helpers import read_metrics, step_losses, tiny_config, write_dataset

from slackdist.config import save_config
from slackdist.train.manifest import verify_checkpoint, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "prepared", n_train=24, n_val=8)


def run_cli(cfg, tmp_path: Path, *extra: str) -> int:
    from slackdist.cli import main

    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    return main(["train", "--config", str(path), *extra])


def eval_loss_of_adapter(
    model_dir: Path, adapter_dir: Path, data_dir: Path, cfg, *, load_in_4bit: bool
) -> float:
    """Loss per label token on validation.jsonl of an adapter loaded onto a fresh base (no slackdist loop code)."""
    import torch.nn.functional as F
    from peft import PeftModel

    from slackdist.data.examples import load_examples
    from slackdist.model.load import load_base_model, load_tokenizer, quiet_tied_lora_warning
    from slackdist.train.packing import collate, pack

    tokenizer = load_tokenizer(str(model_dir))
    model_cfg = cfg.model
    model_cfg.load_in_4bit = load_in_4bit
    base = load_base_model(model_cfg, dtype=torch.float32, device_map={"": "cpu"})
    with quiet_tied_lora_warning():
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    examples = load_examples(data_dir / "validation.jsonl", tokenizer, train_on="assistant", max_seq_len=256)
    rows = pack(examples, 256, seed=cfg.train.seed, epoch=0)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 2):
            batch = collate(rows[i : i + 2], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            labels = batch["labels"][:, 1:].reshape(-1)
            total += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels, reduction="sum"
            ).item()
            count += int((labels != -100).sum())
    return total / count


@pytest.mark.slow
@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["qlora-4bit", "unquantized"])
def test_train_end_to_end(tiny_model_dir: Path, data_dir: Path, tmp_path: Path, load_in_4bit: bool) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "out"
    cfg = tiny_config(
        tiny_model_dir,
        data_dir,
        out,
        **{
            "model.load_in_4bit": load_in_4bit,
            "train.num_epochs": 10,
            "train.eval_every_n_steps": 10,
            "train.save_every_n_steps": 10,
            "train.keep_last_n_checkpoints": 2,
            "train.learning_rate": 3e-3,
            "train.merge_after_training": not load_in_4bit,
        },
    )
    assert run_cli(cfg, tmp_path) == 0

    # the output layout chat/eval/serve read
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "slackdist_config.yaml",
        "metrics.jsonl",
        "loss.png",
        "trainer_state.json",
    ):
        assert (out / name).is_file(), name
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (out / "best" / "adapter_model.safetensors").is_file()
    assert not list(out.rglob("*.bin")) or all(
        p.name in ("optimizer.bin", "scheduler.bin") for p in out.rglob("*.bin")
    )

    # metrics: every step logged once with the fixed keys; the loss came down on the repeated data
    metrics = read_metrics(out)
    train_lines = [m for m in metrics if "loss" in m]
    steps = [m["step"] for m in train_lines]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 25
    for line in train_lines:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib", "epoch"} <= line.keys()
        assert line["tokens_per_s"] > 0 and line["peak_mem_gib"] > 0 and line["grad_norm"] is not None
    losses = step_losses(out)
    assert sum(losses[s] for s in steps[-3:]) / 3 < 0.75 * losses[1]
    evals = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}
    assert 10 in evals and steps[-1] in evals

    # the time a user waited, by phase (bench/time_to_model.py reads it): the parts add up to the whole
    (phases,) = [m["phases"] for m in metrics if "phases" in m]
    assert {
        "start-up",
        "data",
        "load",
        "steps",
        "eval",
        "best adapter",
        "checkpoints",
        "final save",
    } <= phases.keys()
    parts = sum(v for k, v in phases.items() if k not in ("warm-up", "total"))
    assert 0 < phases["warm-up"] < phases["steps"] and parts <= phases["total"] < 1.5 * parts + 5

    # the adapter: PEFT layout, 2 tensors per LoRA module (7 projections x 2 layers + lm_head), trained
    weights = load_file(out / "adapter_model.safetensors")
    assert len(weights) == 2 * (7 * 2 + 1)
    assert all(t.abs().sum() > 0 for k, t in weights.items() if ".lora_B." in k)
    assert not any("base_layer" in k or "embed_tokens" in k for k in weights)  # no tied embedding copy
    meta = json.loads((out / "adapter_config.json").read_text())
    assert Path(meta["base_model_name_or_path"]) == tiny_model_dir.resolve()
    assert "lm_head" in meta["target_modules"]

    # reloads into a fresh PEFT model and gives the trained (best) eval loss
    state = json.loads((out / "trainer_state.json").read_text())
    reloaded = eval_loss_of_adapter(tiny_model_dir, out, data_dir, cfg, load_in_4bit=load_in_4bit)
    # 4-bit: the CPU 4-bit kernels round differently with the batch shape (chunked loss vs full logits)
    assert reloaded == pytest.approx(state["best_eval_loss"], abs=1e-4 if load_in_4bit else 1e-5)
    assert state["best_eval_loss"] == pytest.approx(min(evals.values()))

    # the final adapter is best/'s file, linked: the same weights are not gathered and written twice;
    # with the best eval at the last step the final checkpoint links it too
    best_inode = (out / "best" / "adapter_model.safetensors").stat().st_ino
    assert (out / "adapter_model.safetensors").stat().st_ino == best_inode
    last_checkpoint = out / "checkpoints" / f"step-{steps[-1]:06d}" / "adapter_model.safetensors"
    assert (last_checkpoint.stat().st_ino == best_inode) == (state["best_step"] == steps[-1])

    # train.merge_after_training: a plain transformers model in OUT/merged
    if not load_in_4bit:
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(out / "merged")
        assert merged.config.tie_word_embeddings is False  # lm_head carries its merged LoRA
    else:
        assert not (out / "merged").exists()

    # checkpoints: the last two (+ the best one) survive pruning, each self-describing
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    last = [
        f"step-{s:06d}" for s in ((steps[-1] - 1) // 10 * 10, steps[-1])
    ]  # every 10 steps + the final one
    assert set(last) <= set(checkpoints)
    assert set(checkpoints) <= set(last) | {f"step-{state['best_step']:06d}"}
    for name in checkpoints:
        folder = out / "checkpoints" / name
        for part in (
            "adapter_model.safetensors",
            "tokenizer.json",
            "slackdist_config.yaml",
            "trainer_state.json",
            "optimizer.bin",
            "scheduler.bin",
            "random_states_0.pkl",
            "manifest.json",
        ):
            assert (folder / part).is_file(), f"{name}/{part}"
        assert not (folder / "model.safetensors").exists()  # the 4-bit base is not copied into checkpoints
        assert verify_checkpoint(folder).files.keys() == {
            p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name != "manifest.json"
        }


def test_early_stopping_keeps_the_best_adapter(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from slackdist.train.recipe import train

    out = tmp_path / "out"
    # min_delta so large that no eval after the first counts as an improvement: stops after `patience` more
    cfg = tiny_config(
        tiny_model_dir,
        data_dir,
        out,
        **{
            "train.num_epochs": 20,
            "train.eval_every_n_steps": 1,
            "train.early_stopping_patience": 2,
            "train.early_stopping_min_delta": 100.0,
        },
    )
    result = train(cfg)
    assert result.stopped_early and result.global_step == 3
    assert result.best_step == 1
    assert sorted(result.eval_losses) == [1, 2, 3]
    assert (out / "adapter_model.safetensors").read_bytes() == (
        out / "best" / "adapter_model.safetensors"
    ).read_bytes()
    assert json.loads((out / "best" / "eval.json").read_text())["step"] == 1
    assert json.loads((out / "trainer_state.json").read_text())["stopped_early"] is True


def test_a_run_ending_on_its_best_eval_writes_its_adapter_once(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """best/, the final checkpoint and the final output share one adapter file (hard links), which
    loads and passes the adapter check; best/ being replaced later does not touch the others."""
    from safetensors.torch import load_file

    from slackdist.model.adapter import check_adapter_file
    from slackdist.train.recipe import train

    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, data_dir, out, **{"train.max_steps": 3, "train.eval_every_n_steps": 3})
    result = train(cfg)
    assert result.global_step == 3 and result.best_step == 3  # the first eval is always the best
    files = [
        out / "best" / "adapter_model.safetensors",
        out / "checkpoints" / "step-000003" / "adapter_model.safetensors",
        out / "adapter_model.safetensors",
    ]
    assert len({f.stat().st_ino for f in files}) == 1 and files[0].stat().st_nlink == 3
    assert all((f.parent / "adapter_config.json").is_file() for f in files)
    assert check_adapter_file(files[2], [k.split(".lora_")[0] for k in load_file(files[2])], trained=True)


def test_best_adapter_is_written_at_checkpoints_not_at_every_eval(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every eval improves (a negative min_delta), 4 evals, checkpoints at steps 2 and 4: best/ is
    written twice, at each checkpoint, with the best eval that checkpoint's trainer state names; the
    checkpoints and the final output link it. The optimizer state is saved without zip CRCs (the
    manifest hashes every byte) and still loads."""
    import zipfile

    from slackdist.train import checkpoint
    from slackdist.train.recipe import train

    written: list[tuple[int, str]] = []
    real_write = checkpoint.write_adapter

    def recording_write(snapshot, peft_model, out_dir, *, base_model):
        written.append((snapshot.step, Path(out_dir).name))
        return real_write(snapshot, peft_model, out_dir, base_model=base_model)

    monkeypatch.setattr(checkpoint, "write_adapter", recording_write)
    out = tmp_path / "out"
    cfg = tiny_config(
        tiny_model_dir,
        data_dir,
        out,
        **{
            "train.num_epochs": 2,
            "train.max_steps": 4,
            "train.eval_every_n_steps": 1,
            "train.save_every_n_steps": 2,
            "train.early_stopping_min_delta": -100.0,
        },
    )
    result = train(cfg)
    assert sorted(result.eval_losses) == [1, 2, 3, 4] and result.best_step == 4
    assert [step for step, _ in written] == [2, 4]  # one write per checkpoint, none per eval
    assert all(name.startswith(".best.tmp-") for _, name in written)  # best/'s stage; the rest are links
    for step in (2, 4):
        folder = out / "checkpoints" / f"step-{step:06d}"
        assert json.loads((folder / "trainer_state.json").read_text())["best_step"] == step
        with zipfile.ZipFile(folder / "optimizer.bin") as z:
            assert {info.CRC for info in z.infolist()} == {0}
        assert torch.load(folder / "optimizer.bin", weights_only=True)["state"]
    assert json.loads((out / "best" / "eval.json").read_text())["step"] == 4
    best_inode = (out / "best" / "adapter_model.safetensors").stat().st_ino
    assert (out / "adapter_model.safetensors").stat().st_ino == best_inode


def test_keep_last_k_checkpoints_plus_best(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from slackdist.train.recipe import train

    out = tmp_path / "out"
    cfg = tiny_config(
        tiny_model_dir,
        data_dir,
        out,
        **{
            "train.num_epochs": 20,
            "train.max_steps": 7,
            "train.save_every_n_steps": 1,
            "train.keep_last_n_checkpoints": 2,
            "train.eval_every_n_steps": 2,
            "train.early_stopping_patience": 0,
            "train.learning_rate": 0.5,
        },  # diverges: the best eval is an early one
    )
    result = train(cfg)
    assert result.global_step == 7
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == sorted({f"step-{s:06d}" for s in (6, 7, result.best_step)})
    assert result.best_step < 6


def test_fresh_run_refuses_an_output_with_checkpoints(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    (out / "checkpoints" / "step-000004").mkdir(parents=True)
    (out / "checkpoints" / "step-000004" / "trainer_state.json").write_text("{}")
    cfg = tiny_config(tiny_model_dir, data_dir, out)
    assert run_cli(cfg, tmp_path) == 2
    assert not (out / "metrics.jsonl").exists()


def test_checkpoint_whose_optimizer_state_does_not_fit_is_a_clear_error(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    """A checkpoint from another optimizer layout (e.g. written before the LoRA weights were one flat
    parameter) must not resume into a traceback."""
    out = tmp_path / "out"
    cfg = tiny_config(tiny_model_dir, data_dir, out, **{"train.max_steps": 2, "train.save_every_n_steps": 1})
    assert run_cli(cfg, tmp_path) == 0
    checkpoint = out / "checkpoints" / "step-000001"  # step 2 ended the run: nothing to resume from it
    path = checkpoint / "optimizer.bin"
    state = torch.load(path, weights_only=False)
    group = state["param_groups"][0]
    group["params"] = [*group["params"], max(group["params"]) + 1]  # one parameter more than the run has
    torch.save(state, path)
    write_manifest(checkpoint, step=1, backend="single", world_size=1, layout="adapter")  # a valid checkpoint
    capsys.readouterr()
    assert run_cli(cfg, tmp_path, "--resume", str(checkpoint)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert str(checkpoint) in errors[0] and "cannot resume" in errors[0]


def test_missing_training_data_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = tiny_config(tiny_model_dir, tmp_path / "nothing", tmp_path / "out")
    assert run_cli(cfg, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nothing'}: no such file or folder" in err


@pytest.mark.parametrize("chunk_size", [0, 7, 1024])
def test_forward_loss_paths_agree_with_transformers(
    tiny_model_dir: Path, data_dir: Path, chunk_size: int
) -> None:
    """Chunked lm_head + CE (hidden states), the model's own logits, and transformers' loss give the same sum."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from slackdist.data.examples import load_examples
    from slackdist.model.load import load_tokenizer
    from slackdist.train.packing import collate, pack
    from slackdist.train.step import forward_loss

    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = load_examples(data_dir / "train.jsonl", tokenizer, train_on="assistant", max_seq_len=256)
    batch = collate(pack(examples, 256, seed=0, epoch=0)[:3], tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    accelerator = Accelerator(cpu=True)
    with torch.no_grad():
        ours = forward_loss(model, batch, accelerator=accelerator, chunk_size=chunk_size)
        # use_cache=False: with a cache, transformers skips packed-sequence detection and attends across
        # the conversations of a row (the loop always passes it)
        reference = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            labels=batch["labels"],
            use_cache=False,
        ).loss
    n = int(batch["num_label_tokens"])
    assert n > 0
    assert float(ours) / n == pytest.approx(float(reference), abs=1e-5)


# ------------------------------------------------------------------ data sharding


@settings(max_examples=200, deadline=None)
@given(
    num_rows=st.integers(0, 60),
    micro=st.integers(1, 4),
    accumulation=st.integers(1, 4),
    processes=st.integers(1, 4),
    first_row=st.integers(0, 10),
)
def test_shard_rows_covers_every_row_once_with_equal_work_per_rank(
    num_rows: int, micro: int, accumulation: int, processes: int, first_row: int
) -> None:
    from slackdist.train.batches import shard_rows

    plans = [
        shard_rows(
            num_rows,
            micro_batch_size=micro,
            accumulation=accumulation,
            num_processes=processes,
            rank=r,
            first_row=first_row,
        )
        for r in range(processes)
    ]
    seen = [i for plan in plans for step in plan.steps for mb in step for i in mb]
    assert sorted(seen) == list(range(min(first_row, num_rows), num_rows))  # each remaining row exactly once
    assert len({len(plan) for plan in plans}) == 1  # every rank runs the same number of steps...
    assert all(len(step) == accumulation for plan in plans for step in plan.steps)  # ...and micro-batches
    assert all(len(mb) <= micro for plan in plans for step in plan.steps for mb in step)


@given(num_rows=st.integers(0, 40), micro=st.integers(1, 3), accumulation=st.integers(1, 3))
def test_shard_rows_same_global_step_contents_for_any_process_count(
    num_rows: int, micro: int, accumulation: int
) -> None:
    """2 processes x GA n and 1 process x GA 2n train on the same rows in each optimizer step."""
    from slackdist.train.batches import shard_rows

    single = shard_rows(
        num_rows, micro_batch_size=micro, accumulation=2 * accumulation, num_processes=1, rank=0
    )
    pair = [
        shard_rows(num_rows, micro_batch_size=micro, accumulation=accumulation, num_processes=2, rank=r)
        for r in (0, 1)
    ]
    assert len(single) == len(pair[0])
    for s, step in enumerate(single.steps):
        rows_single = sorted(i for mb in step for i in mb)
        rows_pair = sorted(i for plan in pair for mb in plan.steps[s] for i in mb)
        assert rows_single == rows_pair


# ------------------------------------------------------------------ adapter saving


@pytest.mark.parametrize("ensure_weight_tying", [False, True])
def test_adapter_state_dict_names_tensors_as_peft_does(
    tiny_model_dir: Path, ensure_weight_tying: bool
) -> None:
    """Workaround B (notes/fsdp_qlora_measured.md) must write exactly what PEFT's own save would."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from slackdist.model.adapter import lora_module_names
    from slackdist.model.load import quiet_tied_lora_warning
    from slackdist.train.checkpoint import adapter_state_dict

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "down_proj", "lm_head"], ensure_weight_tying=ensure_weight_tying
    )
    with quiet_tied_lora_warning():
        peft_model = get_peft_model(model, config)
    reference = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    # names as FSDP1 and DDP leave them in a gathered state dict
    wrapped = {
        k.replace("layers.0.", "layers.0._fsdp_wrapped_module."): v
        for k, v in peft_model.state_dict().items()
    }
    ours = adapter_state_dict({f"module.{k}": v for k, v in wrapped.items()})
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    assert len(ours) == 2 * len(lora_module_names(peft_model))
