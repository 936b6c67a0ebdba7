"""The garbage collector around long work: paused while a command's libraries import (slackdist/cli.py),
setup's objects frozen while training runs (slackdist/train/recipe.py), and both restored after (with the
process's signal handlers, also when training fails)."""

from __future__ import annotations

import gc
import signal
import sys
from pathlib import Path

import pytest
from train_helpers import tiny_config, write_dataset

from slackdist import cli
from slackdist.train import recipe


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "prepared", n_train=8, n_val=4)


@pytest.fixture
def module_recording_gc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A command module that records, as it is imported, whether the collector runs."""
    (tmp_path / "gc_probe_cmd.py").write_text(
        "import gc\nENABLED_AT_IMPORT = gc.isenabled()\n\ndef main(args, cfg):\n    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "gc-probe", ("gc_probe_cmd", (), "test"))
    yield "gc_probe_cmd"
    sys.modules.pop("gc_probe_cmd", None)


@pytest.mark.parametrize("enabled_before", [True, False])
def test_a_command_imports_with_the_collector_paused_and_runs_with_its_imports_frozen(
    module_recording_gc: str, enabled_before: bool
) -> None:
    assert gc.get_freeze_count() == 0
    (gc.enable if enabled_before else gc.disable)()
    try:
        with cli._loaded_with_libraries_frozen("gc-probe") as main:
            assert gc.get_freeze_count() > 10_000 and gc.isenabled() is enabled_before
            assert main(None, None) == 0
        assert gc.get_freeze_count() == 0 and gc.isenabled() is enabled_before  # restored as they were
    finally:
        gc.enable()
    assert sys.modules[module_recording_gc].ENABLED_AT_IMPORT is False


def test_a_command_that_fails_to_import_restores_the_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "gc-missing", ("slackdist_no_such_module", (), "test"))
    with pytest.raises(ModuleNotFoundError), cli._loaded_with_libraries_frozen("gc-missing"):
        pass
    assert gc.isenabled() and gc.get_freeze_count() == 0


def run_recording_freeze(cfg, monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> list[int]:
    """`train(cfg)`, recording the frozen-object count as `fit` starts."""
    seen: list[int] = []
    real_fit = recipe.LoRARecipe.fit

    def fit(self: recipe.LoRARecipe) -> None:
        seen.append(gc.get_freeze_count())
        if fail:
            raise RuntimeError("fit failed")
        real_fit(self)

    monkeypatch.setattr(recipe.LoRARecipe, "fit", fit)
    if fail:
        with pytest.raises(RuntimeError, match="fit failed"):
            recipe.train(cfg)
    else:
        recipe.train(cfg)
    return seen


def test_training_freezes_setups_objects_while_it_runs(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gc.get_freeze_count() == 0
    cfg = tiny_config(tiny_model_dir, data_dir, tmp_path / "out", **{"train.max_steps": 2})
    (frozen,) = run_recording_freeze(cfg, monkeypatch)
    assert frozen > 10_000  # torch, transformers, the model
    assert gc.get_freeze_count() == 0 and (tmp_path / "out" / "adapter_model.safetensors").is_file()

    cfg = tiny_config(tiny_model_dir, data_dir, tmp_path / "failed", **{"train.max_steps": 2})
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    (frozen,) = run_recording_freeze(cfg, monkeypatch, fail=True)
    assert frozen > 10_000 and gc.get_freeze_count() == 0  # unfrozen when the run fails too
    # and the preemption handlers training installed are gone (they used to stay when `fit` raised)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_someone_elses_freeze_is_left_alone(
    tiny_model_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc.freeze()
    try:
        theirs = gc.get_freeze_count()
        cfg = tiny_config(tiny_model_dir, data_dir, tmp_path / "out", **{"train.max_steps": 2})
        (during,) = run_recording_freeze(cfg, monkeypatch)
        # setup's objects frozen beside theirs, and not unfrozen after: their freeze is theirs to undo
        assert during > theirs and gc.get_freeze_count() > 0.9 * theirs
    finally:
        gc.unfreeze()
