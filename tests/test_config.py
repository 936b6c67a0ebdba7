"""The typed config: defaults from the recipe, YAML + CLI filling, validation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from slackdist.cli import build_parser
from slackdist.config import Config, ConfigError, config_from_args, load_config, save_config, split_fractions


def test_recipe_defaults():
    cfg = Config()
    assert cfg.model.base_model == "meta-llama/Llama-3.2-3B-Instruct"
    assert (
        cfg.model.load_in_4bit
        and cfg.model.bnb_4bit_quant_type == "nf4"
        and cfg.model.bnb_4bit_use_double_quant
    )
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.init) == (64, 128, 0.05, "gaussian")
    assert set(cfg.lora.target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"
    }  # fmt: skip
    t = cfg.train
    assert (t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.max_grad_norm) == (2e-4, "cosine", 0.1, 0.3)
    assert t.optimizer == "paged_adamw_32bit" and t.packing and t.gradient_checkpointing and t.num_epochs == 3
    assert t.output_dir == "llama3_slack_finetuned"
    assert cfg.data.gap_hours == 2.0 and cfg.data.min_turns == 2 and cfg.data.max_turns == 40
    assert split_fractions(cfg.data.split) == (0.9, 0.05, 0.05)
    cfg.validate()


def test_yaml_then_cli_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1.0e-4\n  num_epochs: 5\ndata:\n  gap_hours: 1\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--lr", "3e-4", "--set", "lora.r=8"])
    cfg = config_from_args(args)
    assert cfg.train.learning_rate == 3e-4  # CLI wins over YAML
    assert cfg.train.num_epochs == 5 and cfg.data.gap_hours == 1.0 and cfg.lora.r == 8


def test_round_trip(tmp_path):
    cfg = Config()
    cfg.train.max_steps = 7
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  nope: 1\n", "unknown key 'train.nope'"),
        ("bogus:\n  x: 1\n", "unknown section 'bogus'"),
        ("train:\n  num_epochs: many\n", "train.num_epochs='many': expected int"),
        ("data:\n  roles: both\n", "expected one of alternate, persona"),
        ("[1, 2", "not valid YAML"),
    ],
)
def test_bad_yaml_names_the_problem(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="c.yaml|train|data|roles"):
        load_config(path)
    try:
        load_config(path)
    except ConfigError as e:
        assert message in str(e)


def test_validate_reports_every_problem_at_once():
    cfg = Config()
    cfg.data.split = "90,5"
    cfg.train.micro_batch_size = 0
    cfg.lora.dropout = 1.5
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    text = str(e.value)
    assert "data.split" in text and "train.micro_batch_size" in text and "lora.dropout" in text


def test_help_lists_every_option_with_default():
    out = subprocess.run(
        [sys.executable, "-m", "slackdist", "prepare", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ["--include-dms", "--channels", "--exclude-channels", "--as", "--roles", "--gap-hours",
                 "--min-turns", "--max-turns", "--max-tokens", "--tokenizer", "--split", "--split-by",
                 "--no-speaker-names", "--keep-emails", "--dry-run", "--seed", "--strict", "--config"]:  # fmt: skip
        assert flag in out, flag
    assert "(default: 2.0)" in out and "(default: '90,5,5')" in out


def test_bad_config_file_is_one_line_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  nope: 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "slackdist", "train", "--config", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown key 'train.nope'" in proc.stderr


def test_data_max_tokens_follows_train_max_seq_len_unless_set(tmp_path):
    """One length: the longest conversation `prepare` writes is the longest training keeps."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_seq_len: 4096\n")

    def max_tokens(*argv: str) -> int:
        return config_from_args(build_parser().parse_args(["prepare", "export", *argv])).data.max_tokens

    assert max_tokens() == Config().train.max_seq_len
    assert max_tokens("--config", str(path)) == 4096
    assert max_tokens("--set", "train.max_seq_len=1024") == 1024
    assert max_tokens("--config", str(path), "--max-tokens", "512") == 512  # set on its own, it stays
