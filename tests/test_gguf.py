"""`slackdist export --format gguf`: the file read back with gguf's reader, the rope and tokenizer pieces checked
against transformers, the Ollama Modelfile, bad input; llama.cpp itself in an opt-in test."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slackdist.cli import main
from slackdist.export_gguf import permute_rope_rows, tensor_qtype
from slackdist.gguf_vocab import bpe_pre_tokenizer, strip_generation_markers
from slackdist.model.tiny import LLAMA3_SPLIT_PATTERN

REPO = Path(__file__).resolve().parents[1]
T = gguf.GGMLQuantizationType
LLAMA_SPECIALS = {"<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"}
LLAMA_SPECIALS |= {"<|eot_id|>", "<|finetune_right_pad_id|>"}


sys.path.insert(0, str(REPO / "bench"))
import gguf_check as BENCH  # noqa: E402  (the tiny models the llama.cpp check uses too)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def models(workdir: Path) -> dict[str, Path]:
    """tied: the tiny Llama; merged: it + a random LoRA on every projection and lm_head; qwen2: a tiny Qwen2."""
    torch.set_num_threads(1)
    return BENCH.build_models(workdir / "models")


@pytest.fixture(scope="module")
def exported(models: dict[str, Path], workdir: Path):
    """`exported(label, quant)` → the .gguf written by the CLI (once per pair)."""
    cache: dict[tuple[str, str], Path] = {}

    def export(label: str, quant: str) -> Path:
        if (label, quant) not in cache:
            out = workdir / "out" / f"{label}-{quant}"
            args = ["export", "--model-dir", str(models[label]), "--out", str(out), "--quant", quant]
            assert main([*args, "--system", "You are on the team."]) == 0
            (path,) = out.glob("*.gguf")
            cache[label, quant] = path
        return cache[label, quant]

    return export


def fields(path: Path) -> dict[str, object]:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


def source_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    weights = {}
    for shard in folder.glob("*.safetensors"):
        weights.update({k: v.float().numpy() for k, v in load_file(shard).items()})
    return weights


def interleave_halves(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered (0, d/2, 1, d/2+1, ...): the layout llama.cpp's Llama rope reads."""
    d = w.shape[0] // heads
    order = [h * d + (i // 2 if i % 2 == 0 else d // 2 + i // 2) for h in range(heads) for i in range(d)]
    return w[order]


LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor names, written out here independently of gguf's TensorNameMap."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf_name in fixed or hf_name == "lm_head.weight":
        return fixed.get(hf_name, "output.weight")
    _, _, block, rest = hf_name.split(".", 3)
    module, _, kind = rest.rpartition(".")
    return f"blk.{block}.{LAYER_NAMES[module]}.{kind}"


# ---------------------------------------------------------------- the file read back


@pytest.mark.parametrize("label", ["tied", "merged", "qwen2"])
def test_metadata_and_tokenizer_read_back(models: dict[str, Path], exported, label: str) -> None:
    from slackdist.model.load import load_tokenizer

    meta = fields(exported(label, "f16"))
    config = json.loads((models[label] / "config.json").read_text())
    arch = "qwen2" if label == "qwen2" else "llama"
    assert meta["general.architecture"] == arch
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    expected = {
        "block_count": config["num_hidden_layers"],
        "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"],
        "attention.head_count": config["num_attention_heads"],
        "attention.head_count_kv": config["num_key_value_heads"],
        "context_length": config["max_position_embeddings"],
        "rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
        "vocab_size": config["vocab_size"],
    }
    assert {k: meta[f"{arch}.{k}"] for k in expected} == expected
    assert meta[f"{arch}.rope.freq_base"] == config["rope_parameters"]["rope_theta"]
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])

    tokenizer = load_tokenizer(str(models[label]))
    assert meta["tokenizer.ggml.model"] == "gpt2"
    # transformers gives a Qwen2 folder Qwen2's digit-by-digit split whatever tokenizer.json says
    assert meta["tokenizer.ggml.pre"] == ("qwen2" if label == "qwen2" else "llama-bpe")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == config["vocab_size"] > len(tokenizer)
    assert all(tokens[i] == token for token, i in tokenizer.get_vocab().items())
    specials = {i for i, added in tokenizer.added_tokens_decoder.items() if added.special}
    assert {tokens[i] for i in specials} >= LLAMA_SPECIALS
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if i >= len(tokenizer):
            assert (token, kind) == (f"[PAD{i}]", gguf.TokenType.UNUSED)
        else:
            assert kind == (gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL), token
    merges = json.loads((models[label] / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    vocab = tokenizer.get_vocab()
    assert meta["tokenizer.ggml.bos_token_id"] == vocab["<|begin_of_text|>"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == vocab["<|eot_id|>"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.eot_token_id"] == vocab["<|eot_id|>"]
    assert meta["tokenizer.ggml.padding_token_id"] == vocab["<|finetune_right_pad_id|>"]
    assert meta["tokenizer.ggml.add_bos_token"] is True  # Llama 3 tokenizers prepend <|begin_of_text|>
    assert meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == strip_generation_markers(tokenizer.chat_template)
    assert (
        "generation -%}" in tokenizer.chat_template
        and "generation -%}" not in meta["tokenizer.chat_template"]
    )


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("label", ["tied", "merged", "qwen2"])
def test_tensors_read_back_equal_the_source_weights(
    models: dict[str, Path], exported, label: str, quant: str
) -> None:
    config = json.loads((models[label] / "config.json").read_text())
    tensors = {t.name: t for t in gguf.GGUFReader(exported(label, quant)).tensors}
    source = source_weights(models[label])
    is_llama = label != "qwen2"
    # the tied models store no lm_head; the merge untied it (LoRA on lm_head) and stores it
    assert ("lm_head.weight" in source) is (label == "merged")
    assert ("output.weight" in tensors) is (label == "merged")
    assert ("rope_freqs.weight" in tensors) is is_llama  # llama3 rope scaling; Qwen2 has plain rope
    assert set(tensors) - {"rope_freqs.weight"} == {gguf_name(n) for n in source}
    if label == "qwen2":
        assert {f"blk.0.attn_{p}.bias" for p in "qkv"} <= set(tensors)

    wanted = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[quant]
    for hf_name, weight in source.items():
        t = tensors[gguf_name(hf_name)]
        if is_llama and ".q_proj." in hf_name:
            weight = interleave_halves(weight, config["num_attention_heads"])
        elif is_llama and ".k_proj." in hf_name:
            weight = interleave_halves(weight, config["num_key_value_heads"])
        assert list(t.shape) == list(reversed(weight.shape)), hf_name  # ggml lists dimensions innermost first
        assert t.tensor_type == (wanted if weight.ndim == 2 else T.F32), hf_name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(weight.shape)
        if t.tensor_type == T.F32:
            np.testing.assert_array_equal(got, weight)
        elif t.tensor_type == T.F16:
            np.testing.assert_array_equal(got, weight.astype(np.float16).astype(np.float32))
        elif t.tensor_type == T.BF16:
            np.testing.assert_array_equal(got, torch.from_numpy(weight).bfloat16().float().numpy())
        else:  # Q8_0: 32-value blocks, scale d = max|x| / 127 stored in fp16, values rounded to d's multiples
            blocks = weight.reshape(-1, 32)
            bound = np.abs(blocks).max(axis=1, keepdims=True) / 127 * (0.5 + 127 * 2**-11)
            assert (np.abs(got.reshape(-1, 32) - blocks) <= bound + 1e-12).all(), hf_name
            assert not np.array_equal(got, weight)  # it really is quantized
    if label == "merged":
        embedding = gguf.quants.dequantize(
            tensors["token_embd.weight"].data, tensors["token_embd.weight"].tensor_type
        )
        output = gguf.quants.dequantize(tensors["output.weight"].data, tensors["output.weight"].tensor_type)
        assert not np.array_equal(embedding, output)


def test_llama3_rope_factors_equal_transformers_scaling(models: dict[str, Path], exported) -> None:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(models["tied"])
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    theta, dim = config.rope_parameters["rope_theta"], config.head_dim
    plain = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    (freqs,) = [t for t in gguf.GGUFReader(exported("tied", "f16")).tensors if t.name == "rope_freqs.weight"]
    assert freqs.tensor_type == T.F32
    np.testing.assert_allclose(freqs.data, (plain / scaled.double()).numpy(), rtol=1e-5)
    assert freqs.data.min() == 1.0 and freqs.data.max() == config.rope_parameters["factor"]


@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 4),
    half=st.integers(1, 8),
    position=st.integers(0, 5000),
    seed=st.integers(0, 2**16),
)
def test_permuted_rows_turn_rotate_half_rope_into_interleaved_rope(
    heads: int, half: int, position: int, seed: int
) -> None:
    """HF's rope rotates (x[i], x[i + d/2]); ggml's Llama rope rotates (x[2i], x[2i+1]). With the rows permuted,
    ggml's rope gives the same rotated vector as HF's, in the permuted order, so attention scores agree."""
    from transformers.models.llama.modeling_llama import rotate_half

    d = 2 * half
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(heads * d, 6, generator=gen, dtype=torch.float64)
    x = torch.randn(6, generator=gen, dtype=torch.float64)
    angles = position / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([angles.cos()] * 2), torch.cat([angles.sin()] * 2)

    q = (weight @ x).view(heads, d)
    hf = q * cos + rotate_half(q) * sin

    p = torch.from_numpy(permute_rope_rows(weight.numpy(), heads)) @ x
    pairs = p.view(heads, half, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    ggml = torch.stack(
        [even * angles.cos() - odd * angles.sin(), even * angles.sin() + odd * angles.cos()], -1
    )

    expected = interleave_halves(hf.reshape(-1, 1).numpy(), heads).reshape(-1)
    np.testing.assert_allclose(ggml.reshape(-1).numpy(), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- pieces


def test_chat_template_without_generation_markers_renders_the_same(models: dict[str, Path]) -> None:
    import jinja2

    from slackdist.model.load import load_tokenizer
    from slackdist.ollama import PROBES

    tokenizer = load_tokenizer(str(models["tied"]))
    stripped = strip_generation_markers(tokenizer.chat_template)
    # what llama-cpp-python's plain Jinja2 says to the original
    with pytest.raises(jinja2.TemplateSyntaxError):
        jinja2.Environment().from_string(tokenizer.chat_template)
    jinja2.Environment().from_string(stripped)
    conversations = [*PROBES, [*PROBES[0], {"role": "assistant", "content": "  Nothing so far.  "}]]
    for messages in conversations:
        for prompt in (True, False):
            kwargs = dict(tokenize=False, add_generation_prompt=prompt)
            assert tokenizer.apply_chat_template(messages, chat_template=stripped, **kwargs) == (
                tokenizer.apply_chat_template(messages, **kwargs)
            )


def _pre(*parts: dict, model: str = "BPE") -> dict:
    return {"model": {"type": model}, "pre_tokenizer": {"type": "Sequence", "pretokenizers": list(parts)}}


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}


def test_pre_tokenizer_names_follow_the_split(tmp_path: Path) -> None:
    from slackdist.errors import SlackdistError
    from slackdist.gguf_vocab import QWEN2_SPLIT_PATTERN

    src = tmp_path / "tokenizer.json"
    assert bpe_pre_tokenizer(_pre(_split(LLAMA3_SPLIT_PATTERN), BYTE_LEVEL), src) == "llama-bpe"
    assert bpe_pre_tokenizer(_pre(_split(QWEN2_SPLIT_PATTERN), BYTE_LEVEL), src) == "qwen2"
    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert bpe_pre_tokenizer({"model": {"type": "BPE"}, "pre_tokenizer": gpt2}, src) == "gpt-2"
    assert bpe_pre_tokenizer(_pre({"type": "Digits", "individual_digits": True}, gpt2), src) == "smollm"
    with pytest.raises(SlackdistError, match="not one llama.cpp implements"):
        bpe_pre_tokenizer(_pre(_split(r"\w+|\s+"), BYTE_LEVEL), src)
    metaspace = {"type": "Metaspace", "replacement": "▁"}
    with pytest.raises(SlackdistError, match="only byte-level BPE"):
        bpe_pre_tokenizer(_pre(metaspace, model="Unigram"), src)


def test_q8_0_keeps_norms_in_f32_and_falls_back_to_f16_for_odd_rows() -> None:
    assert tensor_qtype("blk.0.attn_q.weight", (64, 64), "q8_0") == T.Q8_0
    assert tensor_qtype("blk.0.attn_q.weight", (64, 48), "q8_0") == T.F16  # 48 is not a whole 32-value block
    assert tensor_qtype("blk.0.attn_norm.weight", (64,), "q8_0") == T.F32
    assert tensor_qtype("blk.0.attn_q.bias", (64,), "f16") == T.F32
    assert tensor_qtype("token_embd.weight", (1024, 64), "bf16") == T.BF16


# ---------------------------------------------------------------- Modelfile


def test_modelfile_has_template_stops_system_and_sampling(exported) -> None:
    from slackdist.ollama import LLAMA3_GO_TEMPLATE

    path = exported("tied", "q8_0")
    text = (path.parent / "Modelfile").read_text()
    assert f"FROM ./{path.name}\n" in text
    assert f'TEMPLATE """{LLAMA3_GO_TEMPLATE}"""\n' in text
    assert 'SYSTEM """You are on the team."""\n' in text
    for line in ('PARAMETER stop "<|eot_id|>"', "PARAMETER temperature 0.7", "PARAMETER repeat_penalty 1.1"):
        assert line + "\n" in text


def test_training_output_is_merged_for_export_with_its_system_prompt(
    models: dict[str, Path], exported, tmp_path: Path, capsys
) -> None:
    from slackdist.config import load_config
    from slackdist.model.info import write_model_info
    from slackdist.model.load import load_tokenizer
    from slackdist.train.checkpoint import model_info

    adapter = shutil.copytree(models["tied"].parent / "adapter", tmp_path / "run")
    cfg = load_config(overrides={"data.workspace": "acme-eng"})
    write_model_info(model_info(cfg, load_tokenizer(str(adapter))), adapter)  # as training writes it
    out = tmp_path / "out"
    assert main(["export", "--model-dir", str(adapter), "--out", str(out), "--quant", "f32"]) == 0
    assert "merging the adapter" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "run-f32.gguf"]  # no temp merge left behind
    ours = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out / "run-f32.gguf").tensors}
    merged = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(exported("merged", "f32")).tensors}
    assert ours.keys() == merged.keys()
    assert all(np.array_equal(ours[n], merged[n]) for n in ours)  # the same fp32 merge as `slackdist merge`
    modelfile = (out / "Modelfile").read_text()
    assert 'SYSTEM """You are a member of the acme-eng Slack workspace.' in modelfile
    assert "This conversation is from #general." in modelfile


def test_no_system_prompt_found_leaves_system_out_and_says_so(
    models: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "x.gguf"
    assert main(["export", "--model-dir", str(models["tied"]), "--out", str(out), "--quant", "f16"]) == 0
    assert "no SYSTEM line (pass --system TEXT)" in capsys.readouterr().out
    text = (tmp_path / "Modelfile").read_text()
    assert "FROM ./x.gguf" in text and "SYSTEM" not in text and "TEMPLATE" in text


def test_chat_format_is_detected_by_rendering(models: dict[str, Path]) -> None:
    from slackdist.model.load import load_tokenizer
    from slackdist.model.template import GENERIC_CHAT_TEMPLATE
    from slackdist.ollama import detect_format

    tokenizer = load_tokenizer(str(models["tied"]))
    assert detect_format(tokenizer).name == "llama3"
    tokenizer.chat_template = CHATML_JINJA
    assert detect_format(tokenizer).name == "chatml"
    tokenizer.chat_template = GENERIC_CHAT_TEMPLATE
    assert detect_format(tokenizer) is None
    tokenizer.chat_template = LLAMA3_WITH_DATE  # Llama 3 markers but a different system block: not equivalent
    assert detect_format(tokenizer) is None
    assert detect_format(tokenizer, with_system=True) is None
    # SmolLM2's template adds its own system prompt when there is none: equivalent once SYSTEM is always sent
    tokenizer.chat_template = CHATML_DEFAULT_SYSTEM
    assert detect_format(tokenizer) is None
    assert detect_format(tokenizer, with_system=True).name == "chatml"


CHATML_JINJA = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{%- endif %}"
    + CHATML_JINJA
)
LLAMA3_WITH_DATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'system' %}Cutting Knowledge Date: December 2023\n\n{% endif %}{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain (Ollama's template engine)")
def test_ollama_templates_render_like_the_jinja_templates_in_go(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Each Go template, run by Go's text/template the way Ollama runs it, renders what the model's Jinja
    template renders (minus the begin-of-text token llama.cpp adds), and what its Python layout says."""
    from slackdist.model.load import load_tokenizer
    from slackdist.ollama import FORMATS, PROBES, jinja_prompt

    tokenizer = load_tokenizer(str(models["tied"]))
    jinja = {"llama3": tokenizer.chat_template, "chatml": CHATML_JINJA}
    renderer = REPO / "tests" / "fixtures" / "ollama_render" / "main.go"
    conversations = [
        *PROBES,
        [*PROBES[0], {"role": "assistant", "content": "Two."}, {"role": "user", "content": "ok"}],
    ]
    for fmt in FORMATS:
        template = tmp_path / f"{fmt.name}.gotmpl"
        template.write_text(fmt.template, encoding="utf-8")
        tokenizer.chat_template = jinja[fmt.name]
        for messages in conversations:
            done = subprocess.run(
                ["go", "run", str(renderer), str(template)],
                input=json.dumps(messages),
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout == fmt.layout(messages) == jinja_prompt(tokenizer, messages), fmt.name


# ---------------------------------------------------------------- bad input


def _export_error(args: list[str], capsys) -> str:
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("slackdist export: error: ")
    return err


def test_bad_input_is_a_one_line_error_and_writes_nothing(
    models: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert "no such model folder" in _export_error(
        ["--model-dir", str(tmp_path / "nope"), "--out", str(out)], capsys
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a model folder" in _export_error(["--model-dir", str(empty), "--out", str(out)], capsys)

    gemma = shutil.copytree(models["tied"], tmp_path / "gemma")
    config = json.loads((gemma / "config.json").read_text())
    (gemma / "config.json").write_text(json.dumps({**config, "architectures": ["Gemma2ForCausalLM"]}))
    err = _export_error(["--model-dir", str(gemma), "--out", str(out)], capsys)
    assert "Gemma2ForCausalLM cannot be exported to GGUF yet" in err

    spm = shutil.copytree(models["tied"], tmp_path / "spm")
    tok = json.loads((spm / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "▁",
        "prepend_scheme": "first",
        "split": False,
    }
    (spm / "tokenizer.json").write_text(json.dumps(tok))
    assert "only byte-level BPE" in _export_error(["--model-dir", str(spm), "--out", str(out)], capsys)

    broken = shutil.copytree(models["tied"], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    assert "unreadable safetensors" in _export_error(["--model-dir", str(broken), "--out", str(out)], capsys)
    quote = ["--model-dir", str(models["tied"]), "--out", str(out), "--system", 'say """hi"""']
    assert 'contains """' in _export_error(quote, capsys)
    assert not out.exists()  # no half-written file, no Modelfile, no empty output folder


# ---------------------------------------------------------------- llama.cpp (opt-in)


@pytest.mark.llama_cpp
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
def test_llama_cpp_reads_the_files_like_transformers(tmp_path: Path) -> None:
    """bench/gguf_check.py: llama.cpp tokenizes, scores and continues like transformers (see its docstring)."""
    out = tmp_path / "check.json"
    cmd = [sys.executable, "bench/gguf_check.py", "--workdir", str(tmp_path / "work"), "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert all(result["plain_text_tokens_equal"].values())
    assert all(result["q8_0_same_as_llama_quantize"].values())
    for row in result["rows"]:
        assert row["tokens_equal"], row
        limit = {"f32": 1e-4, "f16": 1e-2, "q8_0": 0.2}[row["quant"]]
        assert row["rel_logit_diff"] < limit, row
        if row["quant"] != "q8_0":  # quantization noise may flip a near-tie of a random model
            assert row["greedy_equal"] and row["argmax_agreement"] == 1.0, row
