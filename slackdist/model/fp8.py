"""FP8 matmuls for the frozen base projections of a LoRA model (GPUs of compute capability 8.9+).

LoRA trains only the adapters: the base projections' weights never change, and they need no weight
gradient. QLoRA still dequantizes each 4-bit weight to bf16 in every forward and backward and runs
the base matmuls in bf16, and on an H100 those matmuls are most of a compiled step's kernel time
(57%, bench/README.md), where FP8 tensor cores run twice bf16's rate. `use_fp8_base` converts each
base projection's weight once, at setup, to float8 e4m3 with one scale per output row (from the
weight as the model computes with it: a 4-bit weight is dequantized first), and gives the projection
a forward that quantizes its input per token and multiplies with `torch._scaled_mm`:

    forward   y  = x @ W.T   = (s_x * x8) @ (W8.T * s_w)         scales per token and per output row
    backward  dx = dy @ W    = (dy * s_w) @ W8                    dy * s_w quantized per token

This is torchao's float8 "rowwise" recipe for a frozen weight: e4m3 for inputs and gradients alike,
fp32 scales, bf16 results. No library applies it to a 4-bit (bitsandbytes) base: torchao's float8
training converts `nn.Linear` modules whose weights train. The adapters (A, B, dropout) and the
LM head stay as they were, in bf16 under autocast.

The FP8 weight is kept twice, as non-persistent buffers in the two layouts the forward and the
backward need, two bytes a weight: 5.6 GB for the 3B model, which the memory plan measures with the
rest. The weight it was made from is released (its parameter keeps its place, emptied): nothing in a
training run reads it again (the adapter is saved alone, `merge_after_training` loads the base anew),
and on a 24 GB card the 1.4 GB of 4-bit weights of the 3B model are a layer less to recompute
(bench/README.md). The result differs from bf16 by FP8 rounding (3 mantissa bits): 100 steps on an
H100 traced the loss of the plain bf16 path within 0.31% (bench/train_throughput.py --quality-steps).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch.nn.parallel import DistributedDataParallel

from slackdist.model.compilation import decoder_layers

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
ALIGN = 16
"""`_scaled_mm` needs every dimension a multiple of 16: rows are padded to it, weights must have it."""
FP8_BUFFERS = ("fp8_weight", "fp8_weight_t", "fp8_scale")
FP8_HOLDS = "fp8_weight, fp8_weight_t, fp8_scale; base weight released"
"""What a converted layer keeps in memory: part of the memory probe's cache key (change it with them)."""
MIN_CAPABILITY = (8, 9)
"""Ada (RTX 40xx, L4, L40) and Hopper have FP8 tensor cores; Ampere (A100, RTX 30xx) does not."""


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores on `device`: a CUDA GPU of compute capability 8.9 or higher."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def should_use_fp8(setting: str, *, device: torch.device, sharded: bool, compiled: bool) -> tuple[bool, str]:
    """`train.fp8_matmul` decided for one run: (use it or not, why).

    "auto" uses FP8 in a compiled run on a GPU that has FP8 tensor cores; "on" also eager and on the
    CPU (slow: for tests); "off" never. Eager, quantizing each input and gradient costs more than the
    faster matmuls save (on an H100 at 3B, 13,454 against 19,342 tokens/s; compiled, 33,580 against
    27,364: bench/README.md). FSDP and DeepSpeed shard the weights the FP8 copy is made from.
    """
    if setting == "off":
        return False, "train.fp8_matmul=off"
    if sharded:
        return False, "FSDP / DeepSpeed shard the base weights"
    if setting == "on":
        return True, "train.fp8_matmul=on"
    if not fp8_supported(device):
        return False, "not a GPU with FP8 tensor cores, compute capability 8.9+"
    if not compiled:
        return False, "the layers run eager, where FP8 is slower"
    return True, f"compiled, on {torch.cuda.get_device_name(device)}'s FP8 tensor cores"


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` `[M, K]` as float8 e4m3 with one fp32 scale per row: `t ~ t8 * scale`."""
    amax = t.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    t8 = (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return t8, scale


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`t` as `[M, K]` with M padded up to a multiple of ALIGN (zero rows), and the real M."""
    flat = t.reshape(-1, t.shape[-1])
    m = flat.shape[0]
    return F.pad(flat, (0, 0, 0, (-m) % ALIGN)), m


class Fp8Matmul(torch.autograd.Function):
    """`x @ W.T` with W given as `W8 * scale[:, None]`; gradient for x only (W is frozen).

    `_scaled_mm` takes its second operand column-major: `W8.T` is that for the forward, and the
    backward's `W8` is the transpose of `weight8_t = W8.T.contiguous()`, kept beside it because
    transposing in every backward cost as long as the matmul itself (H100, bench/README.md).
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight8: torch.Tensor, weight8_t: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(weight8_t, scale)
        ctx.shape = x.shape
        ctx.dtype = x.dtype
        rows, m = _rows(x)
        x8, x_scale = quantize_rows(rows)
        # fast accumulation for the output, exact for the gradient: torchao's float8 defaults
        out = torch._scaled_mm(
            x8,
            weight8.t(),
            scale_a=x_scale,
            scale_b=scale.view(1, -1),
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
        return out[:m].to(x.dtype).view(*x.shape[:-1], weight8.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        weight8_t, scale = ctx.saved_tensors
        rows, m = _rows(grad)
        g8, g_scale = quantize_rows(rows.float() * scale.view(1, -1))  # dy @ W = (dy * s_w) @ W8
        ones = torch.ones(1, weight8_t.shape[0], device=weight8_t.device, dtype=torch.float32)
        dx = torch._scaled_mm(g8, weight8_t.t(), scale_a=g_scale, scale_b=ones, out_dtype=torch.bfloat16)
        return dx[:m].to(ctx.dtype).view(ctx.shape), None, None, None


def dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The weight `layer` computes with, `[out, in]`: a bitsandbytes 4-bit weight dequantized."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.detach()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, state)


def _fp8_forward(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    out = Fp8Matmul.apply(x, self.fp8_weight, self.fp8_weight_t, self.fp8_scale)
    return out if self.bias is None else out + self.bias.to(out.dtype)


def to_fp8(layer: torch.nn.Module) -> None:
    """Give a frozen linear layer its FP8 weight and the FP8 forward, and release the weight it had."""
    weight8, scale = quantize_rows(dense_weight(layer))
    for name, value in zip(FP8_BUFFERS, (weight8, weight8.t().contiguous(), scale.view(-1)), strict=True):
        layer.register_buffer(name, value, persistent=False)
    layer.forward = types.MethodType(_fp8_forward, layer)
    # the parameter stays (a state dict keeps its keys, a 4-bit weight its quant_state), emptied
    layer.weight.data = torch.empty(0, dtype=layer.weight.dtype, device=layer.weight.device)


def uses_fp8(model: torch.nn.Module) -> bool:
    """Whether `use_fp8_base` converted any of `model`'s projections."""
    return any(name.endswith(".fp8_weight") for name, _ in model.named_buffers())


def use_fp8_base(model: torch.nn.Module) -> int:
    """Run the base matmul of every LoRA projection inside the decoder layers in FP8; return how many.

    Projections whose dimensions are not multiples of 16, or whose base weight trains, stay as they are;
    converted ones are not converted again (their base weight is released).
    """
    count = 0
    for block in decoder_layers(model):
        for module in block.modules():
            if not isinstance(module, LoraLayer):
                continue
            base = module.get_base_layer()
            out_features, in_features = base.out_features, base.in_features
            if (
                out_features % ALIGN
                or in_features % ALIGN
                or base.weight.requires_grad
                or hasattr(base, FP8_BUFFERS[0])
            ):
                continue
            to_fp8(base)
            count += 1
    # DDP would broadcast every buffer from rank 0 before each forward: 2 bytes a weight, never changed
    ignored = [name for name, _ in model.named_buffers() if name.rsplit(".", 1)[-1] in FP8_BUFFERS]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return count
