"""Output folders (slackdist/files.py and every command that writes one): installed whole by one rename,
a foreign non-empty output refused unless --overwrite, and Ctrl-C / SIGTERM leave no temporary folder
and the previous output as it was."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inference_helpers import write_tiny_adapter
from train_helpers import cli_args, tiny_config, write_dataset

from slackdist.cli import main as cli_main
from slackdist.errors import SlackdistError
from slackdist.files import (
    Interrupted,
    Stage,
    check_output_dir,
    install_dir,
    interrupt_exit_code,
    json_line,
    signals_deferred,
    sigterm_interrupts,
    staged_dir,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_EXPORT = REPO / "tests" / "fixtures" / "sample_export"


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    """Temporary and backup folders in `parent` (`.NAME.tmp-*`, `.NAME.old-*`, prepare's `NAME.tmp-*`)."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------- install_dir, Stage, check_output_dir


def test_install_replaces_the_folder_whole_and_keeps_no_backup(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "both.txt").write_text("old")
    with staged_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "both.txt").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
        assert tree(out) == {"old.txt": b"old", "both.txt": b"old"}  # nothing changes before the rename
    assert tree(out) == {"both.txt": b"new", "sub/new.txt": b"new"}
    assert leftovers(tmp_path) == []


@settings(max_examples=25, deadline=None)
@given(
    old=st.dictionaries(st.sampled_from("abcdef"), st.binary(max_size=8), max_size=5),
    new=st.dictionaries(st.sampled_from("abcdef"), st.binary(max_size=8), max_size=5),
)
def test_the_installed_folder_is_exactly_the_new_one(tmp_path_factory, old, new) -> None:
    root = tmp_path_factory.mktemp("install")
    out, tmp = root / "out", root / "tmp"
    for folder, files in ((out, old), (tmp, new)):
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
    install_dir(tmp, out)
    assert tree(out) == new
    assert sorted(p.name for p in root.iterdir()) == ["out"]


def test_a_failed_rename_puts_the_old_folder_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(FileNotFoundError):
        install_dir(tmp_path / "missing", out)  # the second rename fails: nothing to put in place
    assert tree(out) == {"a.txt": b"old"}
    assert leftovers(tmp_path) == []


def test_an_error_while_staging_leaves_nothing_and_removes_the_parents_it_made(tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError), staged_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "kept"
    existing.mkdir()
    (existing / "x").write_text("x")
    stage = Stage(existing)
    stage.create()
    stage.discard()
    stage.discard()  # idempotent
    assert tree(existing) == {"x": b"x"} and leftovers(tmp_path) == []


def test_a_symlinked_output_is_replaced_where_it_points(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "a").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    with staged_dir(link) as tmp:
        (tmp / "b").write_text("new")
    assert link.is_symlink() and tree(real) == {"b": b"new"}


def test_check_output_dir_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def check(out: Path, **kwargs) -> None:
        check_output_dir(out, markers=("report.json", "train.jsonl"), what="a prepared data folder", **kwargs)

    check(tmp_path / "new")  # not there yet
    (tmp_path / "empty").mkdir()
    check(tmp_path / "empty")
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "train.jsonl").write_text("")
    check(ours)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "report.md").write_text("my own notes")
    with pytest.raises(SlackdistError) as e:
        check(foreign)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{foreign}: not empty and not a prepared data folder")
    assert "--overwrite" in message
    check(foreign, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SlackdistError, match="exists and is not a folder"):
        check(tmp_path / "file", overwrite=True)
    export = ours / "export"
    export.mkdir()
    with pytest.raises(SlackdistError, match="which this command reads"):
        check(ours, inputs=[None, export], overwrite=True)
    monkeypatch.chdir(ours)
    with pytest.raises(SlackdistError, match="is the current folder or holds it"):
        check(ours, overwrite=True)


# ---------------------------------------------------------------- signals, in-process


def test_signals_held_by_a_deferral_arrive_after_it(tmp_path: Path) -> None:
    reached_end = False
    with pytest.raises(Interrupted) as e, sigterm_interrupts():
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0)  # a bytecode boundary: where Python runs signal handlers
            reached_end = True
        pytest.fail("the held SIGTERM was not delivered")  # pragma: no cover
    assert reached_end and interrupt_exit_code(e.value) == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    with pytest.raises(KeyboardInterrupt) as e, signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0)
        reached_end = "sigint"
    assert reached_end == "sigint" and interrupt_exit_code(e.value) == 130


# ---------------------------------------------------------------- a foreign non-empty output is refused


def foreign_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "report.md").write_text("a user's own report")
    return path


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "run")


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = write_dataset(tmp_path_factory.mktemp("data") / "data", n_train=4, n_val=4)
    shutil.copyfile(data / "validation.jsonl", data / "test.jsonl")
    return data


@pytest.mark.parametrize(
    "command", ["prepare", "tiny-model", "real-model", "merge", "eval", "export", "train"]
)
def test_a_foreign_output_folder_is_refused_with_one_line(
    command: str, tmp_path: Path, tiny_model_dir: Path, adapter_dir: Path, eval_data: Path, capsys
) -> None:
    out = foreign_folder(tmp_path / "mine")
    args = {
        "prepare": ["prepare", str(SAMPLE_EXPORT), "--out", str(out)],
        "tiny-model": ["tiny-model", str(out)],
        "real-model": ["real-model", str(out)],
        "merge": ["merge", "--adapter", str(adapter_dir), "--output", str(out)],
        "eval": ["eval", "--model-dir", str(adapter_dir), "--data", str(eval_data), "--out", str(out)],
        "export": ["export", "--model-dir", str(tiny_model_dir), "--out", str(out)],
        "train": ["train", "--model", str(tiny_model_dir), "--data", str(eval_data), "--output", str(out)],
    }[command]
    assert cli_main(args) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"slackdist {command}: error: {out}: not empty and not ")
    assert "pass --overwrite" in line
    assert tree(out) == {"report.md": b"a user's own report"} and leftovers(tmp_path) == []


def test_prepare_overwrite_replaces_a_foreign_folder(tmp_path: Path, capsys) -> None:
    out = foreign_folder(tmp_path / "mine")
    assert cli_main(["prepare", str(SAMPLE_EXPORT), "--out", str(out), "--overwrite"]) == 0
    assert "a user's own report" not in (out / "report.md").read_text()
    assert (out / "train.jsonl").is_file() and leftovers(tmp_path) == []


def test_outputs_never_replace_their_input_or_the_current_folder(
    tmp_path: Path, adapter_dir: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run = shutil.copytree(adapter_dir, tmp_path / "run")
    before = tree(run)
    assert cli_main(["merge", "--adapter", str(run), "--output", str(run), "--overwrite"]) == 2
    assert "which this command reads" in one_error_line(capsys)
    export = shutil.copytree(SAMPLE_EXPORT, tmp_path / "data" / "export")
    assert cli_main(["prepare", str(export), "--out", str(tmp_path / "data"), "--overwrite"]) == 2
    assert "which this command reads" in one_error_line(capsys)
    monkeypatch.chdir(run)
    assert cli_main(["tiny-model", ".", "--overwrite"]) == 2
    assert "is the current folder" in one_error_line(capsys)
    assert tree(run) == before and tree(export) == tree(SAMPLE_EXPORT)


def test_export_file_refuses_a_foreign_modelfile_beside_it(
    tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    (tmp_path / "Modelfile").write_text("FROM llama3\n")  # someone's own Modelfile
    gguf = tmp_path / "team.gguf"
    assert cli_main(["export", "--model-dir", str(tiny_model_dir), "--out", str(gguf), "--quant", "f32"]) == 2
    assert "Modelfile: exists and is not our Modelfile" in one_error_line(capsys)
    assert not gguf.exists()
    (tmp_path / "Modelfile").unlink()
    gguf.write_text("not a gguf")
    assert cli_main(["export", "--model-dir", str(tiny_model_dir), "--out", str(gguf), "--quant", "f32"]) == 2
    assert "team.gguf: exists and is not a GGUF file" in one_error_line(capsys)
    gguf.unlink()
    for _ in range(2):  # our own pair is replaced
        assert (
            cli_main(["export", "--model-dir", str(tiny_model_dir), "--out", str(gguf), "--quant", "f32"])
            == 0
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "team.gguf"]


# ---------------------------------------------------------------- train's OUT


def test_a_new_training_output_replaces_the_old_one_whole(
    tiny_model_dir: Path, eval_data: Path, tmp_path: Path, capsys
) -> None:
    """Run 1 (merged) then run 2 into the same OUT: OUT is run 2's model and records only; the earlier
    merged/ and eval/ (made from run 1's adapter) go with it; no temporary folder anywhere."""
    from slackdist.train.recipe import train

    out = tmp_path / "out"
    first = train(tiny_config(tiny_model_dir, eval_data, out, **{"train.merge_after_training": True}))
    assert (out / "merged" / "config.json").is_file() and first.global_step > 0
    (out / "eval").mkdir()
    (out / "eval" / "eval.json").write_text("{}")
    old_adapter = (out / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(out / "checkpoints")  # else run 2 must resume run 1
    train(tiny_config(tiny_model_dir, eval_data, out, **{"train.learning_rate": 5e-3, "train.seed": 7}))
    names = sorted(p.name for p in out.iterdir())
    assert "merged" not in names and "eval" not in names
    assert {"adapter_model.safetensors", "checkpoints", "metrics.jsonl", "runs", "loss.png"} <= set(names)
    assert (out / "adapter_model.safetensors").read_bytes() != old_adapter
    state = json.loads((out / "trainer_state.json").read_text())
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{state['global_step']:06d}"]
    assert leftovers(tmp_path) == [] and not [p for p in out.rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------- Ctrl-C and SIGTERM in a real process

# The command runs for real in its own process; only `Stage.install` of the output under test is
# wrapped to wait for a signal once the temporary folder is complete: the last moment an interrupt
# can land before the output changes, and one the test can reach without sleeping.
WRAPPER = """\
import signal, sys
from pathlib import Path
import slackdist.files as files
from slackdist.cli import main

block = Path(sys.argv[1]).resolve()
install = files.Stage.install

def install_or_wait(self):
    if self.out == block:
        print("STAGED", file=sys.stderr, flush=True)
        while True:
            signal.pause()
    install(self)

files.Stage.install = install_or_wait
sys.exit(main(sys.argv[2:]))
"""


@dataclass
class Scenario:
    out: Path
    args: list[str]
    kept: Callable[[Path], dict[str, bytes]] = tree
    """What of the previous output must be byte-identical after the interrupt."""


def root_files(folder: Path) -> dict[str, bytes]:
    """A training output's model files (its records grow while a run runs)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "metrics.jsonl"}


def scenario(command: str, root: Path, tiny_model_dir: Path, adapter_dir: Path, eval_data: Path) -> Scenario:
    """Write a previous output in-process, and the arguments that write a different one over it."""
    out = root / "out"
    if command == "tiny-model":
        assert cli_main(["tiny-model", str(out), "--seed", "1"]) == 0
        return Scenario(out, ["tiny-model", str(out), "--seed", "2"])
    if command == "merge":
        merge = ["merge", "--adapter", str(adapter_dir), "--output", str(out)]
        assert cli_main([*merge, "--dtype", "fp32"]) == 0
        return Scenario(out, [*merge, "--dtype", "bf16"])
    if command == "eval":
        evaluate = ["eval", "--model-dir", str(adapter_dir), "--data", str(eval_data), "--out", str(out)]
        assert cli_main([*evaluate, "--num-samples", "1", "--max-new-tokens", "2"]) == 0
        return Scenario(out, [*evaluate, "--num-samples", "2", "--max-new-tokens", "2"])
    if command == "export":
        assert (
            cli_main(["export", "--model-dir", str(tiny_model_dir), "--out", str(out), "--quant", "f32"]) == 0
        )
        return Scenario(
            out, ["export", "--model-dir", str(tiny_model_dir), "--out", str(out), "--quant", "f16"]
        )
    assert command == "train"
    from slackdist.train.recipe import train

    train(tiny_config(tiny_model_dir, eval_data, out))
    shutil.rmtree(out / "checkpoints")
    cfg = tiny_config(tiny_model_dir, eval_data, out, **{"train.seed": 7})
    return Scenario(out, ["train", *cli_args(cfg)], kept=root_files)


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    """Poll `condition` until it holds; fail (never hang) when the deadline passes or the process exits."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "sig"),
    [
        ("tiny-model", signal.SIGTERM),
        ("tiny-model", signal.SIGINT),
        ("merge", signal.SIGTERM),
        ("eval", signal.SIGTERM),
        ("export", signal.SIGTERM),
        ("train", signal.SIGTERM),
        ("train", signal.SIGINT),
    ],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else v,
)
def test_an_interrupt_leaves_no_temporary_folder_and_the_previous_output_intact(
    command: str,
    sig: signal.Signals,
    tmp_path: Path,
    tiny_model_dir: Path,
    adapter_dir: Path,
    eval_data: Path,
) -> None:
    s = scenario(command, tmp_path / "work", tiny_model_dir, adapter_dir, eval_data)
    before = s.kept(s.out)
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    err_path = tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(tmp_path / "wrapper.py"), str(s.out), *s.args],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(
                lambda: bool(leftovers(s.out.parent)) and "STAGED" in err_path.read_text(),
                "a complete temporary folder",
                proc,
            )
            os.kill(proc.pid, sig)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    after_staged = err_path.read_text().split("STAGED\n", 1)[1].splitlines()
    by = "" if sig == signal.SIGINT else f" by {sig.name}"
    assert after_staged == [f"slackdist {command}: interrupted{by}; no output folder was replaced"]
    assert proc.returncode == 128 + sig
    assert leftovers(s.out.parent) == []
    assert not [p for p in s.out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert s.kept(s.out) == before


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(value=_JSON)
def test_a_json_line_reads_back_as_the_value(value: object) -> None:
    line = json_line(value)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line, whatever the strings hold
    try:
        expected = json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: refused as the standard library refuses it
        return
    assert json.loads(line) == json.loads(expected)


def test_a_lone_surrogate_fails_as_with_the_standard_library() -> None:
    with pytest.raises(UnicodeEncodeError):
        json_line({"text": "\ud800"})
