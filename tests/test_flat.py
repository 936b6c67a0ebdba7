"""One flat parameter for the optimizer (slackdist/train/flat.py) trains exactly like the separate parameters."""

from __future__ import annotations

import pytest
import torch

from slackdist.train.flat import FlatParameters


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 3), (3, 8), (5,), (2, 4, 3)]
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _loss(params: list[torch.nn.Parameter], step: int) -> torch.Tensor:
    return sum(((p * (i + 1 + step)) ** 2).sum().sqrt() for i, p in enumerate(params))


def test_params_become_views_of_the_flat_buffer() -> None:
    params = _params(0)
    before = [p.detach().clone() for p in params]
    flat = FlatParameters(params)
    lo = flat.flat.data_ptr()
    hi = lo + flat.flat.numel() * flat.flat.element_size()
    for p, b in zip(params, before, strict=True):
        assert lo <= p.data_ptr() < hi
        assert torch.equal(p, b)
    with torch.no_grad():
        flat.flat.add_(1.0)
    assert all(torch.equal(p, b + 1) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("accumulation", [1, 3])
def test_flat_adamw_with_clipping_equals_per_tensor(accumulation: int) -> None:
    plain, flat_params = _params(1), _params(1)
    flat = FlatParameters(flat_params)
    opt_plain = torch.optim.AdamW(plain, lr=0.05, weight_decay=0.01)
    opt_flat = torch.optim.AdamW([flat.flat], lr=0.05, weight_decay=0.01)
    for step in range(4):
        for micro in range(accumulation):
            _loss(plain, step + micro).backward()
            _loss(flat_params, step + micro).backward()
        norm_plain = torch.nn.utils.clip_grad_norm_(plain, 0.3)
        flat.collect_grads()
        norm_flat = torch.nn.utils.clip_grad_norm_([flat.flat], 0.3)
        assert float(norm_flat) == pytest.approx(float(norm_plain), rel=1e-6)
        opt_plain.step()
        opt_flat.step()
        opt_plain.zero_grad(set_to_none=True)
        flat.zero_grad()
        assert all(p.grad is None for p in flat_params)
    for a, b in zip(plain, flat_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert not torch.equal(plain[0], _params(1)[0])  # they did move


def test_a_missing_gradient_counts_as_zero() -> None:
    params = _params(2)
    flat = FlatParameters(params)
    _loss(params[:2], 0).backward()
    flat.collect_grads()
    n0, n1 = params[0].numel(), params[1].numel()
    assert flat.flat.grad[: n0 + n1].abs().sum() > 0
    assert torch.count_nonzero(flat.flat.grad[n0 + n1 :]) == 0


def test_mixed_dtypes_are_not_flattened() -> None:
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    assert not FlatParameters.possible(params)
    assert not FlatParameters.possible([])
    assert FlatParameters.possible(_params(0))
