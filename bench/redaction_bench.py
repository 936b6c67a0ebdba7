"""Benchmark secret/PII redaction: recall per kind, false positives, throughput.

    python bench/redaction_bench.py                                  # everything, JSON to bench/results/
    python bench/redaction_bench.py --per-kind 40 --out /tmp/r.json --max-library-lines 200000
    python bench/redaction_bench.py --gitleaks DIR --trufflehog DIR --noseyparker DIR   # + scanners' own test cases

Sections (each a table; all of it in the JSON):

1. Recall per kind on a synthetic corpus (``bench/redaction_corpus.py``): ``--per-kind`` real-format secrets
   of every kind, each embedded in a sentence, a code block, a link, an attachment-like alert and a thread
   reply. A secret counts as caught when none of its values survives. Three columns: this redactor,
   detect-secrets 1.5 alone (its default plugins and filters, on the same text as a file), and the redactor of
   ``--baseline`` (a git ref; ``main`` by default), loaded from git.
2. Lookalikes that must not change: git SHAs, UUIDs, hashes, base64 blobs, URLs with query strings and ordinary
   chat; changed characters per family (target 0).
3. Every ``.py``/``.js`` line of the installed site-packages (real code no one here wrote): changed lines per
   10,000. Lines whose change is a real-format token (a format rule fired) or a documented example key are
   listed apart: redacting them is right. The rest are false positives (target <= 1 per 10,000).
4. Throughput on chat text (the shared real exports' messages and prepare_bench's synthetic ones), cleaned as
   ``prepare`` cleans them: µs a message of this redactor and the baseline, timed alternately in the same run
   (the machine is shared: compare the two columns, not seconds across runs).
5. Scanners' own test cases, read from local checkouts (nothing of them is stored in this repository):
   ``--gitleaks DIR`` every true-positive sample of its rule definitions (``cmd/generate/config/rules/*.go``), the
   secret cut out by the rule's regex; ``--trufflehog DIR`` every detector pattern test whose wanted value occurs in
   its input; ``--noseyparker DIR`` every rule example, the secret being the rule's first capture group. Recall
   overall and the misses per rule.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import site
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.redaction_corpus import Example, lookalike_examples, secret_examples  # noqa: E402
from slackdist.slack.markup import MarkupContext, clean_text  # noqa: E402
from slackdist.slack.redact import Redactor  # noqa: E402
from slackdist.slack.secrets import FORMAT_RULES, SecretFinder  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "redaction_bench.json"
PUBLIC_EXPORTS = REPO.parent / "shared" / "slack_exports" / "public_exports.tar.xz"
TARGET_RECALL = 0.98
TARGET_FP_PER_10K = 1.0
# Example credentials providers print in their documentation (AWS: AKIAIOSFODNN7EXAMPLE, wJalr…EXAMPLEKEY).
DOCUMENTED_EXAMPLE = "EXAMPLE"


# ---------------------------------------------------------------- redactors to compare


def load_baseline(ref: str) -> type | None:
    """The ``Redactor`` class of ``slackdist/slack/redact.py`` at git ``ref`` (None when git cannot show it)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{ref}:slackdist/slack/redact.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "baseline_redact.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_redact", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_redact"] = module
    spec.loader.exec_module(module)
    return module.Redactor


def detect_secrets_values(text: str) -> list[str]:
    """The secret values detect-secrets 1.5 reports for ``text`` scanned as a file (default plugins and filters)."""
    from detect_secrets.core.scan import scan_file
    from detect_secrets.settings import default_settings

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(text + "\n")
    try:
        with default_settings():
            return [s.secret_value for s in scan_file(f.name) if s.secret_value]
    finally:
        os.unlink(f.name)


def caught_by_values(value: str, found: list[str]) -> bool:
    """detect-secrets reports values, not spans: the secret is caught when a reported value covers most of it."""
    return any(value in f or (f in value and len(f) >= 0.8 * len(value)) for f in found)


# ---------------------------------------------------------------- 1. recall


def recall_section(examples: list[Example], baseline: type | None) -> dict:
    redactor = Redactor()
    old = baseline() if baseline else None
    rows: dict[str, Counter] = defaultdict(Counter)
    misses: dict[str, list[str]] = defaultdict(list)
    for ex in examples:
        row = rows[ex.kind]
        row["n"] += 1
        out, _ = redactor.redact(ex.text)
        if all(v not in out for v in ex.values):
            row["ours"] += 1
        elif len(misses[ex.kind]) < 5:
            misses[ex.kind].append(ex.setting)
        found = detect_secrets_values(ex.text)
        row["detect_secrets"] += all(caught_by_values(v, found) for v in ex.values)
        if old is not None:
            out_old, _ = old.redact(ex.text)
            row["baseline"] += all(v not in out_old for v in ex.values)
    table = {
        kind: {
            "n": r["n"],
            "recall": r["ours"] / r["n"],
            "detect_secrets_alone": r["detect_secrets"] / r["n"],
            "baseline": r["baseline"] / r["n"] if old is not None else None,
            "missed_settings": misses.get(kind, []),
        }
        for kind, r in rows.items()
    }
    secret_kinds = [k for k in table if k not in ("email", "phone")]

    def pooled(column: str) -> float:
        n = sum(rows[k]["n"] for k in secret_kinds)
        return sum(rows[k][column] for k in secret_kinds) / n

    return {
        "per_kind": table,
        "secrets_pooled": {
            "ours": pooled("ours"),
            "detect_secrets_alone": pooled("detect_secrets"),
            "baseline": pooled("baseline") if old is not None else None,
        },
        "min_recall": min(t["recall"] for t in table.values()),
    }


# ---------------------------------------------------------------- 2. lookalikes


def lookalike_section(examples: list[Example]) -> dict:
    redactor = Redactor()
    rows: dict[str, Counter] = defaultdict(Counter)
    changed: list[dict] = []
    for ex in examples:
        out, counts = redactor.redact(ex.text)
        rows[ex.kind]["n"] += 1
        if out != ex.text:
            diff = sum(a != b for a, b in zip(out, ex.text, strict=False)) + abs(len(out) - len(ex.text))
            rows[ex.kind]["changed_texts"] += 1
            rows[ex.kind]["changed_chars"] += diff
            if len(changed) < 20:
                changed.append({"kind": ex.kind, "text": ex.text, "out": out, "counts": dict(counts)})
    return {"per_kind": {k: dict(v) for k, v in rows.items()}, "changed_examples": changed}


# ---------------------------------------------------------------- 3. installed library code


def library_lines(limit: int | None) -> Iterator[tuple[str, int, str]]:
    roots = sorted({p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)})
    seen = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if not name.endswith((".py", ".js")):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    with open(path, encoding="utf-8", errors="replace") as f:
                        for number, line in enumerate(f, 1):
                            yield path, number, line.rstrip("\n")
                            seen += 1
                            if limit is not None and seen >= limit:
                                return
                except OSError:
                    continue


def library_section(limit: int | None, progress: bool = True) -> dict:
    redactor = Redactor()
    formats = SecretFinder(FORMAT_RULES)  # token formats only: a line they match holds a real-format token
    lines = 0
    real_format: list[dict] = []
    false_positive: list[dict] = []
    pii: Counter = Counter()
    start = time.perf_counter()
    for path, number, line in library_lines(limit):
        lines += 1
        if progress and lines % 500_000 == 0:
            print(f"  library lines: {lines:,} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        if not line:
            continue
        out, counts = redactor.redact(line)
        if out == line:
            continue
        spans = redactor.finder.find(line)
        where = {"file": path.split("site-packages/")[-1], "line": number, "kinds": sorted(counts)}
        if formats.find(line):
            real_format.append({**where, "why": "real-format token", "text": line.strip()[:200]})
        elif any(DOCUMENTED_EXAMPLE in line[s.start : s.end] for s in spans):
            real_format.append({**where, "why": "documented example key", "text": line.strip()[:200]})
        elif spans or "phone" in counts:
            if not spans and where["file"].startswith("phonenumbers/"):
                real_format.append(
                    {**where, "why": "libphonenumber's example number", "text": line.strip()[:200]}
                )
            else:
                false_positive.append({**where, "text": line.strip()[:200]})
        else:
            pii.update(counts)  # an author's e-mail address: personal data, redacted on purpose
    per_10k = len(false_positive) / lines * 10_000 if lines else 0.0
    return {
        "lines": lines,
        "seconds": time.perf_counter() - start,
        "false_positive_lines": len(false_positive),
        "false_positive_per_10k": per_10k,
        "real_format_or_example_lines": len(real_format),
        "pii_only_lines": dict(pii),
        "false_positives": false_positive,
        "real_format_or_example": real_format,
    }


# ---------------------------------------------------------------- 4. throughput


def real_messages() -> list[str]:
    """Every message text of the shared real exports, cleaned as ``prepare`` cleans it (empty when absent)."""
    texts: list[str] = []
    if not PUBLIC_EXPORTS.exists():
        return texts
    ctx = MarkupContext()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(PUBLIC_EXPORTS) as tar:
            tar.extractall(tmp, filter="data")
        for path in sorted(Path(tmp).rglob("*.json")):
            try:
                items = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(items, list):
                texts += [
                    clean_text(m["text"], ctx)
                    for m in items
                    if isinstance(m, dict) and isinstance(m.get("text"), str) and m["text"]
                ]
    return texts


def synthetic_messages(n: int, seed: int) -> list[str]:
    """prepare_bench's synthetic messages (the 1M-message speed target's text), cleaned."""
    from bench.prepare_bench import Generator

    gen, ctx = Generator(seed), MarkupContext()
    return [clean_text(gen.text()[0], ctx) for _ in range(n)]


def time_redactors(texts: list[str], baseline: type | None, repeats: int) -> dict:
    """Best-of-``repeats`` seconds over all texts for this redactor and the baseline, timed alternately."""
    contenders = {"ours": Redactor()}
    if baseline is not None:
        contenders["baseline"] = baseline()
    for redactor in contenders.values():
        redactor.redact("+1 415 555 0132 warm-up")  # libphonenumber loads its metadata on first use
    best = {name: float("inf") for name in contenders}
    for _ in range(repeats):
        for name, redactor in contenders.items():
            counts: Counter = Counter()
            start = time.perf_counter()
            for text in texts:
                redactor.redact_into(text, counts)
            best[name] = min(best[name], time.perf_counter() - start)
    counts = Counter()
    changed = sum(Redactor().redact_into(t, counts) != t for t in texts)
    row = {
        "messages": len(texts),
        "mean_chars": sum(map(len, texts)) / max(1, len(texts)),
        "messages_changed": changed,
        "redactions": dict(counts.most_common()),
    }
    for name, seconds in best.items():
        row[f"{name}_messages_per_s"] = len(texts) / seconds
        row[f"{name}_us_per_message"] = seconds / len(texts) * 1e6
    if "baseline" in best:
        row["added_us_per_message"] = row["ours_us_per_message"] - row["baseline_us_per_message"]
    return row


def throughput_section(baseline: type | None, limit: int, seed: int, repeats: int) -> dict:
    sources = {
        "shared real exports": real_messages(),
        "prepare_bench synthetic": synthetic_messages(limit, seed),
    }
    return {name: time_redactors(texts, baseline, repeats) for name, texts in sources.items() if texts}


# ---------------------------------------------------------------- 5. gitleaks' rule test cases

_GO_STRING_RE = re.compile(r'`([^`]*)`|"((?:[^"\\\n]|\\.)*)"')
_GO_SAMPLES = (  # utils.GenerateSampleSecrets' templates (gitleaks cmd/generate/config/utils/generate.go)
    '{i}Token="{s}"',
    '{i}Token = "{s}"',
    "{i}Token={s}",
    "{i}Token = {s}",
    '{\n    "{i}_token": "{s}"\n}',
    '{"config.ini": "{I}_TOKEN={s}\\nBACKUP_ENABLED=true"}',
    "<{i}Token>\n    {s}\n</{i}Token>",
    "{i}_token: {s}",
    "{i}_token: '{s}'",
    '{i}_token: "{s}"',
    'string {i}Token = "{s}";',
    'var {i}Token string = "{s}"',
    '{i}Token := "{s}"',
    "{i}Token := `{s}`",
    'String {i}Token = "{s}";',
    'var {i}Token = "{s}"',
    '${i}Token .= "{s}"',
    "{i}Token = '{s}'",
    '{i}Token = "{s}"',
    'System.setProperty("{I}_TOKEN", "{s}")',
    '  "{i}Token" => "{s}"',
    '{i}_TOKEN = "{s}"',
    '{i}_TOKEN := "{s}"',
    '{i}_TOKEN ::= "{s}"',
    '{i}_TOKEN :::= "{s}"',
    '{i}_TOKEN ?= "{s}"',
)


def _go_unquote(raw: str | None, quoted: str | None) -> str:
    if raw is not None:
        return raw
    return (
        quoted.encode("utf-8")
        .decode("unicode_escape")
        .encode("latin-1", "replace")
        .decode("utf-8", "replace")
    )


def _py_regex(go: str) -> re.Pattern | None:
    """gitleaks' Go (RE2) regex in Python: a mid-pattern ``(?i)`` scopes to the end of its group."""
    pattern = go.replace("[[:alnum:]]", "[a-zA-Z0-9]").replace(r"\z", r"\Z")
    flags = 0
    if pattern.startswith("(?i)"):
        pattern, flags = pattern[4:], re.IGNORECASE
    if "(?i)" in pattern:
        pattern, flags = pattern.replace("(?i)", ""), re.IGNORECASE
    try:
        return re.compile(pattern, flags)
    except re.error:
        return None


def gitleaks_cases(root: Path) -> Iterator[tuple[str, str, str]]:
    """(rule id, sample text, secret) for every true-positive sample of every rule."""
    config = tomllib.loads((root / "config" / "gitleaks.toml").read_text())
    rules = {r["id"]: r for r in config["rules"] if "regex" in r}
    for go_file in sorted((root / "cmd" / "generate" / "config" / "rules").glob("*.go")):
        source = go_file.read_text()
        for body in re.split(r"\nfunc ", source):
            rule_id = re.search(r'RuleID:\s*"([^"]+)"', body)
            if rule_id is None or rule_id.group(1) not in rules or "tps" not in body:
                continue
            rule = rules[rule_id.group(1)]
            regex = _py_regex(rule["regex"])
            if regex is None:
                continue
            block = body[body.index("tps") :]
            block = block[: min(i for i in (block.find("fps"), block.find("return"), len(block)) if i >= 0)]
            samples: list[str] = []
            for m in re.finditer(
                r'GenerateSampleSecrets?\(\s*"([^"]+)",\s*(?:`([^`]*)`|"((?:[^"\\]|\\.)*)")\s*\)', block
            ):
                secret = _go_unquote(m.group(2), m.group(3))
                for t in _GO_SAMPLES:
                    samples.append(
                        t.replace("{i}", m.group(1)).replace("{I}", m.group(1).upper()).replace("{s}", secret)
                    )
            stripped = re.sub(
                r"GenerateSampleSecrets?\([^)]*\)|\w+\.(?:NewSecret|Numeric|AlphaNumeric|Hex|Sprintf)\((?:[^()]|\([^()]*\))*\)",
                "",
                block,
            )
            samples += [_go_unquote(m.group(1), m.group(2)) for m in _GO_STRING_RE.finditer(stripped)]
            for sample in samples:
                m = regex.search(sample)
                if m is None:
                    continue
                group = rule.get("secretGroup") or (1 if regex.groups and m.group(1) else 0)
                secret = m.group(group) or m.group(0)
                if len(secret) >= 8:
                    yield rule["id"], sample, secret


def _go_expr(expr: str, consts: dict[str, str]) -> str | None:
    """A Go string expression of a test table: a literal, a constant, or ``fmt.Sprintf`` over those."""
    expr = expr.strip()
    literal = _GO_STRING_RE.fullmatch(expr)
    if literal:
        return _go_unquote(literal.group(1), literal.group(2))
    if expr in consts:
        return consts[expr]
    m = re.fullmatch(r"fmt\.Sprintf\((.*)\)", expr, re.DOTALL)
    if m is None:
        return None
    parts = [p.strip() for p in re.findall(r'`[^`]*`|"(?:[^"\\]|\\.)*"|[^,]+', m.group(1))]
    values = [_go_expr(p, consts) for p in parts]
    if not values or any(v is None for v in values):
        return None
    fmt, args = values[0], values[1:]
    try:
        return re.sub(r"%[sqv]", lambda _m: args.pop(0), fmt)
    except IndexError:
        return None


def trufflehog_cases(root: Path) -> Iterator[tuple[str, str, str]]:
    """(detector, test input, wanted secret) for every pattern test of every trufflehog detector."""
    for test_file in sorted((root / "pkg" / "detectors").rglob("*_test.go")):
        if test_file.name.endswith("_integration_test.go"):
            continue
        source = test_file.read_text(errors="replace")
        consts = {
            m.group(1): _go_unquote(m.group(2), m.group(3))
            for m in re.finditer(
                r'^\s*(\w+)\s*(?:string\s*)?=\s*(?:`([^`]*)`|"((?:[^"\\\n]|\\.)*)")\s*$', source, re.MULTILINE
            )
        }
        for case in re.finditer(r"input:\s*(.+?),\s*\n\s*want:\s*(.+?)\n", source, re.DOTALL):
            text = _go_expr(case.group(1), consts)
            if text is None:
                continue
            wants = re.findall(r'`[^`]*`|"(?:[^"\\]|\\.)*"|\b[A-Za-z_]\w*\b', case.group(2).split("{", 1)[-1])
            for w in wants:
                value = _go_expr(w, consts)
                if value and len(value) >= 8 and value in text:
                    yield test_file.parent.name, text, value


def noseyparker_cases(root: Path) -> Iterator[tuple[str, str, str]]:
    """(rule id, example, secret) for every positive example of every Nosey Parker rule (``rules/*.yml``).

    The secret is the rule's first capture group; where a rule captures a user or a host first (connection
    strings), that is what is checked, so the figure is a lower bound.
    """
    import yaml

    for rules_file in sorted(root.rglob("rules/*.yml")):
        for rule in (yaml.safe_load(rules_file.read_text()) or {}).get("rules", []):
            try:
                regex = re.compile(rule["pattern"])
            except (re.error, KeyError):
                continue
            for example in rule.get("examples", []):
                m = regex.search(example)
                if m is None:
                    continue
                secret = next((g for g in m.groups() if g), m.group(0))
                if len(secret) >= 8:
                    yield rule.get("id", rules_file.stem), example, secret


def scanner_section(cases: Iterator[tuple[str, str, str]]) -> dict:
    """Recall on a scanner's own test cases: the wanted secret must not survive."""
    redactor = Redactor(keep_emails=True, keep_phones=True)
    n = caught = 0
    misses: dict[str, list[str]] = defaultdict(list)
    for rule_id, sample, secret in cases:
        n += 1
        out, _ = redactor.redact(sample)
        if secret not in out:
            caught += 1
        else:
            misses[rule_id].append(sample.strip()[:160])
    return {
        "cases": n,
        "recall": caught / n if n else None,
        "missed_rules": {k: len(v) for k, v in sorted(misses.items(), key=lambda kv: -len(kv[1]))},
        "missed_examples": {k: v[:2] for k, v in misses.items()},
    }


# ---------------------------------------------------------------- report


def print_tables(result: dict) -> None:
    rec = result["recall"]
    print(f"\nRecall per kind ({result['per_kind']} examples each, 5 settings):")
    print(f"{'kind':<22} {'ours':>7} {'detect-secrets':>15} {'baseline':>9}")
    for kind, row in rec["per_kind"].items():
        base = "-" if row["baseline"] is None else f"{row['baseline']:.1%}"
        print(f"{kind:<22} {row['recall']:>7.1%} {row['detect_secrets_alone']:>15.1%} {base:>9}")
    pooled = rec["secrets_pooled"]
    base = "-" if pooled["baseline"] is None else f"{pooled['baseline']:.1%}"
    print(
        f"{'all secret kinds':<22} {pooled['ours']:>7.1%} {pooled['detect_secrets_alone']:>15.1%} {base:>9}"
    )
    print("\nLookalikes (must not change):")
    for kind, row in result["lookalikes"]["per_kind"].items():
        print(
            f"  {kind:<10} {row['n']:>5} texts, {row.get('changed_texts', 0)} changed, {row.get('changed_chars', 0)} chars"
        )
    lib = result.get("library")
    if lib:
        print(
            f"\nInstalled library code: {lib['lines']:,} lines, {lib['false_positive_lines']} false-positive lines "
            f"({lib['false_positive_per_10k']:.2f} per 10,000), {lib['real_format_or_example_lines']} lines with "
            f"real-format tokens or documented example keys, PII-only lines {lib['pii_only_lines']}"
        )
    for source, tp in result.get("throughput", {}).items():
        line = (
            f"\nThroughput on {tp['messages']:,} {source} messages (mean {tp['mean_chars']:.0f} chars): "
            f"ours {tp['ours_messages_per_s']:,.0f} msg/s ({tp['ours_us_per_message']:.1f} us)"
        )
        if "baseline_messages_per_s" in tp:
            line += (
                f", baseline {tp['baseline_messages_per_s']:,.0f} msg/s ({tp['baseline_us_per_message']:.1f} us): "
                f"+{tp['added_us_per_message']:.1f} us a message"
            )
        print(line)
    for name in ("gitleaks", "noseyparker", "trufflehog"):
        sc = result.get(name)
        if sc:
            print(
                f"\n{name} test cases: {sc['cases']} samples, recall {sc['recall']:.1%}; most missed: "
                + ", ".join(f"{k} ({v})" for k, v in list(sc["missed_rules"].items())[:8])
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-kind", type=int, default=40, help="secret examples per kind (>= 30)")
    parser.add_argument("--lookalikes", type=int, default=300, help="lookalike texts per family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", default="main", help="git ref whose redact.py is the 'before' column")
    parser.add_argument(
        "--max-library-lines", type=int, default=None, help="stop after N site-packages lines"
    )
    parser.add_argument("--no-library", action="store_true", help="skip the site-packages scan")
    parser.add_argument("--throughput-messages", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gitleaks", type=Path, help="a gitleaks checkout: also run its rules' test cases")
    parser.add_argument(
        "--noseyparker", type=Path, help="a Nosey Parker checkout: also run its rules' examples"
    )
    parser.add_argument(
        "--trufflehog", type=Path, help="a trufflehog checkout: also run its detectors' pattern tests"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON goes")
    args = parser.parse_args(argv)

    baseline = load_baseline(args.baseline)
    result: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, Python {platform.python_version()}".strip(),
        "baseline": args.baseline if baseline else None,
        "per_kind": args.per_kind,
    }
    print("recall ...", file=sys.stderr)
    result["recall"] = recall_section(list(secret_examples(args.seed, args.per_kind)), baseline)
    result["lookalikes"] = lookalike_section(list(lookalike_examples(args.seed, args.lookalikes)))
    print("throughput ...", file=sys.stderr)
    result["throughput"] = throughput_section(baseline, args.throughput_messages, args.seed, args.repeats)
    if args.gitleaks:
        print("gitleaks cases ...", file=sys.stderr)
        result["gitleaks"] = scanner_section(gitleaks_cases(args.gitleaks))
    if args.noseyparker:
        print("noseyparker cases ...", file=sys.stderr)
        result["noseyparker"] = scanner_section(noseyparker_cases(args.noseyparker))
    if args.trufflehog:
        print("trufflehog cases ...", file=sys.stderr)
        result["trufflehog"] = scanner_section(trufflehog_cases(args.trufflehog))
    if not args.no_library:
        print("site-packages ...", file=sys.stderr)
        result["library"] = library_section(args.max_library_lines)
    lookalike_chars = sum(r.get("changed_chars", 0) for r in result["lookalikes"]["per_kind"].values())
    result["targets"] = {
        "recall_per_kind_ge_98": result["recall"]["min_recall"] >= TARGET_RECALL,
        "lookalikes_unchanged": lookalike_chars == 0,
        "library_fp_per_10k_le_1": None
        if "library" not in result
        else result["library"]["false_positive_per_10k"] <= TARGET_FP_PER_10K,
    }
    print_tables(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
