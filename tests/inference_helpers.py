"""A tiny adapter folder laid out like a training output, for the chat / serve / eval / generate tests.

The adapter is built through the real code path (`slackdist.model.load.add_lora`, PEFT
`save_pretrained`) with its LoRA B matrices set to random non-zero values, so the tuned model
answers differently from its base without running the trainer.
"""

from __future__ import annotations

from pathlib import Path

from slackdist.config import Config, LoraSettings, save_config
from slackdist.model.info import write_model_info
from slackdist.train.checkpoint import model_info

WORKSPACE = "acme"


def write_tiny_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, scale: float = 0.3) -> Path:
    """Write OUT/adapter_config.json + adapter_model.safetensors + tokenizer + slackdist_config.yaml +
    slackdist_inference.json.

    Args:
        base_dir: a tiny model from `write_tiny_model`.
        out_dir: the folder to write (created).
        seed: seed of the random LoRA weights.
        scale: standard deviation of the LoRA B entries (0 would make tuned == base).

    Returns:
        out_dir.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from slackdist.model.load import add_lora, load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir, save_embedding_layers=False)
    tokenizer = load_tokenizer(str(base_dir))
    tokenizer.save_pretrained(out_dir)
    cfg = Config()
    cfg.data.workspace = WORKSPACE
    cfg.model.base_model = str(base_dir)
    cfg.model.load_in_4bit = False
    cfg.train.output_dir = str(out_dir)
    save_config(cfg, out_dir / "slackdist_config.yaml")
    write_model_info(model_info(cfg, tokenizer), out_dir)
    return out_dir
