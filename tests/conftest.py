"""Shared pytest fixtures."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from script_helpers import load_script


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts a background job (`cmd &`) with SIGINT ignored, and children inherit that: the tests
    # that press Ctrl-C on a real `slackdist` process would see nothing. Children of a process with a
    # Python handler get the default disposition, which is what a terminal gives them.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def datasets_cache(tmp_path_factory: pytest.TempPathFactory):
    """`datasets` converts data files and caches tokenized splits (`slackdist.data.examples`) in its cache:
    one per test session (child processes too), not the user's ~/.cache, which would grow with every run."""
    from datasets import config

    cache = tmp_path_factory.mktemp("hf_datasets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        mp.setattr(config, "HF_DATASETS_CACHE", cache)
        mp.setattr(config, "DOWNLOADED_DATASETS_PATH", cache / config.DOWNLOADED_DATASETS_DIR)
        mp.setattr(config, "EXTRACTED_DATASETS_PATH", cache / config.DOWNLOADED_DATASETS_DIR / "extracted")
        yield cache


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread when other tests share the CPU cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama 3 model + tokenizer (fp32, tied, GQA), written once per session. Read-only."""
    from slackdist.model.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


# ---- Slack export fixtures (ingest) -------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE_EXPORT = FIXTURES / "sample_export"
PUBLIC_EXPORTS_TARBALL = (
    Path(__file__).resolve().parents[2] / "shared" / "slack_exports" / "public_exports.tar.xz"
)


def zip_folder(folder: Path, zip_path: Path, *, top: str | None = None) -> Path:
    """Zip an export folder (its content at the zip root, or under one `top` folder)."""
    import zipfile

    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                rel = path.relative_to(folder).as_posix()
                zf.write(path, f"{top}/{rel}" if top else rel)
    return zip_path


@pytest.fixture(scope="session")
def sample_export_dir() -> Path:
    """The synthetic export folder shipped in tests/fixtures (read-only: copy it before changing it)."""
    return SAMPLE_EXPORT


@pytest.fixture
def sample_export_zip(tmp_path: Path) -> Path:
    """The sample export as a .zip with its content at the zip root."""
    return zip_folder(SAMPLE_EXPORT, tmp_path / "sample_export.zip")


@pytest.fixture
def sample_export_zip_nested(tmp_path: Path) -> Path:
    """The sample export as a .zip whose content sits under one top folder (as some exporters write it)."""
    return zip_folder(
        SAMPLE_EXPORT, tmp_path / "sample_export_nested.zip", top="Sample Workspace Slack export"
    )


@pytest.fixture(scope="session")
def sample_secrets():
    """tests/fixtures/sample_secrets.py as a module: PLANTED_SECRETS, PLANTED_EMAILS, PLANTED_PHONES, ..."""
    return load_script(FIXTURES / "sample_secrets.py")


@pytest.fixture(scope="session")
def public_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two real public exports (../shared/slack_exports), unpacked once per session: name -> folder."""
    import tarfile

    if not PUBLIC_EXPORTS_TARBALL.is_file():
        pytest.skip(f"real exports not available: {PUBLIC_EXPORTS_TARBALL} is absent")
    out = tmp_path_factory.mktemp("public_exports")
    with tarfile.open(PUBLIC_EXPORTS_TARBALL) as tar:
        tar.extractall(out, filter="data")
    return {p.name: p for p in sorted(out.iterdir()) if p.is_dir()}
