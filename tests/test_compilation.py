"""torch.compile of the decoder layers (slackdist/model/compilation.py) gives the eager model's loss and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import assert_same_loss_and_grads, loss_and_grads, packed_batch, tiny_peft_model

from slackdist.model.compilation import compile_decoder_layers, decoder_layers, should_compile

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
