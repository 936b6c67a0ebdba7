"""The package's import rules, read from its source with `ast` so they stay true.

- `model/`, `slack/` and `data/` never import `train/`: training builds on them, not the reverse.
- `slack/` imports nothing from `data/`, `train/` or `model/`, directly or through what it imports: the
  data flows one way, export -> messages -> (clean) -> conversations -> records -> report.
- `chat`, `eval`, `serve` and `generate` import nothing from `train/` except `merge`, and never the data
  pipeline's `data/records` nor the prepared data's report.json, directly or through what they import:
  a model folder carries what inference needs.
- In the modules that train and run models, imports sit at the top of the module; only optional or
  version-dependent packages are imported where they are used (LAZY).
- Every package a module imports at its top is installed by `pip install slackdist`: setup.cfg's
  install_requires or what they depend on (for the modules of an extra, that extra's too).
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import sys
from pathlib import Path

import pytest

import slackdist

PACKAGE = Path(slackdist.__file__).resolve().parent
INFERENCE = ("slackdist.chat", "slackdist.eval", "slackdist.serve", "slackdist.generate")
LAZY = {
    "bitsandbytes.functional",  # optional ([gpu] extra); a broken native library raises at import
    "bitsandbytes.optim",
    "deepspeed",  # only where a DeepSpeed launch config is used
    "flash_attn",  # optional: only its presence is asked for
    "torch.nn.attention.varlen",  # torch >= 2.10 only
    "torch._dynamo",  # its profiles (`torch._dynamo.pgo`): torch >= 2.6 only
    "torch.utils.serialization",  # torch >= 2.6 only
    "matplotlib",  # optional at run time, slow to import, needed at the end of a run
    "matplotlib.pyplot",
    "readline",  # not on every platform
    "uvicorn",  # the [serve] extra
}
TOP_LEVEL_RULE = ("slackdist.train.", "slackdist.model.", "slackdist.chat", "slackdist.eval", "slackdist.serve",
                  "slackdist.generate")  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Modules an import statement loads (`from a import b` is `a.b` when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert node.level == 0, "relative imports are not used in slackdist"
    names = [node.module]
    names += [
        f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in MODULES
    ]
    return names


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every import statement of `module`."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((name, in_function) for name in _imported(child))
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, False)
    return found


def _reachable(module: str) -> set[str]:
    """slackdist modules that importing `module` imports, itself included."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or name not in MODULES:
            continue
        seen.add(name)
        todo += [imported for imported, _ in _imports(name) if imported.startswith("slackdist")]
    return seen


def test_the_package_is_read() -> None:
    """The rules below are checked on real modules (a broken walk would pass them vacuously)."""
    assert {"slackdist.train.recipe", "slackdist.model.load", "slackdist.chat"} <= MODULES.keys()
    assert "slackdist.model.load" in _reachable("slackdist.chat")
    assert ("slackdist.model.load", False) in _imports("slackdist.train.recipe")
    assert {"slackdist.slack.markup", "slackdist.slack.messages"} <= _reachable("slackdist.slack.clean")


@pytest.mark.parametrize("layer", ["slackdist.model", "slackdist.slack", "slackdist.data"])
def test_lower_layers_never_import_train(layer: str) -> None:
    for module in (m for m in MODULES if m == layer or m.startswith(layer + ".")):
        wrong = [name for name, _ in _imports(module) if name.startswith("slackdist.train")]
        assert not wrong, f"{module} imports {wrong}"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("slackdist.slack.")])
def test_slack_imports_nothing_from_data_train_or_model(module: str) -> None:
    higher = ("slackdist.data", "slackdist.train", "slackdist.model")
    wrong = sorted(m for m in _reachable(module) if m.startswith(higher))
    assert not wrong, f"importing {module} imports {wrong}"


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_needs_only_merge_from_train_and_no_data_pipeline(module: str) -> None:
    reachable = _reachable(module)
    from_train = sorted(
        m for m in reachable if m.startswith("slackdist.train.") and m != "slackdist.train.merge"
    )
    assert not from_train, f"importing {module} imports {from_train}"
    assert "slackdist.data.records" not in reachable
    for name in reachable:
        constants = {
            n.value for n in ast.walk(ast.parse(MODULES[name].read_text())) if isinstance(n, ast.Constant)
        }
        assert "report.json" not in constants, (
            f"{name} (imported by {module}) reads the prepared data's report"
        )


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith(TOP_LEVEL_RULE)])
def test_imports_are_at_the_top_unless_optional(module: str) -> None:
    inside = {name for name, in_function in _imports(module) if in_function}
    assert inside <= LAZY, f"{module} imports {sorted(inside - LAZY)} inside a function"


def test_training_does_not_import_the_cleaner_or_its_secret_scanners() -> None:
    """Redaction runs in `prepare`; training reads records already redacted and does not pay for
    importing the scanners (detect-secrets, libphonenumber: 0.3 s of start-up on the GPU machine)."""
    reachable = _reachable("slackdist.train.recipe")
    assert {"slackdist.data.records", "slackdist.slack.post"} <= reachable  # the walk reaches the reader
    assert not {"slackdist.slack.clean", "slackdist.slack.redact", "slackdist.slack.secrets"} & reachable


EXTRA_MODULES = {"slackdist.serve": "serve", "slackdist.export_gguf": "gguf", "slackdist.gguf_vocab": "gguf"}
"""Modules that only an extra's command imports, and the extra that installs what they import."""


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _declared() -> tuple[list[str], dict[str, list[str]]]:
    """setup.cfg's install_requires and extras_require, as requirement strings."""
    cfg = configparser.ConfigParser()
    cfg.read(PACKAGE.parent / "setup.cfg")

    def lines(text: str) -> list[str]:
        return [
            line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")
        ]

    extras = {name: lines(value) for name, value in cfg["options.extras_require"].items()}
    return lines(cfg["options"]["install_requires"]), extras


def _with_dependencies(requirements: list[str]) -> set[str]:
    """The distributions the requirements name and everything they install (their own extras left out)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in importlib.metadata.requires(req.name) or []]
        except importlib.metadata.PackageNotFoundError:
            pass  # not installed here: its own dependencies are unknown, itself is declared
    return seen


def test_top_level_imports_are_installed_with_the_package() -> None:
    """A package imported at a module's top but missing from setup.cfg breaks `pip install slackdist`
    on a clean machine while passing wherever it happens to be installed (datasets once did)."""
    required, extras = _declared()
    base = _with_dependencies(required)
    provider = importlib.metadata.packages_distributions()
    missing = set()
    for module in MODULES:
        allowed = (
            base | _with_dependencies(extras[EXTRA_MODULES[module]]) if module in EXTRA_MODULES else base
        )
        for name, in_function in _imports(module):
            root = name.split(".")[0]
            if in_function or root == "slackdist" or root in sys.stdlib_module_names:
                continue
            if not {_canonical(d) for d in provider.get(root, [root])} & allowed:
                missing.add(f"{module} imports {root}")
    assert {"torch", "transformers", "huggingface-hub"} <= base  # the walk reads real metadata
    assert not missing, f"not installed by setup.cfg: {sorted(missing)}"
