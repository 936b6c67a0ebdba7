"""`slackdist merge`: the merged 16-bit model equals base + adapter, unties a tied lm_head, shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slackdist.model.tiny import random_lora_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits computed in float64: the merged fp32 weights differ from base + adapter only by one fp32
    rounding of W + s·BA, while an fp32 forward reorders sums differently on each CPU's kernels (AVX2 vs
    AVX-512 missed 1e-5 by one value in 49,152), so float64 keeps the comparison about the merge alone."""
    with torch.no_grad():
        return model.double()(input_ids=ids).logits


def reference_logits(model_dir: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slackdist.model.load import quiet_tied_lora_warning

    with quiet_tied_lora_warning():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    return logits_of(model.eval(), ids)


ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


@pytest.mark.parametrize("ensure_weight_tying", [False, True], ids=["tying-off", "tying-on"])
def test_merge_equals_base_plus_adapter_on_tied_model_with_lm_head(
    tiny_model_dir: Path, tmp_path: Path, ensure_weight_tying: bool
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slackdist.cli import main
    from slackdist.model.template import LLAMA3_CHAT_TEMPLATE

    adapter = random_lora_adapter(
        tiny_model_dir, tmp_path / "adapter", targets=ALL_TARGETS, ensure_weight_tying=ensure_weight_tying
    )
    merged_dir = tmp_path / "merged"
    code = main(
        [
            "merge",
            "--adapter",
            str(adapter),
            "--output",
            str(merged_dir),
            "--dtype",
            "fp32",
            "--max-shard-size",
            "100KB",
        ]
    )
    assert code == 0

    ids = torch.randint(0, 900, (2, 24), generator=torch.Generator().manual_seed(1))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers, no PEFT
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.testing.assert_close(
        logits_of(merged, ids), reference_logits(tiny_model_dir, adapter, ids), atol=1e-5, rtol=1e-4
    )
    assert not torch.allclose(
        logits_of(merged, ids), logits_of(base, ids), atol=1e-3
    )  # the adapter did something

    # A LoRA on the tied lm_head only: untied, own lm_head saved, the input embedding stays the base one.
    # With PEFT's ensure_weight_tying the embedding carries the same (transposed) LoRA: both weights get
    # the same delta and stay tied.
    lm_head, embed = merged.lm_head.weight, merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings is ensure_weight_tying
    assert (lm_head.data_ptr() == embed.data_ptr()) is ensure_weight_tying
    assert torch.equal(embed, base.model.embed_tokens.weight) is (not ensure_weight_tying)
    assert not torch.equal(lm_head, base.lm_head.weight)
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert "model.embed_tokens.weight" in index["weight_map"]
    assert ("lm_head.weight" in index["weight_map"]) is (not ensure_weight_tying)

    # sharded, safetensors only, tokenizer and chat template alongside
    shards = sorted(merged_dir.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert not list(merged_dir.glob("*.bin"))
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template == LLAMA3_CHAT_TEMPLATE
    assert not list(tmp_path.glob(".merged.tmp-*"))


def test_merge_without_lm_head_keeps_the_tie(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from slackdist.train.merge import merge_adapter

    adapter = random_lora_adapter(tiny_model_dir, tmp_path / "adapter", targets=["q_proj", "v_proj"])
    merged_dir = merge_adapter(adapter, tmp_path / "merged", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.config.tie_word_embeddings is True
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 900, (1, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        logits_of(merged, ids), reference_logits(tiny_model_dir, adapter, ids), atol=1e-5, rtol=1e-4
    )
    assert len(list(merged_dir.glob("*.safetensors"))) == 1  # 2GB default shard: one file for a tiny model


def test_merge_bf16_halves_the_size_and_stays_close(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from slackdist.train.merge import merge_adapter

    adapter = random_lora_adapter(tiny_model_dir, tmp_path / "adapter", targets=ALL_TARGETS)
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(adapter, tmp_path / "merged", dtype="bf16"))
    assert merged.dtype == torch.bfloat16
    ids = torch.randint(0, 900, (1, 16), generator=torch.Generator().manual_seed(3))
    reference = reference_logits(tiny_model_dir, adapter, ids)
    assert (logits_of(merged.float(), ids) - reference).abs().max() < 0.05 * reference.abs().max()


def test_merge_rejects_a_folder_without_adapter(tmp_path: Path) -> None:
    from slackdist.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["merge", "--adapter", str(tmp_path / "empty"), "--output", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()
