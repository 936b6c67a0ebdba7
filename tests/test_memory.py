"""The memory plan (slackdist/train/memory.py): the probe, choosing a plan, and that a plan never changes what is
learned."""

from __future__ import annotations

import functools
import math
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from train_helpers import tiny_config, write_dataset

from slackdist.train.memory import (
    GIB,
    SAFETY,
    Footprint,
    budget_target,
    choose_plan,
    fit_footprint,
    partial_footprint,
    probe_footprints,
    probe_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Figures of the order measured for Llama-3.2-3B on an H100 (bytes)
FULL = Footprint(fixed=1.2 * GIB, per_token=4.9e6)
CKPT = Footprint(fixed=1.2 * GIB, per_token=0.45e6)
LAYERS = 28


def _plan(
    budget_gib: float,
    micro: int = 2,
    accumulation: int = 2,
    row_tokens: int = 2048,
    full: Footprint = FULL,
    ckpt: Footprint = CKPT,
    layers: int = LAYERS,
):
    return choose_plan(
        micro_batch_size=micro,
        accumulation=accumulation,
        row_tokens=row_tokens,
        layers=layers,
        footprint_full=full,
        footprint_ckpt=ckpt,
        budget_bytes=budget_gib * GIB,
    )


def _split(plan) -> tuple[int, int, int]:
    return plan.rows_per_forward, plan.accumulation, plan.checkpointed_layers


def test_fit_footprint_recovers_the_line() -> None:
    fp = fit_footprint((1024, 2048), (3e9 + 1024 * 5e5, 3e9 + 2048 * 5e5))
    assert fp.fixed == pytest.approx(3e9) and fp.per_token == pytest.approx(5e5)
    assert fp.estimate(4096) == pytest.approx(3e9 + SAFETY * 4096 * 5e5)


def test_partial_footprint_moves_linearly_with_the_checkpointed_share() -> None:
    assert partial_footprint(FULL, CKPT, 0.0) == FULL and partial_footprint(FULL, CKPT, 1.0) == CKPT
    half = partial_footprint(FULL, CKPT, 0.5)
    assert half.per_token == pytest.approx((FULL.per_token + CKPT.per_token) / 2)


@pytest.mark.parametrize(
    ("total_gib", "budget_gib", "max_memory_gib", "expected_gib"),
    [
        (80.0, 0.0, 0.0, 56.0),  # the default: 70% of the card
        (22.3, 0.0, 0.0, 15.61),  # a 24 GB card
        (80.0, 0.0, 22.3, 15.61),  # an 80 GB card told to act as a 24 GB one
        (80.0, 0.0, 12.0, 8.4),  # the low-memory setting
        (80.0, 16.0, 0.0, 16.0),  # an explicit budget
        (80.0, 100.0, 0.0, 72.0),  # never beyond 90% of the card
        (80.0, 16.0, 12.0, 10.8),  # nor of the allocator's cap
    ],
)
def test_budget_target(
    total_gib: float, budget_gib: float, max_memory_gib: float, expected_gib: float
) -> None:
    assert budget_target(total_gib * GIB, budget_gib, max_memory_gib) / GIB == pytest.approx(expected_gib)


def test_large_budget_gets_the_whole_step_in_one_forward_without_recomputation() -> None:
    plan = _plan(55.0)  # 70% of an 80 GB H100
    assert _split(plan) == (4, 1, 0)
    assert plan.estimated_gib == pytest.approx((FULL.fixed + SAFETY * FULL.per_token * 4 * 2048) / GIB)
    assert "4 rows per forward x 1 forwards" in plan.describe()
    assert "checkpointing on 0 of 28 layers" in plan.describe()


@pytest.mark.parametrize("budget_gib", [30.0, 15.6, 8.0])
def test_smaller_budgets_keep_the_rows_together_and_checkpoint_only_the_layers_they_must(
    budget_gib: float,
) -> None:
    plan = _plan(budget_gib)  # 4 rows without recomputation need ~44 GiB
    rows, _, k = _split(plan)
    assert rows == 4 and 0 < k < LAYERS
    assert partial_footprint(FULL, CKPT, k / LAYERS).estimate(4 * 2048) <= budget_gib * GIB
    assert partial_footprint(FULL, CKPT, (k - 1) / LAYERS).estimate(4 * 2048) > budget_gib * GIB
    assert f"checkpointing on {k} of 28 layers" in plan.describe()


def test_rows_split_only_when_recomputing_every_layer_is_not_enough() -> None:
    rows, accumulation, k = _split(_plan(3.0))  # all layers checkpointed: 4 rows ~5.2 GiB, 2 rows ~3.2
    assert (rows, accumulation) == (1, 4) and 0 < k < LAYERS


def test_nothing_fits_falls_back_to_the_configured_micro_batch_with_recomputation() -> None:
    plan = _plan(0.5)
    assert _split(plan) == (2, 2, LAYERS)
    assert "nothing fits" in plan.reason


class TensorMemory(TorchDispatchMode):
    """A `PeakMeter` for the CPU, where torch keeps no allocator statistics: the bytes of the tensor
    storages a step creates and still holds, and their peak. Beyond `cap_bytes` it refuses with
    torch.OutOfMemoryError, as the CUDA allocator does beyond `train.max_memory_gib`."""

    def __init__(self, cap_bytes: float = math.inf) -> None:
        super().__init__()
        self.cap_bytes = cap_bytes
        self.peak_bytes = 0.0
        self.refusals: list[bool] = []
        """One entry per refusal: whether it struck in backward."""

    def __enter__(self) -> TensorMemory:
        self.live, self.peak_bytes, self.held = 0, 0.0, {}
        return super().__enter__()

    def _freed(self, held: dict, key: int, nbytes: int) -> None:
        if held is self.held and held.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or id(t.untyped_storage()) in self.held:
                continue
            storage, nbytes = t.untyped_storage(), t.untyped_storage().nbytes()
            callback = functools.partial(self._freed, self.held, id(storage), nbytes)
            self.held[id(storage)] = weakref.ref(storage, lambda _, callback=callback: callback())
            self.live += nbytes
            self.peak_bytes = max(self.peak_bytes, float(self.live))
            if self.live > self.cap_bytes:
                self.refusals.append(torch._C._current_autograd_node() is not None)
                raise torch.OutOfMemoryError(f"{self.live} bytes held, over the cap of {self.cap_bytes:.0f}")
        return out


PROBE_SIZES = (256, 512)


@pytest.fixture(scope="module")
def probe(tiny_model_dir: Path):
    """`run_step` of the probe `plan_memory` runs on a GPU, on the tiny model with LoRA on the CPU."""
    from accelerate import Accelerator

    from slackdist.config import LoraSettings, ModelConfig
    from slackdist.model.load import add_lora, load_base_model, load_tokenizer

    base = load_base_model(ModelConfig(base_model=str(tiny_model_dir)), dtype=torch.float32, quantize=False)
    model = add_lora(base, LoraSettings(r=4, alpha=8), gradient_checkpointing=False)
    pad_id = load_tokenizer(str(tiny_model_dir)).pad_token_id
    accelerator = Accelerator(cpu=True)

    def run_step(n: int) -> None:
        probe_step(model, n, accelerator=accelerator, pad_id=pad_id, varlen=False, chunk_size=64)

    # What the first steps leave behind (caches, the input-grad hook of the first checkpointing) is
    # not a step's memory: measure from then on.
    probe_footprints(model, run_step, TensorMemory(), PROBE_SIZES)
    return model, run_step


def _peak(fp: Footprint, tokens: int) -> float:
    return fp.fixed + fp.per_token * tokens


def test_real_probe_measures_what_checkpointing_saves(probe) -> None:
    model, run_step = probe
    full, ckpt = probe_footprints(model, run_step, TensorMemory(), PROBE_SIZES)
    assert 0 < ckpt.per_token < full.per_token  # recomputed layers hold fewer activations per token
    assert probe_footprints(model, run_step, TensorMemory(), PROBE_SIZES) == (full, ckpt)  # deterministic
    layers = model.config.num_hidden_layers
    assert _split(_plan(1e3, 1, 4, 512, full, ckpt, layers)) == (4, 1, 0)  # plenty of room: no recomputation


def test_a_probe_that_runs_out_of_memory_never_wins(probe) -> None:
    """Under a cap only the checkpointed step fits, the step without checkpointing runs out of memory:
    the handler turns that into an infinite footprint and the plan recomputes every layer."""
    model, run_step = probe
    full, ckpt = probe_footprints(model, run_step, TensorMemory(), PROBE_SIZES)
    rng = torch.get_rng_state()
    meter = TensorMemory(cap_bytes=(_peak(full, 512) + _peak(ckpt, 512)) / 2)
    capped_full, capped_ckpt = probe_footprints(model, run_step, meter, PROBE_SIZES)
    assert len(meter.refusals) == 1 and capped_full == Footprint(math.inf, math.inf)
    assert capped_ckpt == ckpt
    assert torch.equal(torch.get_rng_state(), rng)  # the run's dropout masks are not shifted
    layers = model.config.num_hidden_layers
    assert _split(_plan(1e3, 1, 4, 512, capped_full, capped_ckpt, layers)) == (4, 1, layers)


def test_out_of_memory_in_backward_leaves_no_gradients(probe) -> None:
    """A cap that the checkpointed step only breaks in backward (where it recomputes), and that the step
    without checkpointing breaks at once: both settings are out of memory, the handler drops the
    gradients the failed backward had made, the plan falls back to the configured split, and the
    model trains on."""
    model, run_step = probe
    _, ckpt = probe_footprints(model, run_step, TensorMemory(), PROBE_SIZES)
    meter = TensorMemory(cap_bytes=(_peak(ckpt, 256) + _peak(ckpt, 512)) / 2)
    footprints = probe_footprints(model, run_step, meter, PROBE_SIZES)
    assert footprints == (Footprint(math.inf, math.inf),) * 2
    assert meter.refusals[-1] is True  # the checkpointed step failed in backward, gradients half made
    assert all(p.grad is None for p in model.parameters())
    plan = _plan(1e3, 1, 4, 512, *footprints, model.config.num_hidden_layers)
    assert _split(plan) == (1, 4, model.config.num_hidden_layers) and "nothing fits" in plan.reason
    run_step(PROBE_SIZES[1])


def test_a_model_without_checkpointable_layers_plans_rows_only() -> None:
    assert _split(_plan(30.0, layers=0)) == (2, 2, 0)


@settings(max_examples=300, deadline=None)
@given(
    micro=st.integers(1, 8),
    accumulation=st.integers(1, 8),
    row_tokens=st.integers(16, 8192),
    layers=st.integers(1, 40),
    budget_gib=st.floats(0.0, 200.0),
    full_per_token=st.floats(1e3, 1e7),
    ckpt_share=st.floats(0.01, 1.0),
)
def test_plan_keeps_the_rows_per_step_and_nothing_faster_fits(
    micro: int,
    accumulation: int,
    row_tokens: int,
    layers: int,
    budget_gib: float,
    full_per_token: float,
    ckpt_share: float,
) -> None:
    full = Footprint(GIB, full_per_token)
    ckpt = Footprint(GIB, full_per_token * ckpt_share)
    plan = _plan(budget_gib, micro, accumulation, row_tokens, full, ckpt, layers)
    rows = micro * accumulation
    assert plan.rows_per_forward * plan.accumulation == rows
    assert 0 <= plan.checkpointed_layers <= layers
    budget = budget_gib * GIB * (1 + 1e-9)
    if "nothing fits" in plan.reason:
        return
    n, k = plan.rows_per_forward, plan.checkpointed_layers
    assert partial_footprint(full, ckpt, k / layers).estimate(n * row_tokens) <= budget
    # nothing faster fits: more rows per forward even with every layer checkpointed, or the same
    # rows with fewer checkpointed layers
    for more in range(n + 1, rows + 1):
        if rows % more == 0:
            assert ckpt.estimate(more * row_tokens) > budget
    for fewer in range(k):
        assert partial_footprint(full, ckpt, fewer / layers).estimate(n * row_tokens) > budget


def test_rows_per_forward_does_not_change_the_losses(tiny_model_dir: Path, tmp_path: Path) -> None:
    """What the auto plan relies on: 4 rows in one forward or 1 row x 4 accumulation steps train the
    same model (dropout off, so only float rounding differs)."""
    from slackdist.train.recipe import train

    data = write_dataset(tmp_path / "data", n_train=24, n_val=4)
    losses = {}
    for micro, accumulation in ((4, 1), (1, 4)):
        cfg = tiny_config(
            tiny_model_dir,
            data,
            tmp_path / f"out_{micro}x{accumulation}",
            **{
                "train.micro_batch_size": micro,
                "train.gradient_accumulation_steps": accumulation,
                "train.max_steps": 3,
                "lora.dropout": 0.0,
            },
        )
        result = train(cfg)
        losses[micro] = result.losses
    assert len(losses[4]) == 3
    for step, loss in losses[4].items():
        assert loss == pytest.approx(losses[1][step], abs=1e-5), step


def test_probe_cache_round_trip_and_key(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """The probe's figures are reused only for the same model, LoRA, loss chunking, sizes and GPU."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from slackdist.config import Config
    from slackdist.train import memory

    monkeypatch.setenv("SLACKDIST_CACHE_DIR", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = Config()
    cpu = torch.device("cpu")
    key = memory.probe_key(model, cfg, cpu, (1024, 2048), varlen=False)
    assert memory.read_probe_cache(key) is None
    full, ckpt = memory.Footprint(1e9, 2e5), memory.Footprint(8e8, float("inf"))  # inf: the probe ran out
    memory.write_probe_cache(key, full, ckpt)
    assert memory.read_probe_cache(key) == (full, ckpt)
    assert (tmp_path / "cache" / "memory_probe.json").is_file()

    other_lora = replace(cfg, lora=replace(cfg.lora, r=8))
    assert memory.probe_key(model, other_lora, cpu, (1024, 2048), varlen=False) != key
    assert memory.probe_key(model, cfg, cpu, (512, 1024), varlen=False) != key
    # FP8 base matmuls keep other tensors for the backward: train.fp8_matmul=auto decides per run, so the
    # key says what the model does, not the setting
    from train_helpers import tiny_peft_model

    from slackdist.model.fp8 import use_fp8_base

    peft = tiny_peft_model(tiny_model_dir)
    bf16_key = memory.probe_key(peft, cfg, cpu, (1024, 2048), varlen=False)
    use_fp8_base(peft)
    assert memory.probe_key(peft, cfg, cpu, (1024, 2048), varlen=False) != bf16_key
    model.config.num_hidden_layers += 1  # another model
    assert memory.probe_key(model, cfg, cpu, (1024, 2048), varlen=False) != key
    (tmp_path / "cache" / "memory_probe.json").write_text("{not json")  # a broken cache is no cache
    assert memory.read_probe_cache(key) is None
