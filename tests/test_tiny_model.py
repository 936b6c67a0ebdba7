"""The tiny Llama 3 model used by tests and the demo (slackdist/model/tiny.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slackdist.cli import main as cli_main
from slackdist.errors import SlackdistError
from slackdist.model.families import has_generation_markers
from slackdist.model.tiny import build_tiny_tokenizer, write_tiny_model


def test_tiny_model_loads_with_from_pretrained(tiny_model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    # tied embeddings, GQA, Llama 3 rope
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["factor"] == 32.0
    assert cfg.rope_parameters["rope_theta"] == 500000.0
    assert cfg.max_position_embeddings >= 4096
    assert model.dtype == torch.float32
    # special tokens agree between tokenizer, config and generation config
    assert len(tok) <= cfg.vocab_size and cfg.vocab_size % 64 == 0
    assert 900 <= len(tok) <= 1010
    assert tok.bos_token == "<|begin_of_text|>" and cfg.bos_token_id == tok.bos_token_id
    assert tok.eos_token == "<|eot_id|>" and cfg.eos_token_id == tok.eos_token_id
    assert tok.pad_token == "<|finetune_right_pad_id|>" and cfg.pad_token_id == tok.pad_token_id
    assert tok.eos_token_id in model.generation_config.eos_token_id
    for special in ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert "{% generation %}" in tok.chat_template.replace("{%- generation -%}", "{% generation %}")
    # byte-level: any text round-trips
    text = "Zürich 東京 👍\n```py\nx = {'a': 1}\n```"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    out = model(torch.tensor([tok(text)["input_ids"]]))
    assert out.logits.shape[-1] == cfg.vocab_size and torch.isfinite(out.logits).all()


def test_tokenizer_is_deterministic():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_same_seed_same_weights_and_shape_options(tmp_path: Path):
    from safetensors.torch import load_file

    a = write_tiny_model(tmp_path / "a", seed=3)
    b = write_tiny_model(tmp_path / "b", seed=3)
    c = write_tiny_model(tmp_path / "c", seed=4, hidden_size=32, heads=4, kv_heads=1, layers=1)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert not (wa["model.embed_tokens.weight"][:, :32] == wc["model.embed_tokens.weight"]).all()
    cfg = json.loads((c / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]) == (32, 1, 1)
    assert "lm_head.weight" not in wa  # tied: saved once


def test_bad_shape_is_a_clear_error(tmp_path: Path):
    with pytest.raises(SlackdistError, match="not a multiple of kv heads"):
        write_tiny_model(tmp_path / "x", heads=4, kv_heads=3)
    assert not (tmp_path / "x").exists()


def test_cli_tiny_model(tmp_path: Path, capsys):
    out = tmp_path / "cli_model"
    code = cli_main(["tiny-model", str(out), "--hidden-size", "32", "--layers", "1", "--kv-heads", "1"])
    assert code == 0
    assert str(out) in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 32 and cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"]
    assert {"tokenizer.json", "model.safetensors", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    # writing again into the existing folder replaces it
    assert cli_main(["tiny-model", str(out), "--seed", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64


@pytest.mark.parametrize(
    ("family", "architecture", "tied", "end_of_turn"),
    [
        ("qwen2", "Qwen2ForCausalLM", True, "<|im_end|>"),
        ("mistral", "MistralForCausalLM", False, "</s>"),
        ("gemma2", "Gemma2ForCausalLM", True, "<end_of_turn>"),
        ("phi3", "Phi3ForCausalLM", False, "<|end|>"),
    ],
)
def test_every_family_loads_and_encodes_any_text(
    tmp_path: Path, family: str, architecture: str, tied: bool, end_of_turn: str
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = write_tiny_model(tmp_path / family, family=family, seed=1)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == architecture and model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight is model.get_input_embeddings().weight) is tied
    assert len(tok) <= model.config.vocab_size and model.config.model_type == family
    assert tok.convert_tokens_to_ids(end_of_turn) in model.generation_config.eos_token_id
    # the hub's template shape: no generation markers, so `model.chat_template=auto` goes by model_type
    assert not has_generation_markers(tok.chat_template)
    # byte fallback (SentencePiece-style families) or byte-level BPE: any text round-trips, nothing is <unk>
    text = "Zürich 東京 👍\n```py\nx = {'a': 1}\n```"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and tok.unk_token_id not in ids
    out_logits = model(torch.tensor([ids])).logits
    assert out_logits.shape[-1] == model.config.vocab_size and torch.isfinite(out_logits).all()


def test_cli_tiny_model_family(tmp_path: Path):
    assert cli_main(["tiny-model", str(tmp_path / "m"), "--family", "phi3", "--layers", "1"]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "phi3" and cfg["num_hidden_layers"] == 1
    with pytest.raises(SlackdistError, match="unknown family 'gpt2'"):
        write_tiny_model(tmp_path / "x", family="gpt2")
