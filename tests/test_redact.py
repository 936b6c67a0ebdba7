"""slackdist.slack.redact: secrets always go, emails/phones by default, nothing that only looks alike."""

from __future__ import annotations

import random
import re
import string
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bench.redaction_corpus import ALNUM, phone_number, rand
from slackdist.slack.markup import MarkupContext, clean_text
from slackdist.slack.redact import EMAIL, PHONE, SECRET, Redactor
from slackdist.slack.secrets import is_placeholder

PEM = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\nAAAAB3NzaC1yc2E\n-----END OPENSSH PRIVATE KEY-----"


@pytest.mark.parametrize(
    ("text", "kind", "secret"),
    [
        (
            "use xoxb-1234567890-0987654321-AbCdEfGhIjKl please",
            "slack_token",
            "xoxb-1234567890-0987654321-AbCdEfGhIjKl",
        ),
        ("user token xoxp-11-22-33-abcdef", "slack_token", "xoxp-11-22-33-abcdef"),
        (
            "hook https://hooks.slack.com/services/T000/B000/XXXXabc ok",
            "slack_token",
            "hooks.slack.com/services/T000",
        ),
        (
            "gh ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
            "github_token",
            "ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8",
        ),
        ("oauth gho_abcdefghijklmnopqrstuvwxyz0123", "github_token", "gho_abcdefghijklmnopqrstuvwxyz0123"),
        ("app ghs_abcdefghijklmnopqrstuvwxyz0123", "github_token", "ghs_abcdefghijklmnopqrstuvwxyz0123"),
        ("user ghu_abcdefghijklmnopqrstuvwxyz0123", "github_token", "ghu_abcdefghijklmnopqrstuvwxyz0123"),
        (
            "pat github_pat_11ABCDEFG0123456789_abcdefghij",
            "github_token",
            "github_pat_11ABCDEFG0123456789_abcdefghij",
        ),
        ("key AKIAIOSFODNN7EXAMPLE here", "aws_key", "AKIAIOSFODNN7EXAMPLE"),
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "aws_key",
            "wJalrXUtnFEMI/K7MDENG",
        ),
        ('"SecretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"', "aws_key", "wJalrXUtnFEMI/K7MDENG"),
        (f"key:\n```\n{PEM}\n```", "private_key", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU="),
        (
            "truncated -----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
            "private_key",
            "MIIEvQIBADANBgkq",
        ),
        (
            "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N",
            "jwt",
            "eyJzdWIiOiIxMjM0NTY3ODkwIn0",
        ),
        ("Authorization: Bearer abc123def456ghi789", "bearer", "abc123def456ghi789"),
        ("password=hunter2Hunter2!", "password", "hunter2Hunter2!"),
        ("passwd: letmein99", "password", "letmein99"),
        ('{"api_key": "sk_live_fake_9f8e7d6c5b4a"}', "password", "sk_live_fake_9f8e7d6c5b4a"),
        ("https://api.example.org/v1?token=s3cr3tT0k&page=2", "password", "s3cr3tT0k"),
        ("client_secret=abcDEF123", "password", "abcDEF123"),
        ("mail me: ada.lovelace@example.com.", "email", "ada.lovelace@example.com"),
        ("call +1 (555) 010-4477 today", "phone", "555) 010-4477"),
        ("call 555-867-5309", "phone", "555-867-5309"),
        ("call (555) 123-4567", "phone", "123-4567"),
        ("ring +44 20 7946 0958", "phone", "7946 0958"),
        ("llamadme al +34 612 34 56 78", "phone", "612 34 56 78"),
        ("call 555.123.4567", "phone", "555.123.4567"),
    ],
)
def test_each_kind_is_redacted_and_counted(text: str, kind: str, secret: str) -> None:
    out, counts = Redactor().redact(text)
    assert secret not in out
    assert counts[kind] >= 1
    assert set(counts) == {kind}


@pytest.mark.parametrize(
    "text",
    [
        "ports 8080 8081 8082 and 1234567890",
        "at 10:30:45 on 2021-03-02, v1.2.3, ip 192.168.1.1, ts 1452837318.000002",
        "ISBN 978-3-16-148410-0 and 100 200 3000 and +1 to that",
        "use Bearer authentication, the token: is a word? no: token is fine",
        "git@github.com:org/repo.git and @Ada Lovelace",
        "ghp_short and AKIA_not_a_key and eyJ.not.ajwt",
        "¡Hola! 確認しました شكراً Привет 👍",
    ],
)
def test_lookalikes_survive(text: str) -> None:
    out, counts = Redactor().redact(text)
    assert (out, dict(counts)) == (text, {})


def test_keep_switches_leave_pii_but_never_secrets() -> None:
    text = "ada@example.com 555-867-5309 password=hunter2"
    out, counts = Redactor(keep_emails=True, keep_phones=True).redact(text)
    assert out == f"ada@example.com 555-867-5309 password={SECRET}"
    assert counts == {"password": 1}
    out, counts = Redactor().redact(text)
    assert out == f"{EMAIL} {PHONE} password={SECRET}"
    assert counts == {"email": 1, "phone": 1, "password": 1}


def test_secrets_inside_code_are_redacted_and_key_names_kept() -> None:
    text = "```\nexport AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\ntoken=xoxp-1-2-3\n```"
    out, counts = Redactor().redact(text)
    assert out == f"```\nexport AWS_SECRET_ACCESS_KEY={SECRET}\ntoken={SECRET}\n```"
    assert counts == {"aws_key": 1, "slack_token": 1}


def test_sample_export_secrets_never_survive(sample_export_dir, sample_secrets) -> None:
    raw = "\n".join(p.read_text(encoding="utf-8") for p in sample_export_dir.rglob("*.json"))
    for secret in sample_secrets.PLANTED_SECRETS + sample_secrets.PLANTED_EMAILS:
        assert secret in raw  # planted (JSON keeps these strings unescaped)
    decoded = raw.replace("\\n", "\n").replace('\\"', '"')
    out, counts = Redactor().redact(decoded)
    for secret in (
        sample_secrets.PLANTED_SECRETS + sample_secrets.PLANTED_EMAILS + sample_secrets.PLANTED_PHONES
    ):
        assert secret not in out
    assert {"slack_token", "github_token", "aws_key", "private_key", "jwt", "bearer", "password"} <= set(
        counts
    )


# ---- property tests ------------------------------------------------------------------------------

_alnum = string.ascii_letters + string.digits


_seeds = st.integers(0, 2**32 - 1)


def _varied(alphabet: str, lo: int, hi: int) -> st.SearchStrategy[str]:
    """Random text as a generated credential is: not one repeated character (``0000…`` is a placeholder)."""
    return st.text(alphabet=alphabet, min_size=lo, max_size=hi).filter(lambda s: len(set(s)) > 4)


def _tok(prefix: str, alphabet: str, lo: int, hi: int) -> st.SearchStrategy[str]:
    return _varied(alphabet, lo, hi).map(lambda s: prefix + s)


_b64url = _alnum + "_-"
secrets = st.one_of(
    st.builds(
        lambda t, a, b, c: f"xox{t}-{a}-{b}-{c}",
        st.sampled_from("abposr"),
        st.text("0123456789", min_size=8, max_size=12),
        st.text("0123456789", min_size=8, max_size=12),
        _varied(_alnum, 16, 32),
    ),
    st.builds(
        lambda p, s: p + s,
        st.sampled_from(["ghp_", "gho_", "ghs_", "ghu_"]),
        _varied(_alnum, 36, 36),
    ),
    _tok("github_pat_", _alnum + "_", 40, 82),
    _tok("AKIA", string.ascii_uppercase + string.digits, 16, 16),
    st.builds(lambda s: f"aws_secret_access_key={s}", _varied(_alnum + "/+", 40, 40)),
    st.builds(
        lambda a, b, c: f"eyJ{a}.eyJ{b}.{c}",
        _varied(_b64url, 10, 40),
        _varied(_b64url, 10, 80),
        _varied(_b64url, 10, 43),
    ),
    st.builds(lambda s: f"Bearer {s}9", _varied(_alnum + "-._~+/", 10, 40)),
    st.builds(
        lambda k, s: f"{k}={s}",
        st.sampled_from(["password", "passwd", "secret"]),
        # a leading $ makes it a variable reference ($DB_PASSWORD), which stays
        _varied(_alnum + "!#$%*-_.", 6, 24).filter(
            # B_PASS, MY_SECRET: a name of a secret (a variable), not one
            lambda s: (
                s[0] != "$" and not is_placeholder(s) and not re.search("pass|secret|pwd", s, re.IGNORECASE)
            )
        ),
    ),
    # API keys and tokens are generated credentials: long enough to tell from counts and names.
    st.builds(
        lambda k, s: f"{k}={s}",
        st.sampled_from(["api_key", "apikey", "token", "access_token"]),
        # from a seeded random.Random: hypothesis shrinks towards AAAAAAA00-AAAAAAA12, a name rather than a key
        st.builds(lambda seed, n: rand(random.Random(seed), ALNUM + "-_", n), _seeds, st.integers(20, 40)),
    ),
    st.builds(
        lambda s: f"-----BEGIN RSA PRIVATE KEY-----\n{s}\n-----END RSA PRIVATE KEY-----",
        st.text(_alnum + "+/=\n", min_size=20, max_size=200),
    ),
)


def _value(secret: str) -> str:
    """The part that must disappear (key names such as `password=` may stay)."""
    for sep in ("-----\n", "=", "Bearer "):
        if sep in secret and not secret.startswith(("xox", "gh", "eyJ", "AKIA")):
            return secret.split(sep, 1)[1].rsplit("\n-----END", 1)[0]
    return secret


PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_around = st.text(max_size=60)


@PROPS
@given(_around, secrets, _around, st.booleans())
def test_generated_secrets_never_survive_cleaning_and_redaction(
    left: str, secret: str, right: str, in_code: bool
) -> None:
    body = f"```\n{secret}\n```" if in_code else secret
    text = f"{left} {body} {right}"
    value = _value(secret)
    assume(value not in left and value not in right)
    cleaned = clean_text(text, MarkupContext())
    out, counts = Redactor(keep_emails=True, keep_phones=True).redact(cleaned)
    assert value not in out
    assert sum(counts.values()) >= 1


@PROPS
@given(
    st.lists(
        st.one_of(secrets, st.text(max_size=30), st.sampled_from([" ", "\n", "a@b.io", "+1 555 010 4477"])),
        max_size=8,
    ).map(" ".join)
)
def test_idempotent_and_never_crashes(text: str) -> None:
    redactor = Redactor()
    once, _ = redactor.redact(text)
    twice, counts = redactor.redact(once)
    assert twice == once
    assert not counts


@PROPS
@given(_seeds, st.text(alphabet=string.ascii_letters + " ,.:!?", max_size=30), st.booleans())
def test_generated_phone_numbers_are_redacted(seed: int, words: str, in_code: bool) -> None:
    # A valid number of one of 15 regions, in a layout people write, among words: its digits must go.
    number = phone_number(random.Random(seed))
    body = f"```\n{number}\n```" if in_code else number
    out, counts = Redactor().redact(f"{words} {body} {words[::-1]}")
    assert number not in out and counts["phone"] == 1


@PROPS
@given(st.text(alphabet="0123456789 +()-./:x", max_size=40))
def test_digit_soup_is_redacted_idempotently(text: str) -> None:
    # Dates, times, versions, IPs and number lists: whatever is taken for a phone, a second pass finds nothing.
    once, _ = Redactor().redact(text)
    assert Redactor().redact(once) == (once, Counter())


def test_redact_into_adds_the_same_counts_as_redact() -> None:
    text = "mail a.b@example.com, call 555-867-5309 or 555.123.4567, token xoxb-1-2-abc"
    counts: Counter = Counter({"email": 2})
    out = Redactor().redact_into(text, counts)
    assert (out, counts - Counter({"email": 2})) == Redactor().redact(text)
    assert counts == Counter({"email": 3, "phone": 2, "slack_token": 1})
