"""A model folder carries what inference needs (slackdist/model/info.py, written by slackdist/train/checkpoint.py).

Chat, eval and serve prompt a trained model as training did from its own folder: the system prompt
(workspace, persona), the chat template name and the config travel with every model folder training
writes, and `merge` copies them, so nothing reads the training data folder at inference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train_helpers import tiny_config, write_dataset

from slackdist.config import DEFAULT_SYSTEM_PROMPT, Config, DataConfig
from slackdist.data.records import RecordBuilder, format_system_prompt
from slackdist.errors import SlackdistError
from slackdist.model.info import CONFIG_FILE, INFO_FILE, ModelInfo, read_model_info, write_model_info
from slackdist.model.load import load_for_inference, load_tokenizer
from slackdist.train.checkpoint import model_info

pytestmark = pytest.mark.usefixtures("one_thread")
WORKSPACE = "acme"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(str(tiny_model_dir))


def _training_prompt(data: DataConfig, workspace: str) -> str:
    """The system prompt `prepare` writes into #general's records."""
    return RecordBuilder(data, workspace=workspace).system("general")[0]


def test_model_info_prompts_as_training_did(tokenizer) -> None:
    cfg = Config(data=DataConfig(workspace=WORKSPACE))
    info = model_info(cfg, tokenizer)
    assert info.system_prompt_for() == _training_prompt(cfg.data, WORKSPACE)
    assert info.workspace == WORKSPACE and info.chat_template == "llama3"
    persona = Config(data=DataConfig(workspace=WORKSPACE, persona="Ada", roles="persona"))
    persona_info = model_info(persona, tokenizer)
    assert persona_info.system_prompt_for() == _training_prompt(persona.data, WORKSPACE)
    assert "Ada" in persona_info.system_prompt_for()
    # `chat --as Grace` on a model trained without a persona: the prompt a Grace-persona run would train on
    grace = DataConfig(workspace=WORKSPACE, persona="Grace", roles="persona")
    assert info.system_prompt_for("Grace") == _training_prompt(grace, WORKSPACE)


def test_workspace_comes_from_the_prepared_data_when_the_config_has_none(tmp_path: Path, tokenizer) -> None:
    cfg = Config()
    cfg.train.data_dir = str(tmp_path)
    assert "the Slack Slack workspace" in model_info(cfg, tokenizer).system_prompt  # nothing known yet
    (tmp_path / "report.json").write_text('{"workspace": "acme-data"}', encoding="utf-8")
    info = model_info(cfg, tokenizer)
    assert info.workspace == "acme-data"
    assert info.system_prompt_for() == _training_prompt(cfg.data, "acme-data")


def test_info_file_round_trip_and_errors(tmp_path: Path, tokenizer) -> None:
    info = model_info(Config(data=DataConfig(workspace=WORKSPACE, persona="Ada")), tokenizer)
    write_model_info(info, tmp_path)
    assert read_model_info(tmp_path) == info
    assert read_model_info(tmp_path / "elsewhere") is None
    (tmp_path / INFO_FILE).write_text('{"workspace": "acme"}', encoding="utf-8")  # fields missing
    with pytest.raises(SlackdistError, match=INFO_FILE):
        read_model_info(tmp_path)
    (tmp_path / INFO_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(SlackdistError, match=INFO_FILE):
        read_model_info(tmp_path)


def test_untrained_folder_gets_the_stock_prompt() -> None:
    stock = ModelInfo.untrained()
    assert stock.system_prompt_for() == format_system_prompt(
        DEFAULT_SYSTEM_PROMPT, workspace="Slack", channel="general"
    )
    assert stock.system_prompt_for("Ada") == format_system_prompt(
        DEFAULT_SYSTEM_PROMPT, workspace="Slack", channel="general", persona="Ada"
    )


@pytest.mark.slow
def test_every_model_folder_of_a_run_loads_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    """OUT, OUT/best, a checkpoint and a merge of OUT elsewhere: each has its config and model info, and
    loads with training's system prompt after the training data folder is gone."""
    from slackdist.train.merge import merge_adapter
    from slackdist.train.recipe import train

    data = write_dataset(tmp_path / "data", n_train=12, n_val=4)
    (data / "report.json").write_text(json.dumps({"workspace": "acme-data"}), encoding="utf-8")
    out = tmp_path / "out"
    cfg = tiny_config(
        tiny_model_dir,
        data,
        out,
        **{"train.max_steps": 2, "train.eval_every_n_steps": 1, "train.save_every_n_steps": 1},
    )
    train(cfg)
    merged = merge_adapter(out, tmp_path / "elsewhere" / "merged", dtype="fp32")
    shutil.rmtree(data)  # inference must not need it

    expected = _training_prompt(cfg.data, "acme-data")
    folders = [out, out / "best", out / "checkpoints" / "step-000002", merged]
    for folder in folders:
        assert (folder / CONFIG_FILE).is_file() and (folder / INFO_FILE).is_file(), folder
        im = load_for_inference(str(folder), device="cpu")
        assert im.config is not None and im.config.train.max_seq_len == cfg.train.max_seq_len, folder
        assert im.info.system_prompt_for() == expected, folder
        assert im.info.chat_template == "llama3"
