"""Provenance and erasure: `prepare` records whose messages each record holds, `train` and `merge`
carry it, and `slackdist forget USER --data DIR --models ROOT` rewrites DIR without them and lists
every model folder trained on them, with the command that retrains it.

End to end on the sample export and the tiny model (CPU): prepare -> train -> merge -> forget ->
run the printed retrain command -> the new data and the new adapter's provenance hold no trace of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slackdist.cli import main as cli_main
from slackdist.config import DataConfig
from slackdist.data.prepare import prepare
from slackdist.data.provenance import PROVENANCE_FILE, iter_entries, read_export
from slackdist.errors import SlackdistError
from slackdist.forget import forget
from slackdist.train.merge import merge_adapter

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "fixtures" / "sample_export"
GRACE = "U0GRACE01"
GRACE_FORMS = ("U0GRACE01", "grace", "Grace Hopper", "Hopper")
# Grace's own words in the sample export (tests/fixtures/sample_export), none of them quoted by others.
GRACE_TEXTS = ("I do, fixing it today", "Replying to a message that was deleted", "Anyone up for coffee?",
               "Architecture diagram attached", "Yes, if the tests pass", "waves goodbye")  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def output_text(folder: Path) -> str:
    return "\n".join(
        p.read_text(encoding="utf-8") for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".png"
    )


def traces(text: str) -> list[str]:
    found = [f for f in GRACE_FORMS if re.search(rf"(?<!\w){re.escape(f)}(?!\w)", text, re.IGNORECASE)]
    return found + [t for t in GRACE_TEXTS if t in text]


def holders(data: Path) -> tuple[int, int]:
    entries = list(iter_entries(data / PROVENANCE_FILE))
    return sum(GRACE in e["users"] for e in entries), sum(GRACE in e["mentions"] for e in entries)


def train(model: Path, data: Path, out: Path) -> None:
    args = ["train", "--data", str(data), "--output", str(out), "--model", str(model), "--no-load-in-4bit",
            "--max-steps", "2", "--max-seq-len", "256", "--eval-every-n-steps", "0", "--save-every-n-steps", "1",
            "--lora-r", "4", "--micro-batch-size", "1", "--gradient-accumulation-steps", "1"]  # fmt: skip
    assert cli_main(args) == 0


@pytest.mark.slow
def test_forget_rewrites_the_data_lists_the_models_and_retraining_leaves_no_trace(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = shutil.copytree(SAMPLE, tmp_path / "export")
    data, models = tmp_path / "data", tmp_path / "models"
    prepare(export, data, DataConfig(workers=1))
    assert holders(data)[0] > 0 and set(traces(output_text(data))) >= set(
        GRACE_TEXTS
    )  # she is there to begin with
    train(tiny_model_dir, data, models / "run1")
    merge_adapter(models / "run1", models / "merged", dtype="fp32")
    # the provenance travels: OUT (from the first checkpoint on) and the merged folder, byte for byte
    for folder in (models / "run1", models / "merged"):
        assert (folder / PROVENANCE_FILE).read_bytes() == (data / PROVENANCE_FILE).read_bytes()
    assert not (models / "run1" / "checkpoints" / "step-000001" / PROVENANCE_FILE).exists()  # OUT's covers it

    capsys.readouterr()
    assert cli_main(["forget", "Grace Hopper", "--data", str(data), "--models", str(models)]) == 0
    printed = capsys.readouterr().out
    # The data: rewritten without her, from the export, under the same config.
    assert holders(data) == (0, 0)
    assert traces(output_text(data)) == []
    assert read_export(data / PROVENANCE_FILE).id == read_export(models / "run1" / PROVENANCE_FILE).id
    report = json.loads((data / "report.json").read_text())
    assert report["dropped"]["excluded_user"] > 0 and report["config"]["exclude_users"][0].startswith(
        "sha256:"
    )
    # The models trained on her: both listed, with the commands that rebuild them.
    run1, merged = models / "run1", models / "merged"
    assert f"{run1}  (training output:" in printed and f"{merged}  (merged model:" in printed
    assert f"slackdist merge --adapter {run1} --output {merged}" in printed
    (retrain,) = [line.strip() for line in printed.splitlines() if "slackdist train" in line]
    assert retrain == (
        f"mv {run1} {run1}.forgotten && slackdist train --config {run1}.forgotten/slackdist_config.yaml "
        f"--data {data} --output {run1} --set train.resume=null && rm -rf {run1}.forgotten"
    )
    # Retrain exactly as printed: the new adapter's provenance holds no trace of her.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run(
        retrain, shell=True, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run1 / "adapter_model.safetensors").is_file() and not Path(f"{run1}.forgotten").exists()
    assert holders(run1) == (0, 0) and traces((run1 / PROVENANCE_FILE).read_text()) == []
    # What she wrote is in none of the new records (their message ids) either.
    theirs = {
        tuple(m[:2]) for e in iter_entries(merged / PROVENANCE_FILE) for m in e["messages"] if m[2] == GRACE
    }
    assert theirs and not theirs & {
        tuple(m[:2]) for e in iter_entries(run1 / PROVENANCE_FILE) for m in e["messages"]
    }
    # Only the merged model is left holding her now.
    capsys.readouterr()
    assert cli_main(["forget", "grace", "--data", str(data), "--models", str(models)]) == 0
    printed = capsys.readouterr().out
    assert "0 records held their messages and 0 mentioned them" in printed
    assert str(merged) in printed and f"{run1}  (" not in printed


def test_forget_refuses_another_export_an_unknown_person_and_the_only_persona(tmp_path: Path) -> None:
    export = shutil.copytree(SAMPLE, tmp_path / "export")
    data = tmp_path / "data"
    prepare(export, data, DataConfig(workers=1))
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    with pytest.raises(SlackdistError, match=r"nobody in users.json .*closest: Grace Hopper"):
        forget("Grace Hoper", data)
    (export / "users.json").write_text(json.dumps(json.loads((export / "users.json").read_text())[:-1]))
    with pytest.raises(SlackdistError, match="not the export .* was prepared from"):
        forget("Grace Hopper", data)
    with pytest.raises(SlackdistError, match="not there; pass --export"):
        forget("Grace Hopper", data, export=tmp_path / "moved")
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # nothing changed
    persona = tmp_path / "persona"
    prepare(SAMPLE, persona, DataConfig(persona="Grace Hopper", workers=1))
    with pytest.raises(SlackdistError, match="leaves no persona"):
        forget("grace", persona)
    # with two personas, the other one stays
    two = tmp_path / "two"
    prepare(SAMPLE, two, DataConfig(persona="Grace Hopper, Ada Lovelace", workers=1))
    forget("grace", two)
    assert json.loads((two / "report.json").read_text())["config"]["persona"] == "Ada Lovelace"
    assert "Grace" not in output_text(two)
