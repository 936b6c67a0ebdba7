"""Secrets and personal data -> placeholders, with a count per kind.

Secrets are always redacted, inside code too: they must never reach a dataset, a report or a log. Where they
are is :mod:`slackdist.slack.secrets`' job (detect-secrets' formats, current formats it lacks, and context
rules); each becomes ``[REDACTED_SECRET]``, counted under its kind (``SECRET_KINDS``).

Emails and phone numbers become ``[EMAIL]`` / ``[PHONE]`` unless the user keeps them. Phone numbers are found by
Google's libphonenumber (the ``phonenumbers`` port): a number is kept as a phone when it is a valid number for
its region, or written in a phone layout (``+44 20 7946 0958``, ``(555) 123-4567``, ``555-123-4567``) with a
possible length. Timestamps, versions, IPs, dates, port lists and ids pass: the matcher rejects most, and a
digit run glued to ``.digits`` or ``:`` is not a phone.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import phonenumbers
from phonenumbers import Leniency, PhoneNumberMatcher

from slackdist.slack.secrets import PLACEHOLDER, SECRET_KINDS, SecretFinder

SECRET = PLACEHOLDER
EMAIL = "[EMAIL]"
PHONE = "[PHONE]"

KINDS = SECRET_KINDS + ("email", "phone")

_EMAIL_RE = re.compile(
    r"(?<![\w.+%-])(?!git@)[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
_EMAIL_HINT_RE = re.compile(r"@[A-Za-z0-9-]+\.")  # starts with a literal: a fast scan
# A necessary condition for any phone number: 7 digits with at most a few separators between them.
PHONE_HINT_RE = re.compile(r"\d(?:[ ().+/xX-]{0,3}\d){6}")
# A phone layout that makes a merely possible number (e.g. the fictional 555 range) a phone.
_PHONE_LAYOUT_RE = re.compile(r"^\+|^\(\d{2,4}\)|^\d{3}[-.]\d{3}[-.]\d{4}$")


@dataclass
class Redactor:
    """Replaces secrets (always) and emails / phone numbers (unless kept) with placeholders.

    Attributes:
        keep_emails: leave email addresses as they are.
        keep_phones: leave phone numbers as they are.
        phone_region: the region whose national formats numbers without ``+country`` are read in.
    """

    keep_emails: bool = False
    keep_phones: bool = False
    phone_region: str = "US"
    finder: SecretFinder = field(default_factory=SecretFinder, repr=False)

    def redact(self, text: str) -> tuple[str, Counter]:
        """Redact one text (idempotent: a second call changes nothing).

        Returns:
            The redacted text and a Counter of replacements per kind (names in ``KINDS``).
        """
        counts: Counter = Counter()
        return self.redact_into(text, counts), counts

    def redact_into(self, text: str, counts: Counter) -> str:
        """Like :meth:`redact`, adding the replacements per kind to ``counts`` (no Counter per call).

        Secrets first (so an email-like ``user:pw@host`` or a numeric passcode is a secret, not PII), then
        emails, then phone numbers; each step looks only where a cheap test says it may find something.
        """
        if not text:
            return text
        spans = self.finder.find(text)
        if spans:
            parts = []
            pos = 0
            for span in spans:
                parts.append(text[pos : span.start])
                parts.append(SECRET)
                pos = span.end
                counts[span.kind] += 1
            parts.append(text[pos:])
            text = "".join(parts)
        if not self.keep_emails and "@" in text and _EMAIL_HINT_RE.search(text):
            text, n = _EMAIL_RE.subn(EMAIL, text)
            if n:
                counts["email"] += n
        if not self.keep_phones and PHONE_HINT_RE.search(text):
            text = self._phones(text, counts)
        return text

    def _phones(self, text: str, counts: Counter) -> str:
        parts = []
        pos = 0
        for m in PhoneNumberMatcher(text, self.phone_region, leniency=Leniency.POSSIBLE):
            if is_phone(text, m.start, m.end, m.number):
                parts.append(text[pos : m.start])
                parts.append(PHONE)
                pos = m.end
                counts["phone"] += 1
        if not parts:
            return text
        parts.append(text[pos:])
        return "".join(parts)


def is_phone(text: str, start: int, end: int, number: phonenumbers.PhoneNumber) -> bool:
    """Whether the matcher's candidate ``text[start:end]`` is a phone number and not a lookalike.

    Valid numbers are phones; merely possible ones only in a phone layout. Either way a run glued to
    ``.digit``, ``:digit`` or another digit run (a Unix timestamp with fraction, a time, a version) is not.
    """
    raw = text[start:end]
    if sum(c.isdigit() for c in raw) - len(number.extension or "") < 7:
        return False
    before, after = text[max(0, start - 2) : start], text[end : end + 2]
    if re.fullmatch(r"\d[.:,]", before) or re.fullmatch(r"[.:,/]\d", after):
        return False
    if before.endswith(("/", "=", "#", "v")) and raw.isdigit():
        return False  # a path segment, an id parameter, an issue number
    if phonenumbers.is_valid_number(number):
        return True
    return _PHONE_LAYOUT_RE.search(raw) is not None
