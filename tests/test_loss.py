"""Chunked lm_head + cross-entropy equals the plain full-logits loss (slackdist/model/loss.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slackdist.model.loss import chunked_lm_loss


def _setup(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 11, 16, generator=g, dtype=dtype, requires_grad=True)
    lm_head = torch.nn.Linear(16, 50, bias=False).to(dtype)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(50, 16, generator=g))
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[torch.rand(3, 11, generator=g) < 0.4] = -100
    labels[2] = -100  # a row without any label
    return hidden, lm_head, labels


def _plain(hidden, lm_head, labels):
    logits = lm_head(hidden).float()[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")


@pytest.mark.parametrize("chunk_size", [0, 1, 3, 7, 1000])
def test_chunked_equals_plain_loss_and_grads(chunk_size):
    hidden, lm_head, labels = _setup()
    expected = _plain(hidden, lm_head, labels)
    expected.backward()
    want_h, want_w = hidden.grad.clone(), lm_head.weight.grad.clone()
    hidden.grad = None
    lm_head.weight.grad = None

    loss, n = chunked_lm_loss(hidden, lm_head, labels, chunk_size)
    assert n == int((labels[:, 1:] != -100).sum()) > 0
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)
    loss.backward()
    torch.testing.assert_close(hidden.grad, want_h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lm_head.weight.grad, want_w, rtol=1e-6, atol=1e-6)
    assert hidden.grad[2].abs().sum() == 0  # unlabelled positions get no gradient


def test_loss_is_fp32_for_bf16_hidden():
    hidden, lm_head, labels = _setup(1, torch.bfloat16)
    loss, _ = chunked_lm_loss(hidden, lm_head, labels, 4)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, _plain(hidden, lm_head, labels), rtol=1e-3, atol=1e-2)


def test_no_labels_gives_zero_and_a_working_backward():
    hidden, lm_head, labels = _setup()
    loss, n = chunked_lm_loss(hidden, lm_head, torch.full_like(labels, -100), 4)
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def test_only_shifted_labels_count():
    hidden, lm_head, _ = _setup()
    labels = torch.full((3, 11), -100)
    labels[:, 0] = 5  # a label on the first position is never predicted by anything
    loss, n = chunked_lm_loss(hidden, lm_head, labels, 4)
    assert n == 0
    labels[0, 4] = 7
    loss, n = chunked_lm_loss(hidden, lm_head, labels, 4)
    assert n == 1
    expected = F.cross_entropy(lm_head(hidden[0, 3]).float()[None], torch.tensor([7]), reduction="sum")
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("chunk_size", [0, 3, 1000])
def test_positions_counted_on_the_cpu_give_the_same_loss_and_grads(chunk_size):
    """`collate`'s label_positions (no GPU sync) select what the label mask selects."""
    hidden, lm_head, labels = _setup(2)
    loss, n = chunked_lm_loss(hidden, lm_head, labels, chunk_size)
    loss.backward()
    want_h, want_w = hidden.grad.clone(), lm_head.weight.grad.clone()
    hidden.grad = None
    lm_head.weight.grad = None

    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != -100
    positions = counted.flatten().nonzero().flatten()
    got, m = chunked_lm_loss(hidden, lm_head, labels, chunk_size, positions=positions)
    assert m == n > 0
    torch.testing.assert_close(got, loss)
    got.backward()
    torch.testing.assert_close(hidden.grad, want_h)
    torch.testing.assert_close(lm_head.weight.grad, want_w)
