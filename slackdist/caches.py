"""What slackdist keeps between runs to start sooner: where, and torch.compile's caches with it.

- `cache_dir()`: the memory probe's figures (`slackdist.train.memory`) live here.
- `keep_compile_caches()`: torch.compile's on-disk caches (inductor's compiled graphs, AOT autograd's,
  Triton's kernels) go to `cache_dir()/torch-compile` unless `TORCHINDUCTOR_CACHE_DIR` is set. Torch's
  default is under the temporary folder, which a reboot, a fresh container or a SLURM job's private
  `TMPDIR` empties, and then the next run compiles from scratch: on an H100 at 3B, training's first two
  steps took 22.5 + 3.8 s from a cold cache and 8.9 + 3.0 s from a warm one, chat's compiled decode
  27-40 s against 6 s (bench/README.md; README, When to hand off to vLLM).

Torch reads the variable the first time anything compiles, and importing bitsandbytes already does,
so `slackdist.cli.main` calls this before a command's module is imported.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

COMPILE_CACHE = "TORCHINDUCTOR_CACHE_DIR"


def cache_dir(environ: MutableMapping[str, str] | None = None) -> Path:
    """`SLACKDIST_CACHE_DIR`, else `$XDG_CACHE_HOME/slackdist`, else `~/.cache/slackdist`."""
    env = os.environ if environ is None else environ
    if env.get("SLACKDIST_CACHE_DIR"):
        return Path(env["SLACKDIST_CACHE_DIR"])
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slackdist"


def keep_compile_caches(environ: MutableMapping[str, str] | None = None) -> Path | None:
    """Point torch.compile's caches at `cache_dir()/torch-compile` unless the user chose a folder.

    Returns:
        The folder torch.compile will use when this set it; None when the variable was already set
        or the folder cannot be created (a read-only or missing home: torch's default stays).
    """
    env = os.environ if environ is None else environ
    if env.get(COMPILE_CACHE):
        return None
    try:
        folder = cache_dir(env) / "torch-compile"
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError):  # RuntimeError: Path.home() without HOME or a passwd entry
        return None
    env[COMPILE_CACHE] = str(folder)
    return folder
