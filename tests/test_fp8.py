"""FP8 base matmuls (slackdist/model/fp8.py): exact where FP8 represents the operands, close elsewhere,
the same through dynamo, and a training run with them on saves PEFT's adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import (
    loss_and_grads,
    packed_batch,
    tiny_config,
    tiny_peft_model,
    write_dataset,
)

from slackdist.model.compilation import compile_decoder_layers
from slackdist.model.fp8 import Fp8Matmul, quantize_rows, should_use_fp8, to_fp8, use_fp8_base

pytestmark = pytest.mark.usefixtures("one_thread")


def small_integers(*shape: int, seed: int) -> torch.Tensor:
    """Entries in -2..2 with a 2 in every row: scaled to FP8's range (x 224) they are exact in e4m3."""
    t = torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(seed)).float()
    t[..., 0] = 2.0
    return t


@pytest.mark.parametrize("leading", [(37,), (2, 19), (16,)])
def test_matmul_and_input_gradient_are_exact_for_representable_operands(leading: tuple[int, ...]) -> None:
    """Per-token input scales, per-row weight scales, row padding to 16 and the backward's folding of
    the weight scale into the gradient all have to be right for the result to be exact (up to the fp32
    rounding of scales like 1/224; a wrong scale or transpose is off by whole units)."""
    weight = (
        small_integers(48, 64, seed=1) * torch.tensor([0.5, 1.0, 2.0] * 16)[:, None]
    )  # rows differ in scale
    x = (small_integers(*leading, 64, seed=2) * 0.25).requires_grad_()
    weight8, scale = quantize_rows(weight)
    y = Fp8Matmul.apply(x, weight8, weight8.t().contiguous(), scale.view(-1))
    assert y.shape == (*leading, 48) and y.dtype == x.dtype
    torch.testing.assert_close(y, x.detach() @ weight.t(), rtol=1e-6, atol=1e-5)

    grad = small_integers(*leading, 48, seed=3)
    (dx,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(dx, grad @ weight, rtol=1e-6, atol=1e-5)


def test_random_operands_are_within_fp8_rounding() -> None:
    gen = torch.Generator().manual_seed(0)
    weight, x = (
        torch.randn(96, 128, generator=gen) * 0.02,
        torch.randn(50, 128, generator=gen).requires_grad_(),
    )
    weight8, scale = quantize_rows(weight)
    y = Fp8Matmul.apply(x, weight8, weight8.t().contiguous(), scale.view(-1))
    grad = torch.randn(50, 96, generator=gen)
    (dx,) = torch.autograd.grad(y, x, grad)
    ref = x.detach() @ weight.t()
    assert 0 < (y - ref).norm() / ref.norm() < 0.06  # e4m3 keeps 3 mantissa bits
    assert 0 < (dx - grad @ weight).norm() / (grad @ weight).norm() < 0.06


def test_a_4bit_layer_keeps_its_dequantized_values() -> None:
    """A bitsandbytes NF4 layer converted to FP8 gives what its own 4-bit forward gives, up to FP8 rounding."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128) * 0.02, requires_grad=False, quant_type="nf4")
    layer.bias = torch.nn.Parameter(torch.randn(64), requires_grad=False)
    layer = layer.to("cpu")
    x = torch.randn(20, 128)
    with torch.no_grad():
        want = layer(x)
        to_fp8(layer)
        got = layer(x)
    assert 0 < (got - want).norm() / want.norm() < 0.06
    assert "fp8_weight" not in layer.state_dict()  # a cache, never saved
    # the 4-bit weight is released; its parameter and quant_state stay (state-dict keys unchanged)
    assert layer.weight.numel() == 0 and layer.weight.quant_state is not None
    assert "weight" in layer.state_dict()


def test_peft_model_in_fp8_keeps_its_parameters_and_compiles_to_the_same_result(tiny_model_dir: Path) -> None:
    exact = tiny_peft_model(tiny_model_dir)
    fp8 = tiny_peft_model(tiny_model_dir)
    keys = set(fp8.state_dict())
    before = sum(p.numel() for p in fp8.parameters())
    assert use_fp8_base(fp8) == 7 * fp8.config.num_hidden_layers  # the seven projections; not lm_head
    assert set(fp8.state_dict()) == keys
    # their base weights are released: only the FP8 copies hold them now
    released = [
        m for name, m in fp8.named_modules() if name.endswith(".base_layer") and hasattr(m, "fp8_weight")
    ]
    assert len(released) == 7 * fp8.config.num_hidden_layers and all(m.weight.numel() == 0 for m in released)
    assert sum(p.numel() for p in fp8.parameters()) == before - sum(m.fp8_weight.numel() for m in released)
    assert use_fp8_base(fp8) == 0  # converted once
    # DDP leaves the FP8 copies alone (it would broadcast every buffer before each forward)
    ignored = fp8._ddp_params_and_buffers_to_ignore
    assert len(ignored) == 3 * 7 * fp8.config.num_hidden_layers and all(".fp8_" in n for n in ignored)
    batch = packed_batch(57, 2, fp8.config.vocab_size)
    loss, grads = loss_and_grads(exact, batch)
    loss8, grads8 = loss_and_grads(fp8, batch)
    assert loss8 == pytest.approx(loss, rel=0.01) and loss8 != loss
    for name, g in grads.items():
        assert (grads8[name] - g).norm() <= 0.2 * g.norm(), name

    torch._dynamo.reset()
    compiled = tiny_peft_model(tiny_model_dir)
    use_fp8_base(compiled)
    compile_decoder_layers(compiled, backend="aot_eager")
    for length, seed in ((40, 1), (57, 2)):  # the second length recompiles with dynamic shapes
        batch = packed_batch(length, seed, fp8.config.vocab_size)
        (loss, grads), (loss_c, grads_c) = loss_and_grads(fp8, batch), loss_and_grads(compiled, batch)
        # an fp32 difference in the order of operations can round a value to the next FP8 step: compare
        # each gradient as a whole
        assert loss_c == pytest.approx(loss, rel=1e-5) and grads_c.keys() == grads.keys()
        for name, g in grads.items():
            assert (grads_c[name] - g).norm() <= 1e-4 * g.norm(), name
    torch._dynamo.reset()


def test_ddp_does_not_broadcast_the_fp8_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """DDP (broadcast_buffers=True, as Accelerate builds it) would copy every buffer from rank 0 before each
    forward; a real DDP over gloo (one process) leaves the FP8 copies out and still syncs the rest."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_peft_model(tiny_model_dir)
    use_fp8_base(model)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        broadcast = [id(b) for b in ddp.modules_buffers]
        fp8_ids = {id(b) for name, b in model.named_buffers() if ".fp8_" in name}
        assert fp8_ids and not fp8_ids & set(broadcast)
        assert any(".rotary_emb." in name for name in dict(model.named_buffers()))  # others still broadcast
        assert len(broadcast) == len(dict(model.named_buffers())) - len(fp8_ids)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("setting", "sharded", "expected"),
    [("off", False, False), ("on", False, True), ("on", True, False), ("auto", False, False)],
)
def test_should_use_fp8_on_the_cpu(setting: str, sharded: bool, expected: bool) -> None:
    """auto needs FP8 tensor cores (none on a CPU); on is obeyed unless the weights are sharded."""
    use, why = should_use_fp8(setting, device=torch.device("cpu"), sharded=sharded, compiled=True)
    assert use is expected and why


def test_training_in_fp8_saves_the_adapter_peft_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A 4-bit run with `train.fp8_matmul=on` learns, and its adapter is PEFT's, the same tensors a run
    without it saves."""
    from safetensors.torch import load_file

    from slackdist.train.recipe import train

    data = write_dataset(tmp_path / "data", n_train=12, n_val=4)
    outs = {}
    for fp8 in ("on", "off"):
        outs[fp8] = tmp_path / fp8
        cfg = tiny_config(
            tiny_model_dir,
            data,
            outs[fp8],
            **{
                "model.load_in_4bit": True,
                "train.fp8_matmul": fp8,
                "train.num_epochs": 20,
                "train.max_steps": 8,
            },
        )
        result = train(cfg)
        assert result.global_step == 8
    on, off = (load_file(outs[k] / "adapter_model.safetensors") for k in ("on", "off"))
    assert on.keys() == off.keys() and all(on[k].shape == off[k].shape for k in on)
    assert any(not torch.equal(on[k], off[k]) for k in on)  # FP8 rounding changes the run a little
    metrics = (outs["on"] / "metrics.jsonl").read_text()
    assert '"loss"' in metrics
