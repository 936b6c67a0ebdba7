"""slackdist/caches.py: where slackdist keeps what it reuses, torch.compile's caches included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slackdist.caches import COMPILE_CACHE, cache_dir, keep_compile_caches


def test_cache_dir_order(tmp_path: Path) -> None:
    assert cache_dir({"SLACKDIST_CACHE_DIR": str(tmp_path / "a"), "XDG_CACHE_HOME": "/x"}) == tmp_path / "a"
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "slackdist"
    assert cache_dir({}) == Path.home() / ".cache" / "slackdist"


def test_compile_cache_goes_to_slackdist_cache(tmp_path: Path) -> None:
    env = {"SLACKDIST_CACHE_DIR": str(tmp_path / "cache")}
    assert keep_compile_caches(env) == tmp_path / "cache" / "torch-compile"
    assert env[COMPILE_CACHE] == str(tmp_path / "cache" / "torch-compile")
    assert (tmp_path / "cache" / "torch-compile").is_dir()


def test_compile_cache_set_by_the_user_is_kept(tmp_path: Path) -> None:
    env = {"SLACKDIST_CACHE_DIR": str(tmp_path / "cache"), COMPILE_CACHE: "/mine"}
    assert keep_compile_caches(env) is None
    assert env[COMPILE_CACHE] == "/mine"
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_cache_leaves_torch_default(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        env = {"SLACKDIST_CACHE_DIR": str(tmp_path / "cache")}
        assert keep_compile_caches(env) is None
        assert COMPILE_CACHE not in env
    finally:
        tmp_path.chmod(0o700)


def test_file_in_the_way_leaves_torch_default(tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("not a folder")
    env = {"SLACKDIST_CACHE_DIR": str(tmp_path / "cache")}
    assert keep_compile_caches(env) is None
    assert COMPILE_CACHE not in env


def test_no_home_leaves_torch_default(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    env: dict[str, str] = {}
    assert keep_compile_caches(env) is None
    assert env == {}


@pytest.mark.parametrize("users_choice", [None, "mine"])
def test_cli_sets_it_before_bitsandbytes_asks_torch(tmp_path: Path, users_choice: str | None) -> None:
    """Importing bitsandbytes makes torch fix its cache folder; the CLI must come first, and torch
    must then use ours (or the user's)."""
    env = {k: v for k, v in os.environ.items() if k != COMPILE_CACHE}
    env["SLACKDIST_CACHE_DIR"] = str(tmp_path / "cache")
    if users_choice:
        env[COMPILE_CACHE] = str(tmp_path / users_choice)
    code = (
        "from slackdist.cli import main\n"
        f"assert main(['chat', '--model-dir', {str(tmp_path / 'missing')!r}]) == 2\n"
        "import bitsandbytes\n"
        "from torch._inductor.runtime.cache_dir_utils import cache_dir\n"
        "print(cache_dir())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = tmp_path / (users_choice or "cache/torch-compile")
    assert proc.stdout.strip().splitlines()[-1] == str(expected)
