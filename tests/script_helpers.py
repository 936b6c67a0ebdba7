"""Python files outside the package (bench/*.py, test fixtures) loaded by path, as the tests need them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path) -> ModuleType:
    """The file at `path` as a module named after it, registered in `sys.modules` (dataclasses look
    their module up there while the file runs)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def load_bench(name: str) -> ModuleType:
    """bench/NAME.py as a module."""
    return load_script(REPO / "bench" / f"{name}.py")
