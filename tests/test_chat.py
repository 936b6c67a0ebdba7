"""`slackdist chat` driven as a user would: in a pseudo-terminal (pexpect), with --prompt, and from a pipe."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from inference_helpers import write_tiny_adapter

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 90  # a loaded CI machine; each step normally takes well under a second
PROMPT_TOKENS = re.compile(r"\[prompt (\d+) tokens, reply (\d+) tokens")


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("chat") / "out")


def _chat_args(model_dir: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "slackdist",
        "chat",
        "--model-dir",
        str(model_dir),
        "--temperature",
        "0",
        "--seed",
        "0",
        *extra,
    ]


def _spawn(model_dir: Path, *extra: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        _chat_args(model_dir, *extra),
        cwd=REPO,
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(50, 200),
    )
    child.expect_exact("you> ")
    return child


def _ask(child: pexpect.spawn, text: str) -> tuple[str, int]:
    """Send a message; return (reply text, prompt tokens from the stats line)."""
    child.sendline(text)
    child.expect_exact("bot> ")
    child.expect(PROMPT_TOKENS)
    reply = child.before.strip()
    prompt_tokens = int(child.match.group(1))
    child.expect_exact("you> ")
    return reply, prompt_tokens


def _ended(child: pexpect.spawn) -> tuple[int | None, str]:
    child.expect(pexpect.EOF)
    output = child.before
    child.close()
    return child.exitstatus, output


def test_interactive_reply_history_reset_commands_and_ctrl_d(adapter_dir):
    child = _spawn(adapter_dir, "--max-new-tokens", "6")
    seen = ""
    try:
        first, n1 = _ask(child, "is the build green?")
        assert first  # a reply appeared after "bot> "
        second, n2 = _ask(child, "is the build green?")
        assert n2 > n1 + 5  # the first exchange is in the prompt now
        child.sendline("/reset")
        child.expect_exact("[history cleared]")
        child.expect_exact("you> ")
        third, n3 = _ask(child, "is the build green?")
        assert (third, n3) == (first, n1)  # same prompt as the first: history really gone
        child.sendline("/compare")
        child.expect_exact("base> ")
        child.expect_exact("tuned> ")
        child.expect(PROMPT_TOKENS)
        assert child.before.strip() == first  # the tuned model answers as before
        child.expect_exact("you> ")
        child.sendline("/help")
        child.expect_exact("/compare")
        child.expect_exact("you> ")
        child.sendeof()  # Ctrl+D (`exit` is tested on the piped run)
        status, seen = _ended(child)
    finally:
        if child.isalive():
            child.terminate(force=True)
    assert status == 0
    assert "Traceback" not in seen


def test_ctrl_c_stops_a_reply_then_leaves_at_the_prompt(adapter_dir):
    child = _spawn(adapter_dir, "--max-new-tokens", "3000")
    try:
        child.sendline("tell me everything")
        child.expect_exact("bot> ")
        child.expect(r"\S")  # the reply is streaming
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact("you> ")  # the program goes on
        child.sendintr()
        status, output = _ended(child)
    finally:
        if child.isalive():
            child.terminate(force=True)
    assert status == 0
    assert "Traceback" not in output and "KeyboardInterrupt" not in output


def _run(args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=TIMEOUT
    )


def test_prompt_flag_via_main_py_then_stdin_lines(adapter_dir):
    """`python main.py --test --prompt` answers once; piped stdin: one message per line, same history rules."""
    once = _run(
        [
            "main.py",
            "--test",
            "--model-dir",
            str(adapter_dir),
            "--temperature",
            "0",
            "--seed",
            "0",
            "--max-new-tokens",
            "6",
            "--prompt",
            "is the build green?",
        ]
    )
    assert once.returncode == 0, once.stderr
    answer = once.stdout.strip()
    assert answer and "you>" not in once.stdout and "bot>" not in once.stdout
    piped = _run(
        _chat_args(adapter_dir, "--max-new-tokens", "6"), "is the build green?\n/reset\nhello\nexit\n/help\n"
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith(once.stdout)  # the same conversation gives the same answer in both modes
    rest = piped.stdout[len(once.stdout) :]
    assert rest.startswith("[history cleared]\n")
    assert rest[len("[history cleared]\n") :].strip()  # the answer to "hello"
    assert "/compare" not in piped.stdout  # nothing after "exit" ran (/help would list /compare)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_bad_model_dir_is_a_one_line_error(tmp_path, make):
    folder = tmp_path / "nope"
    if make == "empty":
        folder.mkdir()
    done = _run(["-m", "slackdist", "chat", "--model-dir", str(folder), "--prompt", "hi"])
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and str(folder) in errors[0]
    assert "Traceback" not in done.stderr
