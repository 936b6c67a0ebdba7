"""Secrets and personal data -> placeholders, with a count per kind.

Secrets are always redacted, inside code too: they must never reach a dataset, a report or a log.
Emails and phone numbers become ``[EMAIL]`` / ``[PHONE]`` unless the user keeps them.

The phone pattern is deliberately conservative: it needs a ``+country`` prefix, a ``(area)`` code, or
``123-456-7890`` / ``123.456.7890`` separators, so timestamps, versions, IPs, dates and port lists
(``1234567890``, ``8080 8081``) are left alone. Missing a phone number beats mangling code.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

SECRET = "[REDACTED_SECRET]"
EMAIL = "[EMAIL]"
PHONE = "[PHONE]"

KINDS = (
    "private_key",
    "slack_token",
    "github_token",
    "aws_key",
    "jwt",
    "bearer",
    "password",
    "email",
    "phone",
)

# A BEGIN line up to its END line; an unterminated block (a truncated paste) runs to the next fence or the end.
_PRIVATE_KEY_RE = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|(?:(?!```).)*)",
    re.DOTALL,
)
_SLACK_RE = re.compile(
    r"\bxox[abposre]-[A-Za-z0-9][A-Za-z0-9-]*"
    r"|\bxapp-\d-[A-Za-z0-9-]+"
    r"|https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_-]+"
)
_GITHUB_RE = re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,255}|github_pat_[A-Za-z0-9_]{20,255})\b")
_AWS_KEY_RE = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")
_AWS_SECRET_RE = re.compile(
    r"(?i)((?:aws_?)?secret_?(?:access_?)?key(?:_id)?[\"']?\s*[:=]\s*[\"']?)([A-Za-z0-9/+=]{30,})"
)
_JWT_RE = re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
# The token must look like one (a digit or token punctuation, or long): "Bearer authentication" stays.
_BEARER_RE = re.compile(
    r"(?i)\b(bearer\s+)(?!\[REDACTED)((?=[A-Za-z0-9._~+/-]*[0-9._~+/-])[A-Za-z0-9._~+/-]{8,}=*|[A-Za-z]{24,})"
)
_PASSWORD_RE = re.compile(
    r"(?i)\b((?:password|passwd|passphrase|api[_-]?key|apikey|api[_-]?secret|client[_-]?secret|secret"
    r"|secret[_-]?key|access[_-]?token|auth[_-]?token|refresh[_-]?token|token)[\"']?[ \t]*[:=][ \t]*)"
    r"(\"[^\"\n]+\"|'[^'\n]+'|[^\s,;'\"&<>()\[\]{}]+)"
)
_EMAIL_RE = re.compile(
    r"(?<![\w.+%-])(?!git@)[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
_PHONE_RE = re.compile(
    r"(?<![\w+/.:-])(?:"
    r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){2,5}"  # +1 555 123 4567, +44 (20) 7946 0958
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"  # (555) 123-4567
    r"|\d{3}-\d{3}-\d{4}|\d{3}\.\d{3}\.\d{4}"  # 555-123-4567, 555.123.4567
    r")(?![\w.:/-]?\d)(?![\w])"
)


_AWS_PREFIX_RE = re.compile(r"A(?:KIA|SIA|GPA|IDA|ROA|NPA|NVA|IPA)")
_EMAIL_HINT_RE = re.compile(r"@[A-Za-z0-9-]+\.")  # starts with a literal: a fast scan
_PLUS_DIGIT_RE = re.compile(r"\+\d")
_AREA_CODE_RE = re.compile(r"\(\d{3}\)")
# [-.]ddd[-.]dddd, as two patterns that each start with a literal (found by a fast scan), not a class.
_DASH_DIGITS_RE = re.compile(r"-\d{3}[-.]\d{4}")
_DOT_DIGITS_RE = re.compile(r"\.\d{3}[-.]\d{4}")


@dataclass
class Redactor:
    """Replaces secrets (always) and emails / phone numbers (unless kept) with placeholders.

    Attributes:
        keep_emails: leave email addresses as they are.
        keep_phones: leave phone numbers as they are.
    """

    keep_emails: bool = False
    keep_phones: bool = False

    def redact(self, text: str) -> tuple[str, Counter]:
        """Redact one text (idempotent: a second call changes nothing).

        Returns:
            The redacted text and a Counter of replacements per kind (``slack_token``, ``github_token``,
            ``aws_key``, ``private_key``, ``jwt``, ``bearer``, ``password``, ``email``, ``phone``).
        """
        counts: Counter = Counter()
        return self.redact_into(text, counts), counts

    def redact_into(self, text: str, counts: Counter) -> str:
        """Like :meth:`redact`, adding the replacements per kind to ``counts`` (no Counter per call).

        Each rule first checks for a cheap sign of its kind (a substring), so ordinary messages cost a few
        ``in`` tests; this runs once per message of the export.
        """
        if not text:
            return text
        if "PRIVATE KEY" in text:
            text = _subn(_PRIVATE_KEY_RE, SECRET, text, counts, "private_key")
        if "xox" in text or "xapp-" in text or "hooks.slack" in text:
            text = _subn(_SLACK_RE, SECRET, text, counts, "slack_token")
        if "_" in text and ("gh" in text or "github_pat_" in text):
            text = _subn(_GITHUB_RE, SECRET, text, counts, "github_token")
        if "A" in text and _AWS_PREFIX_RE.search(text):
            text = _subn(_AWS_KEY_RE, SECRET, text, counts, "aws_key")
        lowered = text.lower()
        if "secret" in lowered and "key" in lowered:
            text = _subn(_AWS_SECRET_RE, _keep_key, text, counts, "aws_key")
        if "eyJ" in text:
            text = _subn(_JWT_RE, SECRET, text, counts, "jwt")
        if "bearer" in lowered:
            text = _subn(_BEARER_RE, _keep_key, text, counts, "bearer")
        if ("=" in text or ":" in text) and (
            "pass" in lowered or "secret" in lowered or "token" in lowered or "key" in lowered
        ):
            text = _PASSWORD_RE.sub(_counting(_keep_key_unless_placeholder, counts, "password"), text)
        if not self.keep_emails and "@" in text and _EMAIL_HINT_RE.search(text):
            text = _subn(_EMAIL_RE, EMAIL, text, counts, "email")
        if not self.keep_phones and _may_hold_phone(text):
            text = _PHONE_RE.sub(_counting(_phone, counts, "phone"), text)
        return text


def _may_hold_phone(text: str) -> bool:
    """A necessary condition for a _PHONE_RE match, about 10x cheaper than scanning with it.

    Its three forms need ``+digit``, ``(ddd)``, or ``-ddd-dddd`` / ``.ddd.dddd``; the ``in`` tests
    skip each regex on the many texts without that character.
    """
    return (
        ("+" in text and _PLUS_DIGIT_RE.search(text) is not None)
        or ("(" in text and _AREA_CODE_RE.search(text) is not None)
        or ("-" in text and _DASH_DIGITS_RE.search(text) is not None)
        or ("." in text and _DOT_DIGITS_RE.search(text) is not None)
    )


def _subn(pattern: re.Pattern, replace, text: str, counts: Counter, kind: str) -> str:
    """For rules whose replacement always changes the match (so the number of matches is the count)."""
    text, n = pattern.subn(replace, text)
    if n:
        counts[kind] += n
    return text


def _counting(replace: Callable[[re.Match], str], counts: Counter, kind: str) -> Callable[[re.Match], str]:
    def sub(m: re.Match) -> str:
        new = replace(m)
        if new != m.group(0):
            counts[kind] += 1
        return new

    return sub


def _keep_key(m: re.Match) -> str:
    return m.group(1) + SECRET


def _keep_key_unless_placeholder(m: re.Match) -> str:
    value = m.group(2).strip("\"'")
    if value.startswith("[") or value in ("", SECRET):
        return m.group(0)
    return m.group(1) + SECRET


def _phone(m: re.Match) -> str:
    digits = sum(c.isdigit() for c in m.group(0))
    return PHONE if 7 <= digits <= 15 else m.group(0)
