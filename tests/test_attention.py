"""Varlen attention for packed rows (slackdist/model/attention.py).

On CPU the fused torch kernel does not exist: these tests run the same attention
function with its per-sequence SDPA stand-in, which covers the boundaries, reshapes and
GQA handling. The kernel itself is compared against SDPA in the GPU test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slackdist.data.examples import make_example
from slackdist.model.attention import (
    VARLEN_ATTENTION,
    cu_seqlens_from_position_ids,
    register_varlen_attention,
    varlen_attention_forward,
    varlen_kwargs,
)
from slackdist.train.packing import collate, pack

CHATS = [
    [
        {"role": "system", "content": "You are on the team."},
        {"role": "user", "content": "Is the deploy done?"},
        {"role": "assistant", "content": "Yes, an hour ago."},
    ],
    [
        {"role": "system", "content": "You are on the team. This is #random."},
        {"role": "user", "content": "Lunch?"},
        {"role": "assistant", "content": "Ramen!"},
        {"role": "user", "content": "Noon?"},
        {"role": "assistant", "content": "Sure."},
    ],
    [
        {"role": "system", "content": "You are on the team."},
        {"role": "user", "content": "Build fails: ImportError"},
        {"role": "assistant", "content": "Pin the version."},
    ],
]


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4, 5, 6]])
    cu, max_len = cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 9, 11, 18] and max_len == 7
    # every row starts a sequence, even when positions run on across rows; 1-D input works
    cu, max_len = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2], [3, 4, 5]]))
    assert cu.tolist() == [0, 3, 6] and max_len == 3
    cu, max_len = cu_seqlens_from_position_ids(torch.tensor([0, 1, 0, 1, 2]))
    assert cu.tolist() == [0, 2, 5] and max_len == 3
    # a jump that is not +1 also starts a sequence (e.g. padding whose positions restart later)
    cu, _ = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 7, 8]]))
    assert cu.tolist() == [0, 3, 5]
    kw = varlen_kwargs(pos)
    assert kw["cu_seq_lens_q"] is kw["cu_seq_lens_k"] and kw["max_length_q"] == kw["max_length_k"] == 7


def _models(tiny_model_dir: Path, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    out = {}
    for attn in ("sdpa", register_varlen_attention()):
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype, attn_implementation=attn).to(
            device
        )
        m.config.use_cache = False
        out[attn] = m.eval()
    return out


def _packed_batch(tokenizer):
    examples = [make_example(tokenizer, c, train_on="assistant") for c in CHATS]
    rows = pack(examples, max_seq_len=max(len(e) for e in examples) + 8, seed=0, epoch=0)
    return examples, rows, collate(rows, tokenizer.pad_token_id, varlen_kwargs=True)


def _alone_by_ids(model, examples, device):
    out = {}
    with torch.no_grad():
        for ex in examples:
            out[tuple(ex.input_ids)] = model(input_ids=torch.tensor([ex.input_ids], device=device)).logits[0]
    return out


def _check_packed(logits, rows, alone, **tol):
    for b, row in enumerate(rows):
        start = 0
        for n in row.seq_lens:
            want = alone[tuple(row.input_ids[start : start + n])]
            torch.testing.assert_close(logits[b, start : start + n].float(), want.float(), **tol)
            start += n


def test_varlen_function_on_cpu_matches_sdpa_alone(tiny_model_dir):
    from slackdist.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    models = _models(tiny_model_dir, "cpu", torch.float32)
    examples, rows, batch = _packed_batch(tokenizer)
    assert len(rows) >= 2  # a [B, T] batch, flattened into one varlen batch
    alone = _alone_by_ids(models["sdpa"], examples, "cpu")
    varlen = models[VARLEN_ATTENTION]
    with torch.no_grad():
        # boundaries from position_ids (computed inside attention)...
        logits = varlen(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        _check_packed(logits, rows, alone, rtol=1e-5, atol=1e-5)
        # ...or passed in, computed on the CPU by collate
        extra = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
        logits2 = varlen(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **extra).logits
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)


def test_varlen_gets_no_dense_mask(tiny_model_dir):
    from transformers import AttentionInterface, AutoModelForCausalLM

    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("slackdist_varlen_spy", spy)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="slackdist_varlen_spy")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), use_cache=False)
    assert len(seen) == model.config.num_hidden_layers and all(m is None for m in seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_varlen_kernel_matches_sdpa_on_gpu(tmp_path):
    from slackdist.model.attention import varlen_available
    from slackdist.model.load import load_tokenizer
    from slackdist.model.tiny import write_tiny_model

    assert varlen_available("cuda"), "torch.nn.attention.varlen.varlen_attn is missing (torch >= 2.10 needed)"
    # head_dim 64 and GQA 8:2, bf16: the shapes the flash kernel is built for
    model_dir = write_tiny_model(tmp_path / "m", hidden_size=512, heads=8, kv_heads=2, intermediate_size=1024)
    tokenizer = load_tokenizer(str(model_dir))
    models = _models(model_dir, "cuda", torch.bfloat16)
    examples, rows, batch = _packed_batch(tokenizer)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    alone = _alone_by_ids(models["sdpa"], examples, "cuda")
    with torch.no_grad():
        varlen = models[VARLEN_ATTENTION](
            input_ids=batch["input_ids"], position_ids=batch["position_ids"]
        ).logits
        sdpa = models["sdpa"](input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    _check_packed(sdpa, rows, alone, rtol=2e-2, atol=2e-2)
    _check_packed(varlen, rows, alone, rtol=2e-2, atol=2e-2)

    # gradients through the kernel agree with SDPA's on the packed batch
    grads = {}
    for name, model in models.items():
        emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, position_ids=batch["position_ids"]).logits
        out.float().logsumexp(-1).sum().backward()
        grads[name] = emb.grad.float()
    real = torch.zeros_like(batch["input_ids"], dtype=torch.bool)  # real tokens, not padding
    for b, row in enumerate(rows):
        real[b, : len(row)] = True
    torch.testing.assert_close(grads[VARLEN_ATTENTION][real], grads["sdpa"][real], rtol=5e-2, atol=5e-2)
