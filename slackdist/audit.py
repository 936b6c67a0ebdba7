"""`slackdist audit --model-dir OUT [--data DIR]`: did the model memorise the canaries `prepare` planted?

Two measurements per canary (``slackdist/data/canaries.py`` plants them and lists them in
``DIR/canaries.json``), both asked of the conversation as training rendered it (``encode_chat``, the
model's chat template), with the canary's turn cut right before its secret:

- **Exposure** (Carlini et al., "The Secret Sharer", USENIX Security 2019): the true secret and R - 1
  random secrets of the same format are scored by the model's log-likelihood given the turns before
  and the text before the secret; the true one's rank among the R gives
  ``exposure = log2(R) - log2(rank)``, between 0 and log2(R) bits. Rank 1 of 1,000 is 9.97 bits; a model
  that never saw the canary ranks it uniformly, for a mean of ``log2(R) - log2(R!)/R`` bits (about
  1.44, :func:`chance_exposure`).
- **Extraction**: greedy decoding from the same place; the canary is extracted when the secret comes
  out verbatim (``extracted_chars`` counts the characters it gets right before the first wrong one).

Per group (``planted`` after redaction, ``redacted`` before it) the exposures are combined with
Fisher's method: under "the model knows nothing of the secret" each ``rank / R`` is uniform, and
``-2 ln(rank / R) = 2 ln(2) x exposure``, so ``2 ln(2) x (sum of exposures)`` follows a chi-squared law
with 2N degrees of freedom (:func:`fisher_p`; conservative for ranks, which are discrete). The verdict
says "memorised" when a canary comes out verbatim or the exposures are above chance at p <= 0.01
(one canary ranked first of 100 is p = 0.01).

The scores reuse one forward pass of the shared prefix (its KV cache) for every candidate, so a
candidate costs only its own tokens. The figures go to ``audit.json`` and ``audit.md`` in the folder
``--out`` (default: MODEL_DIR/audit), written whole and renamed into place (`slackdist.files.staged_dir`);
they hold no secret and no conversation text, so they can travel with the model.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slackdist.chat import load_model
from slackdist.config import Config
from slackdist.data.canaries import FORMATS, TRAIN_FILE, Canary, read_canaries
from slackdist.errors import SlackdistError, first_line
from slackdist.eval import data_for
from slackdist.files import check_output_dir, staged_dir
from slackdist.model.load import InferenceModel, merge_in_memory
from slackdist.model.template import encode_chat, stop_token_ids

AUDIT_DIR = "audit"
"""The default `--out`: MODEL_DIR/audit."""
AUDIT_FILE = "audit.json"
AUDIT_MD = "audit.md"
OUTPUT_FILES = (AUDIT_FILE, AUDIT_MD)
ALPHA = 0.01
"""Exposure above chance at p <= ALPHA (or one canary extracted) makes the verdict "memorised"."""
EXTRA_TOKENS = 8
"""Greedy decoding runs this many tokens past the secret's length (another tokenization of it may be longer)."""


# ---------------------------------------------------------------- exposure


def rank_of(true_score: float, other_scores: Sequence[float]) -> int:
    """1 + how many candidates score higher than the true secret (ties count for the canary)."""
    return 1 + sum(score > true_score for score in other_scores)


def exposure(rank: int, candidates: int) -> float:
    """``log2(candidates) - log2(rank)``: 0 for the last rank, log2(candidates) for the first.

    Raises:
        ValueError: a rank outside [1, candidates].
    """
    if not 1 <= rank <= candidates:
        raise ValueError(f"rank {rank} is outside [1, {candidates}]")
    return math.log2(candidates) - math.log2(rank)


def chance_exposure(candidates: int) -> float:
    """Mean exposure when the rank is uniform over 1..candidates: ``log2(R) - log2(R!) / R``."""
    return math.log2(candidates) - math.lgamma(candidates + 1) / math.log(2) / candidates


def fisher_p(exposures: Sequence[float]) -> float:
    """P-value of "every rank is uniform" for these exposures (Fisher's method; 1.0 for none).

    ``sum(-2 ln(rank/R)) = 2 ln(2) x sum(exposures)`` follows chi-squared with 2N degrees of freedom,
    whose tail has a closed form for an even number of degrees: ``exp(-x) * sum(x^k / k!, k < N)``
    with ``x = ln(2) x sum(exposures)``.
    """
    n = len(exposures)
    if n == 0:
        return 1.0
    x = math.log(2) * sum(exposures)
    term, total = 1.0, 1.0
    for k in range(1, n):
        term *= x / k
        total += term
    return min(1.0, math.exp(-x) * total)


# ---------------------------------------------------------------- one canary


@dataclass(frozen=True)
class Probe:
    """A training record with the canary's turn ending in a chosen candidate instead of its secret.

    Attributes:
        messages: the record's messages, as training read them.
        index: the message that holds the canary.
        prompt_text: that message's content up to the secret.
    """

    messages: list[dict[str, str]]
    index: int
    prompt_text: str

    def ids(self, tokenizer: Any, candidate: str) -> list[int]:
        """Token ids of the whole record (as training encodes it) with ``candidate`` as the secret."""
        messages = list(self.messages)
        messages[self.index] = {"role": messages[self.index]["role"], "content": self.prompt_text + candidate}
        return encode_chat(tokenizer, messages)[0]


@dataclass
class Scored:
    """Candidates' log-likelihoods and where the true one (the first candidate) sits in the ids.

    Attributes:
        scores: each candidate's summed log-probability of its tokens after the shared prefix.
        prefix: the ids every candidate shares (the conversation up to the secret).
        target: the true secret's tokens after the prefix (the shared prefix's last characters may be in
            its first token).
        first_logprobs: log-probabilities of the token after the prefix.
        cache: the prefix's KV cache.
    """

    scores: list[float]
    prefix: list[int]
    target: list[int]
    first_logprobs: torch.Tensor
    cache: Any


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def cache_keyword(model: Any) -> str:
    """The forward argument (and output field) of the KV cache: ``cache`` in newer transformers 5.x,
    ``past_key_values`` before (which newer versions still take, with a deprecation warning)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.inference_mode()
def score_candidates(
    model: Any, tokenizer: Any, probe: Probe, candidates: Sequence[str], *, batch_size: int = 32
) -> Scored:
    """Log-likelihood of each candidate secret in the probe's place (candidates[0] is the true one).

    Every candidate's record is encoded whole, as training encodes it; the tokens all of them share
    (the conversation up to the secret) run through the model once, and each candidate's own tokens
    (up to the end of the secret; the template's end-of-turn and later turns are not scored) run in
    batches on copies of that KV cache. Comparing these sums compares the probability of the whole
    text up to the end of each secret, since the shared part contributes the same to every candidate.

    Raises:
        ValueError: fewer than two candidates, or candidates whose tokens differ in nothing.
    """
    if len(candidates) < 2:
        raise ValueError("need the true secret and at least one other candidate")
    ids = [probe.ids(tokenizer, c) for c in candidates]
    # The template's tokens after the turn's content: what two contents ending differently share.
    tail = _common_suffix(probe.ids(tokenizer, "a"), probe.ids(tokenizer, "b"))
    ends = [len(x) - tail for x in ids]
    start = _common_prefix(ids)
    if start == 0 or any(end <= start for end in ends):
        raise ValueError("the candidates' tokens do not differ after a shared prefix")
    device = next(model.parameters()).device
    key = cache_keyword(model)
    out = model(input_ids=torch.tensor([ids[0][:start]], device=device), use_cache=True)
    cache = getattr(out, key)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores: list[float] = []
    for b in range(0, len(ids), batch_size):
        rows = [
            x[start:end] for x, end in zip(ids[b : b + batch_size], ends[b : b + batch_size], strict=True)
        ]
        scores += _score_rows(model, key, cache, first, rows, device)
    return Scored(scores, ids[0][:start], ids[0][start : ends[0]], first, cache)


def _score_rows(
    model: Any, key: str, cache: Any, first: torch.Tensor, rows: list[list[int]], device: torch.device
) -> list[float]:
    """Summed log-probabilities of token rows that all continue the cached prefix (right-padded, so no
    real token attends to padding)."""
    scores = first[torch.tensor([row[0] for row in rows], device=device)].tolist()
    width = max(len(row) for row in rows) - 1
    if width == 0:
        return scores
    inputs = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    targets = torch.full((len(rows), width), -100, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        inputs[i, : len(row) - 1] = torch.tensor(row[:-1])
        targets[i, : len(row) - 1] = torch.tensor(row[1:])
    batch_cache = copy.deepcopy(cache)
    batch_cache.batch_repeat_interleave(len(rows))
    logits = model(input_ids=inputs, **{key: batch_cache}, use_cache=True).logits.float()
    # log p(target) = its logit - logsumexp(logits). Not F.cross_entropy: on CPU, over a (B, V, T) view, its
    # float32 sum was off by ~2e-4 nats a token on SmolLM2 (49k vocab), logsumexp by ~1e-7.
    real = targets != -100
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(real, picked - torch.logsumexp(logits, dim=-1), 0.0)
    return [s + float(lp) for s, lp in zip(scores, logp.double().sum(dim=1).tolist(), strict=True)]


@torch.inference_mode()
def greedy_continuation(
    model: Any, scored: Scored, max_new_tokens: int, stop_ids: Sequence[int]
) -> list[int]:
    """Greedy decoding from the shared prefix (its cached keys and values), until a stop token."""
    device = next(model.parameters()).device
    key = cache_keyword(model)
    cache = copy.deepcopy(scored.cache)
    token = int(scored.first_logprobs.argmax())
    out = [token]
    while len(out) < max_new_tokens and token not in stop_ids:
        logits = model(input_ids=torch.tensor([[token]], device=device), **{key: cache}, use_cache=True)
        token = int(logits.logits[0, -1].argmax())
        out.append(token)
    return out


def _matched_chars(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass
class CanaryResult:
    """What the audit found for one canary (no secret, no text: audit.json travels with the model)."""

    id: str
    group: str
    kind: str
    format: str
    role: str
    candidates: int
    rank: int
    exposure: float
    extracted: bool
    extracted_chars: int
    secret_chars: int
    prefix_tokens: int
    in_data: bool
    """The secret is in the training record (False for a redacted secret the redactor removed)."""
    in_training: bool
    """The record fits the model's train.max_seq_len (training leaves longer ones out)."""


def draw_candidates(canary: Canary, n: int, seed: int) -> list[str]:
    """The true secret first, then up to n - 1 distinct random secrets of its format (fewer when the
    format has fewer), drawn from a seed of their own for each canary."""
    fmt = FORMATS[canary.format]
    rng = random.Random(f"slackdist-audit-{seed}-{canary.id}")
    others: dict[str, None] = {}
    want = min(n, fmt.space) - 1
    while len(others) < want:
        secret = fmt.draw(rng)
        if secret != canary.secret:
            others[secret] = None
    return [canary.secret, *others]


def audit_canary(
    im: InferenceModel, record: dict[str, Any], canary: Canary, *, candidates: int, seed: int, batch_size: int
) -> CanaryResult:
    """Exposure and greedy extraction of one canary in its training record.

    Raises:
        SlackdistError: the tokenizer does not render the secret at the end of the scored tokens.
    """
    tokenizer = im.tokenizer
    probe = Probe(record["messages"], canary.message_index, canary.prompt_text)
    pool = draw_candidates(canary, candidates, seed)
    scored = score_candidates(im.model, tokenizer, probe, pool, batch_size=batch_size)
    rank = rank_of(scored.scores[0], scored.scores[1:])
    target = tokenizer.decode(scored.target, skip_special_tokens=False)
    if not target.endswith(canary.secret):
        raise SlackdistError(f"{canary.id}: the scored tokens decode to {target!r}, not ending in the secret")
    glue = len(target) - len(canary.secret)  # the prefix's characters in the secret's first token
    generated = greedy_continuation(
        im.model, scored, len(scored.target) + EXTRA_TOKENS, stop_token_ids(tokenizer)
    )
    text = tokenizer.decode(generated, skip_special_tokens=False)
    matched = max(0, _matched_chars(text, target) - glue)
    full = encode_chat(tokenizer, record["messages"])[0]
    return CanaryResult(
        id=canary.id,
        group=canary.group,
        kind=canary.kind,
        format=canary.format,
        role=canary.role,
        candidates=len(pool),
        rank=rank,
        exposure=exposure(rank, len(pool)),
        extracted=matched == len(canary.secret),
        extracted_chars=matched,
        secret_chars=len(canary.secret),
        prefix_tokens=len(scored.prefix),
        in_data=canary.in_data,
        in_training=im.max_seq_len is None or len(full) <= im.max_seq_len,
    )


# ---------------------------------------------------------------- verdicts


@dataclass
class GroupSummary:
    """One group of canaries (``planted``, ``redacted``, or one role of either) in aggregate."""

    name: str
    canaries: int
    mean_exposure: float
    max_exposure: float
    chance_exposure: float
    """The mean exposure expected of a model that never saw the canaries."""
    p_value: float
    extracted: int
    status: str
    """``extracted`` (a secret comes out verbatim), ``exposed`` (above chance at p <= ALPHA) or ``chance``."""
    verdict: str


def summarise(name: str, results: Sequence[CanaryResult]) -> GroupSummary:
    """Aggregate figures and the verdict of a group (``redacted`` in the name words it for redaction)."""
    exposures = [r.exposure for r in results]
    mean = sum(exposures) / len(exposures)
    chance = sum(chance_exposure(r.candidates) for r in results) / len(results)
    p = fisher_p(exposures)
    extracted = sum(r.extracted for r in results)
    status = "extracted" if extracted else ("exposed" if p <= ALPHA else "chance")
    figures = f"mean exposure {mean:.2f} bits, {chance:.2f} expected by chance, p = {p:.2g}"
    redacted = name.startswith("redacted")
    if status == "extracted":
        what = "redacted secrets leak" if redacted else "memorised"
        verdict = f"{what}: {extracted} of {len(results)} come out verbatim under greedy decoding ({figures})"
    elif status == "exposed":
        what = "redacted secrets leak" if redacted else "memorised"
        verdict = f"{what}: none comes out verbatim, but exposure is above chance ({figures})"
    elif redacted:
        verdict = f"redaction held: no redacted secret extractable and exposure at chance ({figures})"
    else:
        verdict = f"no canary extractable and mean exposure near chance ({figures})"
    return GroupSummary(name, len(results), mean, max(exposures), chance, p, extracted, status, verdict)


def summaries(results: Sequence[CanaryResult]) -> list[GroupSummary]:
    """One summary per group, and per role within a group that has canaries in both roles."""
    out = []
    for group in ("planted", "redacted"):
        members = [r for r in results if r.group == group]
        if not members:
            continue
        out.append(summarise(group, members))
        roles = sorted({r.role for r in members})
        if len(roles) > 1:
            out += [
                summarise(f"{group} ({role} turns)", [r for r in members if r.role == role]) for role in roles
            ]
    return out


# ---------------------------------------------------------------- the command


def _jsonl(path: Path) -> Iterator[Any]:
    """The lines of a JSONL file, parsed (blank lines skipped).

    Raises:
        SlackdistError: the file is missing or a line is not JSON (one line naming the file and line).
    """
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except ValueError as e:
                    raise SlackdistError(f"{path}:{n}: not a JSON line ({first_line(e)})") from None
    except OSError as e:
        raise SlackdistError(f"{path}: cannot read it ({first_line(e)})") from None


def canary_records(data_dir: Path, canaries: Sequence[Canary]) -> dict[str, dict[str, Any]]:
    """Each canary's record in DATA/train.jsonl, checked against canaries.json.

    Raises:
        SlackdistError: a record is missing or no longer holds its canary (the data changed since).
    """
    path = data_dir / TRAIN_FILE
    wanted = {c.record_id for c in canaries}
    records = {}
    for r in _jsonl(path):
        meta = r.get("meta") if isinstance(r, dict) else None
        if isinstance(meta, dict) and meta.get("conversation_id") in wanted:
            records[meta["conversation_id"]] = r
    again = "the data changed since the canaries were planted: prepare it again with --canaries"
    for c in canaries:
        record = records.get(c.record_id)
        if record is None:
            raise SlackdistError(f"{path}: no record {c.record_id} for {c.id}; {again}")
        messages = record["messages"]
        message = messages[c.message_index] if c.message_index < len(messages) else {}
        content = message.get("content", "")
        holds = (
            content == c.prompt_text + c.secret
            if c.group == "planted"
            else (c.secret in content) == c.in_data
        )
        if message.get("role") != c.role or not holds:
            raise SlackdistError(f"{path}: record {c.record_id} does not hold {c.id} as listed; {again}")
    return records


def audit(
    im: InferenceModel, data_dir: Path, *, candidates: int = 1000, seed: int = 0, batch_size: int = 32
) -> dict[str, Any]:
    """Exposure and extraction of every canary in DATA/canaries.json; the audit.json content.

    Raises:
        SlackdistError: no or a bad canaries.json, or records that no longer match it.
    """
    if candidates < 2:
        raise SlackdistError(f"--candidates {candidates}: need at least 2 (the secret and one other)")
    canaries = read_canaries(data_dir)
    if not canaries:
        raise SlackdistError(f"{data_dir}: canaries.json lists no canary")
    records = canary_records(data_dir, canaries)
    results = [
        audit_canary(im, records[c.record_id], c, candidates=candidates, seed=seed, batch_size=batch_size)
        for c in tqdm(canaries, desc="canaries", unit="canary", file=sys.stderr)
    ]
    groups = summaries(results)
    top = [g for g in groups if g.name in ("planted", "redacted")]
    return {
        "data": str(data_dir),
        "candidates": candidates,
        "seed": seed,
        "alpha": ALPHA,
        "verdict": "; ".join(g.verdict for g in top),
        "groups": [asdict(g) for g in groups],
        "canaries": [asdict(r) for r in results],
    }


def render_table(result: dict[str, Any]) -> str:
    """The per-canary table, the per-group table and the verdict, as Markdown."""
    lines = [
        "| canary | group | kind | format | turn | rank / R | exposure (bits) | greedy: chars right |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["canaries"]:
        notes = "" if r["in_training"] else " (record over max_seq_len: not trained on)"
        got = f"{r['extracted_chars']}/{r['secret_chars']}" + (" **extracted**" if r["extracted"] else "")
        lines.append(
            f"| {r['id']} | {r['group']} | {r['kind']} | {r['format']} | {r['role']}{notes} | "
            f"{r['rank']} / {r['candidates']} | {r['exposure']:.2f} | {got} |"
        )
    lines += [
        "",
        "| group | canaries | mean exposure | max | chance | p | extracted | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in result["groups"]:
        lines.append(
            f"| {g['name']} | {g['canaries']} | {g['mean_exposure']:.2f} | {g['max_exposure']:.2f} | "
            f"{g['chance_exposure']:.2f} | {g['p_value']:.2g} | {g['extracted']} | {g['status']} |"
        )
    return "\n".join(lines + ["", f"verdict: {result['verdict']}"]) + "\n"


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist audit --model-dir OUT [--data DIR] [--candidates R] [--candidate-seed S] [--out DIR]`.

    Raises:
        SlackdistError: bad model folder, data or canaries file, or an ``--out`` that is not an audit
            folder (without ``--overwrite``).
    """
    out = Path(args.out) if args.out else Path(cfg.chat.model_dir) / AUDIT_DIR
    check_output_dir(
        out,
        markers=OUTPUT_FILES,
        what="an audit folder",
        overwrite=args.overwrite,
        inputs=[cfg.chat.model_dir, args.data],
    )
    if args.data:
        read_canaries(Path(args.data))  # a missing or bad answer key: one line, before the model loads
    im = load_model(cfg)
    data_dir = Path(data_for(im, args.data, cfg.chat.model_dir))  # a prepared folder, with its canaries.json
    im = merge_in_memory(im)
    result = audit(
        im, data_dir, candidates=args.candidates, seed=args.candidate_seed, batch_size=args.batch_size
    )
    result["model_dir"] = cfg.chat.model_dir
    table = render_table(result)
    with staged_dir(out) as tmp:
        (tmp / AUDIT_FILE).write_text(
            json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        (tmp / AUDIT_MD).write_text(table, encoding="utf-8")
    print(table)
    print(f"wrote {out / AUDIT_FILE} and {AUDIT_MD}")
    return 0
