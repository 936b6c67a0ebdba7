"""The memory plan (slackdist/train/memory.py): choosing it, and that it never changes what is learned."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from train_helpers import tiny_config, write_dataset

from slackdist.train.memory import GIB, SAFETY, Footprint, choose_plan, fit_footprint

pytestmark = pytest.mark.usefixtures("one_thread")

# Figures of the order measured for Llama-3.2-3B on an H100 (bytes)
FULL = Footprint(fixed=1.2 * GIB, per_token=4.9e6)
CKPT = Footprint(fixed=1.2 * GIB, per_token=0.45e6)


def _plan(
    budget_gib: float,
    micro: int = 2,
    accumulation: int = 2,
    row_tokens: int = 2048,
    full: Footprint = FULL,
    ckpt: Footprint = CKPT,
):
    return choose_plan(
        micro_batch_size=micro,
        accumulation=accumulation,
        row_tokens=row_tokens,
        footprint_full=full,
        footprint_ckpt=ckpt,
        budget_bytes=budget_gib * GIB,
    )


def test_fit_footprint_recovers_the_line() -> None:
    fp = fit_footprint((1024, 2048), (3e9 + 1024 * 5e5, 3e9 + 2048 * 5e5))
    assert fp.fixed == pytest.approx(3e9) and fp.per_token == pytest.approx(5e5)
    assert fp.estimate(4096) == pytest.approx(3e9 + SAFETY * 4096 * 5e5)


def test_large_gpu_gets_the_whole_step_in_one_forward_without_recomputation() -> None:
    plan = _plan(55.0)  # 70% of an 80 GB H100
    assert (plan.rows_per_forward, plan.accumulation, plan.gradient_checkpointing) == (4, 1, False)
    assert plan.estimated_gib == pytest.approx((FULL.fixed + SAFETY * FULL.per_token * 4 * 2048) / GIB)
    assert FULL.estimate(4 * 2048) == pytest.approx(plan.estimated_gib * GIB)
    assert "4 rows per forward x 1 forwards" in plan.describe()


def test_medium_budget_splits_the_step_before_recomputing() -> None:
    plan = _plan(30.0)  # 4 rows need ~47 GiB, 2 rows ~24 GiB
    assert (plan.rows_per_forward, plan.accumulation, plan.gradient_checkpointing) == (2, 2, False)


def test_24gb_card_recomputes() -> None:
    plan = _plan(15.6)  # 70% of a 24 GB card: even one row without recomputation (~12 GiB) fits
    assert not plan.gradient_checkpointing and plan.rows_per_forward == 1
    plan = _plan(8.0)
    assert plan.gradient_checkpointing and plan.rows_per_forward == 4


def test_nothing_fits_falls_back_to_the_configured_micro_batch_with_recomputation() -> None:
    plan = _plan(0.5)
    assert (plan.rows_per_forward, plan.accumulation, plan.gradient_checkpointing) == (2, 2, True)
    assert "nothing fits" in plan.reason


def test_a_probe_that_ran_out_of_memory_never_wins() -> None:
    plan = _plan(60.0, micro=1, accumulation=4, full=Footprint(math.inf, math.inf))
    assert plan.gradient_checkpointing and plan.rows_per_forward == 4


@settings(max_examples=300, deadline=None)
@given(
    micro=st.integers(1, 8),
    accumulation=st.integers(1, 8),
    row_tokens=st.integers(16, 8192),
    budget_gib=st.floats(0.0, 200.0),
    full_per_token=st.floats(1e3, 1e7),
    ckpt_share=st.floats(0.01, 1.0),
)
def test_plan_keeps_the_rows_per_step_and_fits_when_it_says_so(
    micro: int,
    accumulation: int,
    row_tokens: int,
    budget_gib: float,
    full_per_token: float,
    ckpt_share: float,
) -> None:
    full = Footprint(GIB, full_per_token)
    ckpt = Footprint(GIB, full_per_token * ckpt_share)
    plan = _plan(budget_gib, micro, accumulation, row_tokens, full, ckpt)
    assert plan.rows_per_forward * plan.accumulation == micro * accumulation
    if "nothing fits" not in plan.reason:
        assert plan.estimated_gib * GIB <= budget_gib * GIB * (1 + 1e-9)
        # nothing faster would have fit: no checkpointing beats checkpointing, more rows beat fewer
        used = ckpt if plan.gradient_checkpointing else full
        bigger = [
            n
            for n in range(plan.rows_per_forward + 1, micro * accumulation + 1)
            if (micro * accumulation) % n == 0
        ]
        for n in bigger:
            assert used.estimate(n * row_tokens) > budget_gib * GIB
        if plan.gradient_checkpointing:
            assert full.estimate(row_tokens) > budget_gib * GIB


def test_rows_per_forward_does_not_change_the_losses(tiny_model_dir: Path, tmp_path: Path) -> None:
    """What the auto plan relies on: 4 rows in one forward or 1 row x 4 accumulation steps train the
    same model (dropout off, so only float rounding differs)."""
    from slackdist.train.loop import train

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
