"""Shared-input LoRA (slackdist/model/shared_lora.py): PEFT's results, one dropout and one A matmul a group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import assert_same_loss_and_grads, loss_and_grads, packed_batch, tiny_peft_model

from slackdist.model.compilation import compile_decoder_layers
from slackdist.model.shared_lora import share_lora_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_inputs_give_peft_loss_and_gradients(tiny_model_dir: Path, checkpointing: bool) -> None:
    peft = tiny_peft_model(tiny_model_dir, checkpointing=checkpointing)
    shared = tiny_peft_model(tiny_model_dir, checkpointing=checkpointing)
    blocks = share_lora_inputs(shared)
    assert blocks == 2 * peft.config.num_hidden_layers  # one attention and one MLP a layer
    for length, seed in ((40, 1), (57, 2)):
        batch = packed_batch(length, seed, peft.config.vocab_size)
        assert_same_loss_and_grads(loss_and_grads(peft, batch), loss_and_grads(shared, batch))


@pytest.mark.parametrize(("family", "blocks"), [("qwen2", 4), ("mistral", 4), ("gemma2", 4), ("phi3", 0)])
def test_other_families(tmp_path: Path, family: str, blocks: int) -> None:
    """Qwen2 (biases on q/k/v), Mistral and Gemma 2 share their groups' input with PEFT's results; Phi-3's
    projections are fused already (qkv_proj, gate_up_proj): nothing to share, PEFT's forward."""
    from slackdist.model.tiny import write_tiny_model

    model_dir = write_tiny_model(tmp_path / family, family=family)
    peft = tiny_peft_model(model_dir, varlen=False)
    shared = tiny_peft_model(model_dir, varlen=False)
    assert share_lora_inputs(shared) == blocks
    batch = packed_batch(40, 1, peft.config.vocab_size, varlen=False)
    assert_same_loss_and_grads(loss_and_grads(peft, batch), loss_and_grads(shared, batch))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_shared_inputs_match_eager(tiny_model_dir: Path, checkpointing: bool) -> None:
    """Through dynamo and autograd (aot_eager, as inductor traces), over packed rows of three lengths,
    with and without recomputation (which runs each block's forward twice)."""
    torch._dynamo.reset()
    eager = tiny_peft_model(tiny_model_dir)
    compiled = tiny_peft_model(tiny_model_dir, checkpointing=checkpointing)
    share_lora_inputs(compiled)
    compile_decoder_layers(compiled, backend="aot_eager")
    for length, seed in ((40, 1), (57, 2), (33, 3)):
        batch = packed_batch(length, seed, eager.config.vocab_size)
        assert_same_loss_and_grads(loss_and_grads(eager, batch), loss_and_grads(compiled, batch))
    torch._dynamo.reset()


def test_a_group_draws_one_dropout_mask_and_keeps_peft_parameters(tiny_model_dir: Path) -> None:
    model = tiny_peft_model(tiny_model_dir, dropout=0.1)
    keys = set(model.state_dict())
    share_lora_inputs(model)
    assert set(model.state_dict()) == keys  # the saved adapter is PEFT's
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if name.endswith("lora_dropout.default"):
            module.register_forward_hook(
                lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
            )
    loss_and_grads(model, packed_batch(40, 1, model.config.vocab_size))
    by_projection = {name.split(".")[-3]: n for name, n in calls.items() if ".layers.0." in name}
    # the group's first projection draws the mask for all of it; o_proj and down_proj keep their own
    assert by_projection == {"q_proj": 1, "gate_proj": 1, "o_proj": 1, "down_proj": 1}


def test_disabled_adapters_give_the_base_model(tiny_model_dir: Path) -> None:
    model = tiny_peft_model(tiny_model_dir)
    batch = packed_batch(40, 1, model.config.vocab_size)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs).logits
    share_lora_inputs(model)
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, base)
        assert not torch.allclose(model(**inputs).logits, base)  # the adapters are back, and matter
