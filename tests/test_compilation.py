"""torch.compile of the decoder layers (slackdist/model/compilation.py) gives the eager model's loss and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slackdist.config import LoraSettings, ModelConfig
from slackdist.model.compilation import compile_decoder_layers, decoder_layers, should_compile

pytestmark = pytest.mark.usefixtures("one_thread")


def _peft_model(model_dir: Path):
    from slackdist.model.attention import register_varlen_attention
    from slackdist.model.load import add_lora, load_base_model

    model = load_base_model(ModelConfig(base_model=str(model_dir)), dtype=torch.float32, quantize=False)
    model.set_attn_implementation(register_varlen_attention())
    torch.manual_seed(0)
    peft_model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
    # B starts at zero; make the adapters matter
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return peft_model.train()


def _batch(length: int, seed: int, vocab: int) -> dict[str, torch.Tensor]:
    from slackdist.train.packing import PackedRow, collate

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (length,), generator=g).tolist()
    half = length // 2
    positions = list(range(half)) + list(range(length - half))
    labels = [-100 if p == 0 else t for p, t in zip(positions, ids, strict=True)]
    row = PackedRow(input_ids=ids, labels=labels, position_ids=positions, seq_lens=[half, length - half])
    return collate([row], pad_id=0, varlen_kwargs=True)


def _loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    from accelerate import Accelerator

    from slackdist.train.step import forward_loss

    loss = forward_loss(model, batch, accelerator=Accelerator(cpu=True), chunk_size=16)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_decoder_layers_are_found_through_peft(tiny_model_dir: Path) -> None:
    model = _peft_model(tiny_model_dir)
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in layers)


def test_compiled_layers_match_eager(tiny_model_dir: Path) -> None:
    """Same loss and LoRA gradients, over packed rows of two lengths (dynamic shapes, varlen attention
    outside the graph). aot_eager traces through dynamo and autograd as inductor does, without a C compiler."""
    torch._dynamo.reset()
    eager = _peft_model(tiny_model_dir)
    compiled = _peft_model(tiny_model_dir)
    assert compile_decoder_layers(compiled, backend="aot_eager") == eager.config.num_hidden_layers
    for length, seed in ((40, 1), (57, 2), (33, 3)):
        batch = _batch(length, seed, eager.config.vocab_size)
        loss_e, grads_e = _loss_and_grads(eager, batch)
        loss_c, grads_c = _loss_and_grads(compiled, batch)
        assert loss_c == pytest.approx(loss_e, rel=1e-5)
        assert grads_c.keys() == grads_e.keys() and grads_e
        for name, g in grads_e.items():
            torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-6, msg=name)
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
