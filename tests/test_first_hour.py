"""What a new user meets in the first hour: one-line errors with the way forward, plain log lines.

Offline and hub cases run the real CLI in a child process with the hub's address (HF_ENDPOINT) and
cache (HF_HOME) pointed at this test: a closed local port for "no network", a local HTTP server
answering as the hub answers a gated or unknown repository, an empty or a filled cache.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from train_helpers import tiny_config, write_dataset

from slackdist import __version__
from slackdist.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "meta-llama/Llama-3.2-3B-Instruct"
TRAIN_FAST = ["--no-load-in-4bit", "--max-seq-len", "256", "--max-steps", "1", "--lora-r", "4"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the socket is: connections are refused


def _env(tmp_path: Path, endpoint: str | None = None, **extra: str) -> dict[str, str]:
    """This interpreter's environment with an empty Hugging Face home and the hub at `endpoint`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env |= {"PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf_home"), "TQDM_DISABLE": "1"}
    env["HF_ENDPOINT"] = endpoint or f"http://127.0.0.1:{_closed_port()}"
    return env | extra


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture
def export_in_data(tmp_path: Path, sample_export_dir: Path) -> Path:
    """A working folder laid out as the README says: the export in data/."""
    shutil.copytree(sample_export_dir, tmp_path / "data")
    return tmp_path


# ---------------------------------------------------------------- the default (gated) model offline


def test_main_train_offline_fails_fast_in_one_line_with_the_hints(export_in_data: Path) -> None:
    proc = _run([sys.executable, str(REPO / "main.py"), "--train"], export_in_data, _env(export_in_data))
    assert proc.returncode == 2
    (line,) = _error_lines(proc.stderr)  # no retry warnings, no traceback
    assert line.startswith(f"main.py --train: error: {DEFAULT_MODEL}: not in the local Hugging Face cache")
    for hint in ("--model DIR", "HF_TOKEN", "licence", "HF_HUB_OFFLINE=1"):
        assert hint in line, hint
    # nothing was prepared or created before the model was known to be loadable
    assert not (export_in_data / "data" / "prepared").exists()
    assert not (export_in_data / "llama3_slack_finetuned").exists()


def test_hf_hub_offline_and_not_cached_is_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_dataset(tmp_path / "data", n_train=4, n_val=1)
    env = _env(tmp_path, HF_HUB_OFFLINE="1")
    proc = _run(
        [sys.executable, "-m", "slackdist", "train", "--data", str(data), "--output", "out"], tmp_path, env
    )
    assert proc.returncode == 2
    (line,) = _error_lines(proc.stderr)
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in line and "--model DIR" in line
    assert not (tmp_path / "out").exists()


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a repository this caller may not read."""

    error_code = "GatedRepo"

    def _answer(self) -> None:
        self.send_response(403 if self.error_code == "GatedRepo" else 404)
        self.send_header("X-Error-Code", self.error_code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _answer

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def fake_hub() -> Iterator[tuple[str, type[_Hub]]]:
    handler = type("Hub", (_Hub,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("error_code", "expected"),
    [
        ("GatedRepo", "a gated model: accept its licence at http://127.0.0.1"),
        ("RepoNotFound", "no model of that name on 127.0.0.1"),
    ],
)
def test_gated_or_unknown_model_names_the_way_forward(
    tmp_path: Path, fake_hub: tuple[str, type[_Hub]], error_code: str, expected: str
) -> None:
    endpoint, handler = fake_hub
    handler.error_code = error_code
    data = write_dataset(tmp_path / "data", n_train=4, n_val=1)
    proc = _run(
        [sys.executable, "-m", "slackdist", "train", "--data", str(data), "--output", "out"],
        tmp_path,
        _env(tmp_path, endpoint),
    )
    assert proc.returncode == 2
    (line,) = _error_lines(proc.stderr)
    assert expected in line and "HF_TOKEN" in line and "--model DIR" in line, line
    assert not (tmp_path / "out").exists()


def test_a_cached_hub_model_trains_when_the_hub_is_unreachable(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The model is in the hub cache: one plain line says so, no retries, and training runs."""
    env = _env(tmp_path)
    snapshot = Path(env["HF_HOME"]) / "hub" / "models--local--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    data = write_dataset(tmp_path / "data", n_train=4, n_val=1)
    args = ["train", "--data", str(data), "--output", "out", "--model", "local/tiny", *TRAIN_FAST]
    proc = _run([sys.executable, "-m", "slackdist", *args], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "slackdist: 127.0.0.1" in proc.stderr and "loading local/tiny from the local cache" in proc.stderr
    assert "Retrying" not in proc.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- paths that are not models


def test_model_paths_that_are_not_models_are_one_line_errors(
    tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    from inference_helpers import write_tiny_adapter

    data = write_dataset(tmp_path / "data", n_train=4, n_val=1)
    adapter = write_tiny_adapter(tiny_model_dir, tmp_path / "adapter")
    cases = {
        "./nomodel": "./nomodel: no such model folder",
        str(data): f"{data}: not a model folder (it holds data, not a model",
        str(adapter): f"{adapter}: not a model folder (a LoRA adapter; its base model is {tiny_model_dir}",
        str(tiny_model_dir / "config.json"): "a file, not a model folder",
        str(tmp_path / "empty"): "no config.json; expected a Hugging Face model folder",
    }
    (tmp_path / "empty").mkdir()
    capsys.readouterr()  # the adapter's loading bars
    for model, expected in cases.items():
        code = cli_main(["train", "--data", str(data), "--output", str(tmp_path / "out"), "--model", model])
        assert code == 2
        (line,) = _error_lines(capsys.readouterr().err)
        assert expected in line, line
        assert not (tmp_path / "out").exists()


def test_a_failed_start_leaves_no_output_folder(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    data = write_dataset(tmp_path / "data", n_train=4, n_val=1)
    with (data / "train.jsonl").open("a") as f:
        f.write('{"messages": [{"role": "bot", "content": "x"}]}\n')  # fails while tokenizing, in setup
    out = tmp_path / "out"
    code = cli_main(["train", "--data", str(data), "--output", str(out), "--model", str(tiny_model_dir)])
    assert code == 2
    assert "train.jsonl:5: message 0 must be" in capsys.readouterr().err
    assert not out.exists()
    # `--test` then says there is no model yet, not "not a model folder"
    assert cli_main(["chat", "--model-dir", str(out), "--prompt", "hi"]) == 2
    assert "no such model folder" in capsys.readouterr().err
    # a folder that existed before the run is left as it was
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli_main(["train", "--data", str(data), "--output", str(out), "--model", str(tiny_model_dir)]) == 2
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- what the screen shows


def test_log_lines_are_plain_and_printed_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_dataset(tmp_path / "data", n_train=6, n_val=2)
    env = _env(tmp_path)
    train = ["train", "--data", str(data), "--output", "out", "--model", str(tiny_model_dir), *TRAIN_FAST]
    proc = _run([sys.executable, "-m", "slackdist", *train], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert any(line.startswith("slackdist: memory plan:") for line in lines)
    # two layers: each attention's q/k/v and each MLP's gate/up draw one dropout mask
    assert "slackdist: LoRA: 4 blocks share one dropout and A matmul (lora.share_inputs)" in lines
    assert not [line for line in lines if "WARNING:" in line or "Warning" in line], proc.stderr
    logged = [line for line in lines if line.startswith("slackdist: ")]
    assert len(logged) == len(set(logged)), "a log line printed twice"
    chat = _run(
        [
            sys.executable,
            "-m",
            "slackdist",
            "chat",
            "--model-dir",
            "out",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "3",
        ],
        tmp_path,
        env,
    )
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "Warning" not in chat.stderr and "warnings.warn" not in chat.stderr, chat.stderr


def test_a_bad_choice_is_one_line_naming_the_allowed_values(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--optimizer", "adam"])
    assert e.value.code == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "invalid choice: 'adam'" in line and "paged_adamw_32bit" in line and "adamw_torch" in line


def test_help_lists_allowed_values_and_version_is_there(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "slackdist", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "one of: paged_adamw_32bit, adamw_torch_fused, adamw_torch" in " ".join(out.split())
    for argv in (["-m", "slackdist", "--version"], [str(REPO / "main.py"), "--version"]):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=_env(tmp_path))
        assert proc.stdout.strip() == f"slackdist {__version__}", proc.stderr


def test_a_config_reports_every_bad_key_at_once(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"train": {"lrr": 1, "num_epochs": "many", "warmup_ratio": 2}, "modle": {"x": 1}})
    )
    assert cli_main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.lrr' (did you mean train.learning_rate?)" in err
    assert "train.num_epochs='many': expected int" in err
    assert "unknown section 'modle'" in err
    assert "train.warmup_ratio=2.0: must be in [0, 1)" in err  # a bad value of a key that did apply


def test_resume_auto_on_a_finished_run_says_so(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    from slackdist.train.recipe import train

    data = write_dataset(tmp_path / "data", n_train=6, n_val=2)
    out = tmp_path / "out"
    train(tiny_config(tiny_model_dir, data, out, **{"train.max_steps": 2}))
    adapter = out / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    capsys.readouterr()
    args = ["train", "--data", str(data), "--output", str(out), "--model", str(tiny_model_dir)]
    assert cli_main([*args, "--resume", "auto"]) == 0
    said = capsys.readouterr().out
    steps = json.loads((out / "trainer_state.json").read_text())["global_step"]
    assert f"{out}: this run already finished ({steps} steps" in said and f"The adapter is in {out}" in said
    assert "tokens/s" not in said
    assert adapter.stat().st_mtime_ns == before  # nothing trained or written again


# ---------------------------------------------------------------- prepare and train agree on lengths


def test_main_train_prepares_with_the_training_tokenizer(export_in_data: Path, tiny_model_dir: Path) -> None:
    config = {
        "model": {"base_model": str(tiny_model_dir), "load_in_4bit": False},
        "train": {"max_steps": 1, "max_seq_len": 256, "save_every_n_steps": 0, "eval_every_n_steps": 0},
    }
    (export_in_data / "c.yaml").write_text(yaml.safe_dump(config))
    proc = _run(
        [sys.executable, str(REPO / "main.py"), "--train", "--config", "c.yaml"],
        export_in_data,
        _env(export_in_data),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((export_in_data / "data" / "prepared" / "report.json").read_text())
    assert report["config"]["tokenizer"] == str(tiny_model_dir) and report["config"]["max_tokens"] == 256
    assert "longer than max_seq_len" not in proc.stderr  # prepare windowed what training would drop


@pytest.mark.parametrize(
    ("prepare_args", "why"),
    [
        ([], "prepare's budget was data.max_tokens=2048; prepare again with --max-tokens 200"),
        (
            ["--max-tokens", "200"],
            "prepare estimated ~4 characters a token; `slackdist prepare --tokenizer MODEL`",
        ),
    ],
)
def test_train_says_why_it_drops_conversations_prepare_kept(
    tmp_path: Path, sample_export_dir: Path, tiny_model_dir: Path, capsys, prepare_args: list[str], why: str
) -> None:
    prepared = tmp_path / "prepared"
    argv = ["prepare", str(sample_export_dir), "--out", str(prepared), "--split", "100,0,0", *prepare_args]
    assert cli_main(argv) == 0
    train = [
        "train",
        "--data",
        str(prepared),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(tiny_model_dir),
    ]
    assert cli_main([*train, "--no-load-in-4bit", "--max-seq-len", "200", "--max-steps", "1"]) == 0
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "longer than max_seq_len=200" in line]
    assert line.startswith(f"slackdist: {prepared / 'train.jsonl'}: ") and "left out" in line
    assert why in line, line


def test_the_export_folder_is_git_ignored_and_the_package_is_not() -> None:
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    assert ignored("data/export.zip") and ignored("data/prepared/train.jsonl")
    assert not ignored("slackdist/data/examples.py")


def test_the_docs_cite_only_what_a_clone_has() -> None:
    """README.md and bench/README.md name no folder outside the repository and no repository path that is
    missing (bench/results/ is what the benchmarks write)."""
    for doc in (REPO / "README.md", REPO / "bench" / "README.md"):
        text = doc.read_text(encoding="utf-8")
        for outside in ("../shared", ".peer/", "DESIGN.md", "STYLE.md", "/work/"):
            assert outside not in text, f"{doc.name} cites {outside}"
        cited = re.findall(r"(?<![\w/.$])((?:bench|tests|slackdist|launch_configs|scripts)/[\w./-]*\w)", text)
        missing = {p for p in cited if not p.startswith("bench/results") and not (REPO / p).exists()}
        assert not missing, f"{doc.name} cites {sorted(missing)}"
