"""Every launch config loads through accelerate's own config and launch code, and says how to use it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "launch_configs").glob("*.yaml"))
EXPECTED = {"cpu", "single_gpu", "ddp", "fsdp", "fsdp_offload", "deepspeed_zero3"}


def test_all_expected_configs_exist() -> None:
    assert {p.stem for p in CONFIGS} == EXPECTED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_headed_by_its_command_and_every_key_is_commented(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# accelerate launch --config_file launch_configs/" + path.name), lines[0]
    assert "-m slackdist train" in lines[0]
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.search(r"\s#\s\S", line), f"{path.name}: key without a comment: {line!r}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_as_accelerate_cluster_config(path: Path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown keys
    assert config.distributed_type.value == raw["distributed_type"]
    assert config.mixed_precision == raw["mixed_precision"]


def _launch_args(path: Path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "slackdist", "train"])
    args, _, _ = _validate_launch_command(args)
    return args


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_nested_key_is_a_launch_option(path: Path) -> None:
    """accelerate copies fsdp_config / deepspeed_config keys onto launch options: a typo would be ignored."""
    from accelerate.commands.launch import launch_command_parser

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    options = {a.dest for a in launch_command_parser()._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        for key in raw.get(section, {}) or {}:
            assert key in options, f"{path.name}: {section}.{key} is not an accelerate launch option"


@pytest.mark.parametrize("name", ["fsdp", "fsdp_offload"])
def test_fsdp_configs_reach_the_training_process_as_intended(name: str) -> None:
    """The environment `accelerate launch` hands the training process (what FullyShardedDataParallelPlugin reads)."""
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = _launch_args(REPO / "launch_configs" / f"{name}.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["FSDP_VERSION"] == "1"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"
    assert env["FSDP_USE_ORIG_PARAMS"] == "false"
    assert env["FSDP_OFFLOAD_PARAMS"] == ("true" if name == "fsdp_offload" else "false")


def test_ddp_and_single_gpu_configs() -> None:
    from accelerate.utils.launch import prepare_multi_gpu_env

    ddp = _launch_args(REPO / "launch_configs" / "ddp.yaml")
    assert ddp.multi_gpu and not ddp.use_fsdp and not ddp.use_deepspeed
    assert prepare_multi_gpu_env(ddp)["ACCELERATE_MIXED_PRECISION"] == "bf16"
    single = _launch_args(REPO / "launch_configs" / "single_gpu.yaml")
    assert not (single.multi_gpu or single.use_fsdp or single.use_deepspeed) and single.num_processes == 1
    cpu = _launch_args(REPO / "launch_configs" / "cpu.yaml")
    assert cpu.use_cpu and cpu.num_processes == 1 and cpu.mixed_precision == "no"


def test_deepspeed_config() -> None:
    args = _launch_args(REPO / "launch_configs" / "deepspeed_zero3.yaml")
    assert args.use_deepspeed
    assert args.zero_stage == 3 and args.zero3_init_flag and args.zero3_save_16bit_model
    assert args.offload_param_device == "none" and args.offload_optimizer_device == "none"
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pytest.skip(
            "deepspeed is not installed: the launch environment needs it (checked the parsed options only)"
        )
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args.deepspeed_fields_from_accelerate_config = list(
        yaml.safe_load((REPO / "launch_configs" / "deepspeed_zero3.yaml").read_text())["deepspeed_config"]
    )
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"


@pytest.mark.slow
def test_cpu_config_runs_the_training_loop(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`accelerate launch --config_file launch_configs/cpu.yaml -m slackdist train ...` trains for real."""
    import json
    import subprocess
    import sys

    from train_helpers import tiny_config, write_dataset

    from slackdist.config import save_config

    data = write_dataset(tmp_path / "data", n_train=8, n_val=2)
    cfg = tiny_config(tiny_model_dir, data, tmp_path / "out", **{"train.num_epochs": 3})
    save_config(cfg, tmp_path / "config.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "1"]
    proc = subprocess.run(
        [
            *launch,
            "--config_file",
            str(REPO / "launch_configs" / "cpu.yaml"),
            "-m",
            "slackdist",
            "train",
            "--config",
            str(tmp_path / "config.yaml"),
            "--max-steps",
            "2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "done: 2 steps" in proc.stdout
    steps = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss" in m] == [1, 2]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
