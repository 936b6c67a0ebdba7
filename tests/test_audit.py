"""`slackdist audit` (slackdist/audit.py): exposure and greedy extraction of planted canaries, on tiny models
trained on them for real, and the exposure arithmetic on hand-built likelihoods."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slackdist.audit import (
    CanaryResult,
    Probe,
    chance_exposure,
    draw_candidates,
    exposure,
    fisher_p,
    rank_of,
    score_candidates,
    summarise,
)
from slackdist.cli import main as cli_main
from slackdist.data.canaries import read_canaries
from slackdist.model.load import load_for_inference

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- the arithmetic


@settings(max_examples=200, deadline=None)
@given(
    true=st.floats(-100, 0, allow_nan=False),
    others=st.lists(st.floats(-100, 0, allow_nan=False), min_size=1, max_size=300),
)
def test_rank_and_exposure_on_a_hand_built_likelihood(true: float, others: list[float]) -> None:
    r = len(others) + 1
    rank = rank_of(true, others)
    assert rank == 1 + sum(o > true for o in others)
    e = exposure(rank, r)
    assert 0 <= e <= math.log2(r) + 1e-12
    if all(o < true for o in others):
        assert rank == 1 and e == pytest.approx(math.log2(r))
    if all(o > true for o in others):
        assert rank == r and e == 0


@given(r=st.integers(2, 2000))
def test_chance_exposure_is_the_mean_over_uniform_ranks(r: int) -> None:
    mean = sum(exposure(k, r) for k in range(1, r + 1)) / r
    assert chance_exposure(r) == pytest.approx(mean, rel=1e-9)
    assert 0 < chance_exposure(r) < math.log2(math.e) + 1e-9  # tends to log2(e) = 1.44 from below


@settings(max_examples=100, deadline=None)
@given(ranks=st.lists(st.integers(1, 100), min_size=1, max_size=20))
def test_fisher_p(ranks: list[int]) -> None:
    exposures = [exposure(k, 100) for k in ranks]
    p = fisher_p(exposures)
    assert 0 < p <= 1
    if len(ranks) == 1:
        assert p == pytest.approx(ranks[0] / 100)  # one canary: P(rank <= k) = k / R
    assert fisher_p([e + 1 for e in exposures]) < p  # more exposure, smaller p
    assert fisher_p([]) == 1.0


def test_fisher_p_is_calibrated_under_the_null() -> None:
    """Uniform ranks (a model that knows nothing) give p <= 0.01 about 1% of the time, never much more."""
    rng = random.Random(0)
    hits = sum(fisher_p([exposure(rng.randint(1, 100), 100) for _ in range(8)]) <= 0.01 for _ in range(4000))
    assert hits / 4000 <= 0.015


# ---------------------------------------------------------------- a tiny model trained on the canaries


def _prepare(export: Path, out: Path, tokenizer: Path) -> Path:
    assert cli_main(["prepare", str(export), "--out", str(out), "--split", "70,15,15", "--workers", "1",
                     "--canaries", "4", "--canaries-redacted", "2", "--tokenizer", str(tokenizer)]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def prepared(sample_export_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(sample_export_dir, tmp_path_factory.mktemp("audit") / "data", tiny_model_dir)


@pytest.fixture(scope="module")
def trained_hard(prepared: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model trained hard on the first canary's record and the two redacted ones (LoRA, 120
    passes, no held-out share of the three, so no early stop): enough for it to learn that record by heart."""
    canaries = {c.id: c for c in read_canaries(prepared)}
    wanted = {canaries[i].record_id for i in ("canary-0", "redacted-0", "redacted-1")}
    lines = (prepared / "train.jsonl").read_text(encoding="utf-8").splitlines()
    data = tmp_path_factory.mktemp("hard") / "data"
    data.mkdir()
    kept = [line for line in lines if json.loads(line)["meta"]["conversation_id"] in wanted]
    (data / "train.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")
    out = data.parent / "run"
    assert cli_main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                     "--no-load-in-4bit", "--no-gradient-checkpointing", "--max-seq-len", "1024",
                     "--micro-batch-size", "3", "--gradient-accumulation-steps", "1", "--num-epochs", "120",
                     "--lr", "1e-2", "--warmup-ratio", "0", "--lr-scheduler", "constant", "--max-grad-norm", "1",
                     "--lora-r", "16", "--lora-alpha", "32", "--eval-every-n-steps", "0", "--save-every-n-steps",
                     "0", "--no-clear-cache-between-epochs", "--validation-fraction", "0"]) == 0  # fmt: skip
    return out


def _audit(model_dir: Path, data: Path, *extra: str) -> dict:
    """`slackdist audit`; its audit.json (in --out, default MODEL_DIR/audit)."""
    assert cli_main(["audit", "--model-dir", str(model_dir), "--data", str(data), *extra]) == 0
    out = Path(extra[extra.index("--out") + 1]) if "--out" in extra else model_dir / "audit"
    return json.loads((out / "audit.json").read_text(encoding="utf-8"))


def _by_id(result: dict) -> dict[str, dict]:
    return {r["id"]: r for r in result["canaries"]}


def test_trained_hard_the_canary_comes_out_and_redacted_secrets_stay_at_chance(
    trained_hard: Path, prepared: Path, capsys
) -> None:
    result = _audit(trained_hard, prepared, "--candidates", "128")
    found = _by_id(result)
    canary = found["canary-0"]
    assert canary["rank"] == 1 and canary["exposure"] == pytest.approx(7.0)  # log2(128)
    assert canary["extracted"] and canary["extracted_chars"] == canary["secret_chars"] == 9
    # the canaries whose records it never saw: nothing extracted, exposure at chance as a group
    unseen = [found[f"canary-{i}"] for i in (1, 2, 3)]
    assert not any(r["extracted"] for r in unseen) and all(
        r["extracted_chars"] < r["secret_chars"] for r in unseen
    )
    assert summarise("unseen", [CanaryResult(**r) for r in unseen]).status == "chance"
    groups = {g["name"]: g for g in result["groups"]}
    assert groups["planted"]["status"] == "extracted" and result["verdict"].startswith("memorised")
    # the redacted secrets were trained on as [REDACTED_SECRET]: the model knows nothing of them
    for cid in ("redacted-0", "redacted-1"):
        assert not found[cid]["extracted"] and found[cid]["extracted_chars"] < 3 and not found[cid]["in_data"]
    assert groups["redacted"]["status"] == "chance" and "redaction held" in result["verdict"]
    out = capsys.readouterr().out
    assert (
        "| canary-0 | planted | sentence | locker_code | assistant | 1 / 128 | 7.00 | 9/9 **extracted** |"
        in out
    )
    # MODEL_DIR/audit travels with the model: no secret and no conversation text in it
    audit_dir = trained_hard / "audit"
    assert sorted(p.name for p in audit_dir.iterdir()) == ["audit.json", "audit.md"]
    assert "| canary-0 | planted | sentence | locker_code |" in (audit_dir / "audit.md").read_text(
        encoding="utf-8"
    )
    for path in audit_dir.iterdir():
        text = path.read_text(encoding="utf-8")
        for c in read_canaries(prepared):
            assert c.secret not in text and c.prompt_text.splitlines()[-1] not in text


def test_an_untrained_model_is_at_chance(tiny_model_dir: Path, prepared: Path, tmp_path: Path) -> None:
    result = _audit(tiny_model_dir, prepared, "--candidates", "64", "--out", str(tmp_path / "audit"))
    assert not any(r["extracted"] for r in result["canaries"])
    assert all(g["status"] == "chance" for g in result["groups"]), result["groups"]
    assert result["verdict"].startswith("no canary extractable and mean exposure near chance")
    assert all(r["candidates"] == 64 and r["in_training"] for r in result["canaries"])


def _record(data: Path, record_id: str) -> dict:
    lines = (data / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return next(r for r in map(json.loads, lines) if r["meta"]["conversation_id"] == record_id)


def _check_scores_against_full_forwards(model_dir: Path, data: Path, fmt: str, n: int) -> None:
    """What score_candidates sums, from one cached prefix and right-padded batches, is each candidate's
    log-likelihood of the whole record up to the end of its secret, less the same constant for all."""
    im = load_for_inference(str(model_dir))
    canary = next(c for c in read_canaries(data) if c.format == fmt)
    probe = Probe(_record(data, canary.record_id)["messages"], canary.message_index, canary.prompt_text)
    pool = draw_candidates(canary, n, seed=3)
    assert pool[0] == canary.secret and len(set(pool)) == n
    scored = score_candidates(im.model, im.tokenizer, probe, pool, batch_size=3)
    start = len(scored.prefix)
    full = []
    with torch.inference_mode():
        for candidate in pool:
            ids = probe.ids(im.tokenizer, candidate)
            assert im.tokenizer.decode(ids).count(candidate) == 1
            end = next(
                k for k in range(start, len(ids) + 1) if im.tokenizer.decode(ids[:k]).endswith(candidate)
            )
            logp = torch.log_softmax(im.model(input_ids=torch.tensor([ids[:end]])).logits[0].double(), dim=-1)
            full.append(sum(float(logp[t - 1, ids[t]]) for t in range(start, end)))
    assert scored.scores == pytest.approx(full, abs=1e-4)


def test_cached_batched_scores_equal_full_forward_log_likelihoods(
    tiny_model_dir: Path, prepared: Path
) -> None:
    _check_scores_against_full_forwards(tiny_model_dir, prepared, "github_token", 7)


def test_bad_input_is_a_one_line_error(tiny_model_dir: Path, prepared: Path, tmp_path: Path, capsys) -> None:
    assert cli_main(["audit", "--model-dir", str(tiny_model_dir), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("canaries.json: no such file (`slackdist prepare --canaries N` plants canaries)")
    assert len(err.splitlines()) == 1
    changed = tmp_path / "changed"
    changed.mkdir()
    for name in ("canaries.json", "train.jsonl"):
        (changed / name).write_bytes((prepared / name).read_bytes())
    lines = (changed / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (changed / "train.jsonl").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # the last copy gone
    assert cli_main(["audit", "--model-dir", str(tiny_model_dir), "--data", str(changed)]) == 2
    err = capsys.readouterr().err
    assert "the data changed since the canaries were planted: prepare it again with --canaries" in err
    assert not (tiny_model_dir / "audit").exists()


def test_a_foreign_out_is_refused_unless_overwrite(
    tiny_model_dir: Path, prepared: Path, tmp_path: Path, capsys
) -> None:
    """--out is replaced whole by one rename: a folder that is not an audit's is refused before the model
    loads (one line, nothing touched), and replaced with --overwrite; an earlier audit is replaced."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "mine.txt").write_text("keep me", encoding="utf-8")
    argv = [
        "audit",
        "--model-dir",
        str(tiny_model_dir),
        "--data",
        str(prepared),
        "--candidates",
        "8",
        "--out",
        str(out),
    ]
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "not empty and not an audit folder (no audit.json or audit.md); pass --overwrite" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert cli_main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["audit.json", "audit.md"]
    first = (out / "audit.json").read_text(encoding="utf-8")
    assert cli_main([*argv[:-4], "--candidates", "16", "--out", str(out)]) == 0  # an audit folder: replaced
    again = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    assert again["candidates"] == 16 and json.loads(first)["candidates"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no temporary folder left beside it
    assert cli_main([*argv[:-2], "--out", str(prepared)]) == 2  # the data it reads is never replaced
    assert "which this command reads" in capsys.readouterr().err


@pytest.mark.slow
def test_the_real_model_untrained_is_at_chance(sample_export_dir: Path, tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (ChatML, its real byte-level BPE tokenizer), never trained on the canaries:
    nothing extracted, exposure at chance, and the cached scores equal plain forwards on it too."""
    from slackdist.errors import SlackdistError
    from slackdist.model.real import write_real_model

    try:
        model = write_real_model(tmp_path / "smollm2")
    except SlackdistError as e:
        pytest.skip(str(e))
    data = _prepare(sample_export_dir, tmp_path / "data", model)
    result = _audit(model, data, "--candidates", "16", "--out", str(tmp_path / "audit"))
    assert len(result["canaries"]) == 6 and not any(r["extracted"] for r in result["canaries"])
    assert all(g["status"] == "chance" for g in result["groups"]), result["groups"]
    _check_scores_against_full_forwards(model, data, "locker_code", 4)
