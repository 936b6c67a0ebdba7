"""Nothing leaves the machine: prepare -> train -> merge -> chat with every outbound connection recorded.

Each command runs in its own process with `tests/fixtures/network_audit/sitecustomize.py` on
PYTHONPATH, whose audit hook records any name lookup of another host, any connection to a
non-loopback address, and any connection to the unreachable proxy every HTTP client is pointed at
(`HTTPS_PROXY=http://127.0.0.1:9`). The hook is checked first on a process that does reach out.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AUDIT = REPO / "tests" / "fixtures" / "network_audit"
SAMPLE = REPO / "tests" / "fixtures" / "sample_export"
PROXY = "http://127.0.0.1:9"
# What slackdist sets by itself: removed from the tests' environment so the run shows it does.
CLEARED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
           "DO_NOT_TRACK", "DISABLE_TELEMETRY", "NO_PROXY", "no_proxy")  # fmt: skip


def audited_env(log: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(
        PYTHONPATH=os.pathsep.join([str(AUDIT), str(REPO)]),
        SLACKDIST_NETWORK_LOG=str(log),
        HTTPS_PROXY=PROXY,
        HTTP_PROXY=PROXY,
        ALL_PROXY=PROXY,
        https_proxy=PROXY,
        http_proxy=PROXY,
        all_proxy=PROXY,
        **extra,
    )
    return env


def run(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{args}: {done.stderr[-3000:]}"
    return done


def test_the_audit_hook_sees_a_connection(tmp_path: Path) -> None:
    """The hook records a direct connection, a lookup, and a request sent to the proxy."""
    log = tmp_path / "network.log"
    code = (
        "import socket, urllib.request\n"
        "for attempt in (lambda: socket.create_connection(('192.0.2.1', 80), timeout=0.01),\n"
        "                lambda: socket.getaddrinfo('example.invalid', 443),\n"
        "                lambda: urllib.request.urlopen('https://huggingface.co', timeout=2)):\n"
        "    try:\n"
        "        attempt()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    run(audited_env(log), "-c", code, cwd=tmp_path)
    text = log.read_text()
    assert "connect ('192.0.2.1', 80)" in text
    assert "getaddrinfo 'example.invalid'" in text
    assert "connect ('127.0.0.1', 9)" in text  # urllib went to the proxy


@pytest.mark.slow
@pytest.mark.parametrize("user_offline", [False, True], ids=["nothing-set", "HF_HUB_OFFLINE=1"])
def test_prepare_train_merge_chat_make_no_outbound_connection(tmp_path: Path, user_offline: bool) -> None:
    log = tmp_path / "network.log"
    env = audited_env(log, **({"HF_HUB_OFFLINE": "1"} if user_offline else {}))
    sd = ("-m", "slackdist")
    run(env, *sd, "tiny-model", "model", cwd=tmp_path)
    run(env, *sd, "prepare", str(SAMPLE), "--out", "data", "--workers", "2", cwd=tmp_path)
    train = ("--data", "data", "--output", "out", "--model", "model", "--max-steps", "2", "--max-seq-len", "256",
             "--eval-every-n-steps", "1", "--save-every-n-steps", "1", "--lora-r", "4")  # fmt: skip
    run(env, *sd, "train", *train, cwd=tmp_path)
    run(env, *sd, "merge", "--adapter", "out", "--output", "merged", cwd=tmp_path)
    reply = run(
        env, *sd, "chat", "--model-dir", "out", "--prompt", "hello?", "--max-new-tokens", "4", cwd=tmp_path
    )
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and reply.stdout.strip()
    assert not log.exists(), f"outbound network attempts:\n{log.read_text()[:4000]}"


def test_nothing_in_the_package_uploads() -> None:
    """No call of the hub's upload side anywhere in slackdist (a push needs the user to do it)."""
    uploads = {"push_to_hub", "upload_file", "upload_folder", "create_repo", "HfApi", "create_commit"}
    found = []
    for path in sorted((REPO / "slackdist").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = (
                node.attr
                if isinstance(node, ast.Attribute)
                else node.id
                if isinstance(node, ast.Name)
                else None
            )
            name = name or (node.arg if isinstance(node, ast.keyword) else None)
            if name in uploads:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    assert not found, found


def test_telemetry_off_and_offline_only_when_every_model_is_local(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from slackdist.offline import set_private_defaults

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        '{"base_model_name_or_path": "meta-llama/Llama-3.2-3B-Instruct"}'
    )
    cases = [
        ([str(tiny_model_dir)], {}, "1"),  # a local model: nothing needs the hub
        ([str(tiny_model_dir), None], {}, "1"),
        (["meta-llama/Llama-3.2-3B-Instruct"], {}, None),  # a hub id: the download was asked for
        ([str(adapter)], {}, None),  # a local adapter on a hub base
        (None, {}, None),  # a command that says nothing about its models
        ([str(tiny_model_dir)], {"HF_HUB_OFFLINE": "0"}, "0"),  # the user's choice stands
    ]
    for models, env, offline in cases:
        set_private_defaults(models, env)
        assert env.get("HF_HUB_OFFLINE") == offline, models
        assert env["HF_HUB_DISABLE_TELEMETRY"] == "1" and env["DO_NOT_TRACK"] == "1"
    env = {"HF_HUB_DISABLE_TELEMETRY": "0"}
    set_private_defaults([], env)
    assert env["HF_HUB_DISABLE_TELEMETRY"] == "0"
