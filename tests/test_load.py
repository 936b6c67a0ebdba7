"""Base model loading (4-bit on CPU), LoRA on the tied lm_head, inference loading (slackdist/model/load.py)."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

from slackdist.config import Config, LoraSettings, ModelConfig, save_config
from slackdist.errors import SlackdistError
from slackdist.model import load as load_mod
from slackdist.model.load import (
    add_lora,
    load_base_model,
    load_for_inference,
    load_tokenizer,
    quantization_config,
    resolve_attn_implementation,
    resolve_dtype,
)

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LORA = LoraSettings(r=4, alpha=8, dropout=0.05)


def _model_cfg(path: Path, **kw) -> ModelConfig:
    return ModelConfig(base_model=str(path), **kw)


def _lora_modules(model) -> dict[str, object]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    from slackdist.model.template import encode_chat

    ids, mask = encode_chat(
        tokenizer,
        [
            {"role": "system", "content": "You are on the team."},
            {"role": "user", "content": "Is the build green?"},
            {"role": "assistant", "content": "Yes, all tests pass."},
        ],
    )
    input_ids = torch.tensor([ids])
    labels = torch.where(torch.tensor([mask]) == 1, input_ids, -100)
    return {"input_ids": input_ids, "labels": labels}


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(SlackdistError, match="model.dtype"):
        resolve_dtype("int8", "cpu")


def test_attention_choice_on_cpu(caplog):
    assert resolve_attn_implementation("auto", "cpu", torch.float32) == "sdpa"
    assert resolve_attn_implementation("eager", "cpu", torch.float32) == "eager"
    with caplog.at_level(logging.WARNING):
        assert resolve_attn_implementation("varlen", "cpu", torch.bfloat16) == "sdpa"
    assert "varlen attention needs CUDA" in caplog.text


def test_4bit_load_on_cpu_keeps_the_tied_weight_unquantized(tiny_model_dir):
    bnb = pytest.importorskip("bitsandbytes")

    model = load_base_model(_model_cfg(tiny_model_dir), dtype=torch.bfloat16)
    layer = model.model.layers[0]
    for proj in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert isinstance(proj, bnb.nn.Linear4bit)
        assert proj.weight.quant_state.quant_type == "nf4" and proj.weight.quant_state.nested  # double quant
        assert proj.weight.dtype == torch.bfloat16  # quant storage = compute dtype (FSDP can shard it)
    # the tied embedding is one unquantized tensor shared by embed_tokens and lm_head
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.lm_head.weight) is torch.nn.Parameter and model.lm_head.weight.dtype == torch.bfloat16
    assert model.config.use_cache is False and model.config._attn_implementation == "sdpa"
    assert not any(p.requires_grad for p in model.parameters())


def test_add_lora_on_4bit_tied_model_trains_only_lora(tiny_model_dir):
    model = load_base_model(_model_cfg(tiny_model_dir), dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = add_lora(model, LORA, gradient_checkpointing=True)
    assert not [w for w in caught if "tie_word_embeddings" in str(w.message)]

    n_layers = model.config.num_hidden_layers
    targets = _lora_modules(peft_model)
    assert {name.rsplit(".", 1)[-1] for name in targets} == PROJECTIONS | {"lm_head"}
    assert len(targets) == 7 * n_layers + 1
    inner = peft_model.base_model.model
    assert inner.lm_head.base_layer.weight is inner.model.embed_tokens.weight  # still tied, stored once

    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(targets)
    assert all(p.dtype == torch.float32 for p in trainable.values())  # fp32 adapters on a bf16 base
    inner_model = peft_model.base_model.model
    assert getattr(inner_model, "is_activation_checkpointing", None) or inner_model.is_gradient_checkpointing

    peft_model.train()
    tok = load_tokenizer(str(tiny_model_dir))
    out = peft_model(**_batch(tok), use_cache=False)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # B starts at zero, so dL/dB is what flows first: non-zero on every adapter, lm_head included
    for name, p in trainable.items():
        if ".lora_B." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in peft_model.named_parameters() if not p.requires_grad)


def test_unquantized_lora_when_asked(tiny_model_dir):
    bnb = pytest.importorskip("bitsandbytes")

    model = load_base_model(_model_cfg(tiny_model_dir), dtype=torch.float32, quantize=False)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    peft_model = add_lora(model, LORA, gradient_checkpointing=False)
    peft_model.train()
    out = peft_model(**_batch(load_tokenizer(str(tiny_model_dir))), use_cache=False)
    out.loss.backward()
    assert len(_lora_modules(peft_model)) == 7 * model.config.num_hidden_layers + 1


def test_fallback_when_bitsandbytes_is_missing(tiny_model_dir, monkeypatch, caplog):
    bnb = pytest.importorskip("bitsandbytes")

    load_mod._bnb_4bit_problem.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # `import` now raises ImportError
    monkeypatch.setattr(load_mod, "_warned", set())
    try:
        with caplog.at_level(logging.WARNING):
            assert quantization_config(_model_cfg(tiny_model_dir), torch.float32, device="cpu") is None
            model = load_base_model(_model_cfg(tiny_model_dir), dtype=torch.float32)
    finally:
        load_mod._bnb_4bit_problem.cache_clear()
    assert caplog.text.count("4-bit quantization unavailable: bitsandbytes is not importable") == 1
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_quantization_config_fields(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    q = quantization_config(_model_cfg(tiny_model_dir), torch.bfloat16, device="cpu")
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and q.bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(_model_cfg(tiny_model_dir, load_in_4bit=False), torch.bfloat16) is None


def test_missing_base_model_is_a_clear_error(tmp_path):
    with pytest.raises(SlackdistError, match="no_such_model"):
        load_base_model(_model_cfg(tmp_path / "no_such_model"), dtype=torch.float32)
    with pytest.raises(SlackdistError, match="no_such_model"):
        load_tokenizer(str(tmp_path / "no_such_model"))


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tmp_path_factory):
    """A training-output-shaped folder: adapter with non-zero B, tokenizer, resolved config."""
    out = tmp_path_factory.mktemp("train_out")
    model = load_base_model(_model_cfg(tiny_model_dir), dtype=torch.float32, quantize=False)
    peft_model = add_lora(model, LORA, gradient_checkpointing=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.05)
    peft_model.eval()
    tok = load_tokenizer(str(tiny_model_dir))
    with torch.no_grad():
        expected = peft_model(input_ids=_batch(tok)["input_ids"]).logits
    checkpoint = out / "checkpoints" / "step-000100"
    cfg = Config()
    cfg.model.base_model = str(tiny_model_dir)
    for folder in (out, checkpoint):
        folder.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(folder, save_embedding_layers=False)
        tok.save_pretrained(folder)
        save_config(cfg, folder / "slackdist_config.yaml")
    return out, checkpoint, expected


def test_saved_adapter_holds_only_lora_tensors(trained_adapter, tiny_model_dir):
    from safetensors.torch import load_file

    out, _, _ = trained_adapter
    tensors = load_file(out / "adapter_model.safetensors")
    assert all("lora_A" in k or "lora_B" in k for k in tensors)
    assert len(tensors) == 2 * (7 * 2 + 1)  # tiny model: 2 layers


@pytest.mark.parametrize("which", ["output", "checkpoint"])
def test_load_for_inference_adapter(trained_adapter, tiny_model_dir, which):
    from peft import PeftModel

    out, checkpoint, expected = trained_adapter
    loaded = load_for_inference(str(out if which == "output" else checkpoint), device="cpu")
    assert loaded.kind == "adapter" and loaded.base == str(tiny_model_dir)
    assert isinstance(loaded.model, PeftModel) and not loaded.model.training
    assert loaded.config is not None and loaded.config.model.base_model == str(tiny_model_dir)
    assert loaded.model.dtype == torch.float32  # CPU: fp32, not 4-bit
    assert loaded.tokenizer.chat_template and loaded.tokenizer.pad_token == "<|finetune_right_pad_id|>"
    with torch.no_grad():
        logits = loaded.model(input_ids=_batch(loaded.tokenizer)["input_ids"]).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # the adapter changes the output: it was really loaded, not silently empty
    with torch.no_grad(), loaded.model.disable_adapter():
        base_logits = loaded.model(input_ids=_batch(loaded.tokenizer)["input_ids"]).logits
    assert (base_logits - expected).abs().max() > 1e-3


def test_load_for_inference_4bit_adapter_on_cpu(trained_adapter):
    bnb = pytest.importorskip("bitsandbytes")

    out, _, expected = trained_adapter
    loaded = load_for_inference(str(out), device="cpu", load_in_4bit=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    with torch.no_grad():
        logits = loaded.model(input_ids=_batch(loaded.tokenizer)["input_ids"]).logits
    assert torch.isfinite(logits).all() and logits.shape == expected.shape


def test_load_for_inference_merged(tiny_model_dir):
    loaded = load_for_inference(str(tiny_model_dir), device="cpu")
    assert loaded.kind == "merged" and loaded.base is None and loaded.config is None
    assert loaded.model.config.use_cache is True


def test_load_for_inference_bad_folders(tmp_path, trained_adapter):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(SlackdistError, match="empty_dir: not a model folder"):
        load_for_inference(str(empty), device="cpu")
    with pytest.raises(SlackdistError, match="missing_dir: no such model folder"):
        load_for_inference(str(tmp_path / "missing_dir"), device="cpu")
    half = tmp_path / "half_adapter"
    half.mkdir()
    (half / "adapter_config.json").write_text((trained_adapter[0] / "adapter_config.json").read_text())
    with pytest.raises(SlackdistError, match="half_adapter: has adapter_config.json but no adapter_model"):
        load_for_inference(str(half), device="cpu")
    with pytest.raises(SlackdistError, match="gone_base: no such model folder"):
        load_for_inference(str(trained_adapter[0]), base=str(tmp_path / "gone_base"), device="cpu")


def test_checkpoint_layers_recomputes_only_the_chosen_layers(tiny_model_dir):
    """Checkpointing k of L layers: same gradients, and fewer tensors kept for backward as k grows."""
    from slackdist.model.load import checkpoint_layers, checkpointable_layers

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_base_model(_model_cfg(tiny_model_dir), dtype=torch.float32, quantize=False)
    peft_model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
    peft_model.train()
    layers = len(checkpointable_layers(model))
    assert layers == model.config.num_hidden_layers >= 2
    batch = _batch(tokenizer)
    saved, grads = {}, {}
    for k in (0, 1, layers):
        checkpoint_layers(model, k)
        flags = [m.gradient_checkpointing for m in model.model.layers]
        assert flags == [i < k for i in range(layers)]
        count = [0]

        def pack(t, count=count):
            count[0] += 1
            return t

        peft_model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = peft_model(**batch, use_cache=False).loss
        loss.backward()
        saved[k] = count[0]
        grads[k] = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert saved[0] > saved[1] > saved[layers]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[layers][name], grad, rtol=1e-5, atol=1e-6)
