"""Secrets and personal data -> placeholders, with a count per kind.

Secrets are always redacted, inside code too: they must never reach a dataset, a report or a log. Where they
are is :mod:`slackdist.slack.secrets`' job (detect-secrets' formats, current formats it lacks, and context
rules); each becomes ``[REDACTED_SECRET]``, counted under its kind (``SECRET_KINDS``).

Emails and phone numbers become ``[EMAIL]`` / ``[PHONE]`` unless the user keeps them. Phone numbers are found by
Google's libphonenumber (the ``phonenumbers`` port), run only on phone-shaped windows of the text: a number is a
phone when it is valid for its region (``+country`` or the region's national plan, so a plain ``2025550143``
counts), or written in a phone layout (``+44 20 7946 0958``, ``(555) 123-4567``, ``555-123-4567``) with a possible
length. Timestamps, versions, IPs, dates, port lists, hashes and numbers in code pass (see ``is_phone``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import phonenumbers
from phonenumbers import Leniency, PhoneNumberMatcher

from slackdist.slack.secrets import PLACEHOLDER, SECRET_KINDS, SecretFinder, ascii_lower_bytes

SECRET = PLACEHOLDER
EMAIL = "[EMAIL]"
PHONE = "[PHONE]"

KINDS = SECRET_KINDS + ("email", "phone")

_EMAIL_RE = re.compile(
    r"(?<![\w.+%-])(?!git@)[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
# On the text's ASCII bytes: seven digits with at most three separators between each, which every phone window
# holds (dropping non-ASCII characters only joins runs, so no window is lost).
_SEVEN_DIGITS_RE = re.compile(rb"[0-9](?:[ ().+/-]{0,3}[0-9]){6}")
_EMAIL_HINT_RE = re.compile(r"@[A-Za-z0-9-]+\.")  # starts with a literal: a fast scan
# Where a phone number can be: an optional ``+`` or ``(``, then digits and separators, ending on a digit that no
# word character follows. Only these windows go to the matcher (it costs ~0.1 ms a call). After "@" only a
# "+country" number starts one: a mention of someone whose display name is their phone number ("@+1 415 …").
PHONE_CANDIDATE_RE = re.compile(r"(?:(?<![\w.:/=#@+-])(?:\+|\()?|(?<=@)\+)\d[\d ()./-]{5,24}\d(?!\w)")
_NOT_PHONE_RE = re.compile(
    r"\d{4}[-./]\d{1,2}[-./]\d{1,2}\b|\b\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$"  # dates
    r"|^\d{1,3}(?:\.\d{1,3}){3}$"  # IPv4 addresses
    r"|^\d+(?:\.\d+){3,}$"  # versions
)
_DOTTED_PHONE_RE = re.compile(r"\(?\d{3}\)?[. ]\d{3}\.\d{4}")
# A phone layout that makes a merely possible number (e.g. the fictional 555 range) a phone.
_PHONE_LAYOUT_RE = re.compile(r"^\+|^\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}$|^\d{3}[-.]\d{3}[-.]\d{4}$")


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
    _national_lengths: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._national_lengths = national_lengths(self.phone_region)

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
        haystack = ascii_lower_bytes(text)  # what the cheap tests look at
        spans = self.finder.find(text, haystack)
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
        if not self.keep_phones and _SEVEN_DIGITS_RE.search(haystack):
            text = self._phones(text, counts)
        return text

    def _phones(self, text: str, counts: Counter) -> str:
        parts = []
        pos = 0
        for start, end in self.phone_spans(text):
            parts.append(text[pos:start])
            parts.append(PHONE)
            pos = end
            counts["phone"] += 1
        if not parts:
            return text
        parts.append(text[pos:])
        return "".join(parts)

    def phone_spans(self, text: str) -> list[tuple[int, int]]:
        """Where the phone numbers are: libphonenumber's matcher, run only on phone-shaped windows."""
        spans = []
        for c in PHONE_CANDIDATE_RE.finditer(text):
            window = c.group(0)
            digits = sum(ch.isdigit() for ch in window)
            if not 7 <= digits <= 15 or _NOT_PHONE_RE.search(window):
                continue
            if "+" not in window and digits not in self._national_lengths:
                continue  # without +country a number is read in the region's plan (US: 10 digits, 11 with the 1)
            if (
                ("." in window or "/" in window)
                and window[0] != "+"
                and not _DOTTED_PHONE_RE.fullmatch(window)
            ):
                continue  # decimals, times (09.36.49), dates (01/11/2016), coordinates
            for m in PhoneNumberMatcher(window, self.phone_region, leniency=Leniency.POSSIBLE):
                start, end = c.start() + m.start, c.start() + m.end
                if is_phone(text, start, end, m.number, self._national_lengths):
                    spans.append((start, end))
        return spans


_INT_LIMITS = frozenset({"2147483647", "2147483648", "4294967295", "4294967296"})


def national_lengths(region: str) -> frozenset[int]:
    """How many digits a number of ``region`` has written without ``+country``: its possible national lengths,
    and each plus one for a national or trunk prefix (US ``1``, UK ``0``).

    Raises:
        ValueError: libphonenumber does not know the region.
    """
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region.upper())
    if metadata is None:
        raise ValueError(f"unknown phone region {region!r} (use a two-letter region code such as US or GB)")
    lengths = set(metadata.general_desc.possible_length)
    return frozenset(lengths | {n + 1 for n in lengths})


def _in_number_list(text: str, start: int, end: int) -> bool:
    """A digit run among code (``(2147483647, 65535)``, ``x = 1234567890``, ``[3414372578, 3437564012]``).

    Code punctuation right before or after, or another number across a comma, makes it a constant.
    """
    before = text[:start].rstrip()
    after = text[end:].lstrip()
    if before[-1:] in tuple("([{=*+-/<>%|&") or after[:1] in tuple(")]}*+-/<>%|&") or before[-1:].isdigit():
        return True
    return (before[-1:] == "," and before[:-1].rstrip()[-1:].isdigit()) or (
        after[:1] == "," and after[1:].lstrip()[:1].isdigit()
    )


def is_phone(
    text: str,
    start: int,
    end: int,
    number: phonenumbers.PhoneNumber,
    lengths: frozenset[int] = frozenset({10, 11}),
) -> bool:
    """Whether the matcher's candidate ``text[start:end]`` is a phone number and not a lookalike.

    Valid numbers are phones; merely possible ones only in a phone layout. A run glued to letters, ``.digit``,
    ``:digit`` or another number (a hash, a Unix timestamp with fraction, a time, a version), a decimal, and a
    bare digit run of another length than ``lengths`` (the region's national lengths) or among code punctuation
    are not.
    """
    raw = text[start:end]
    if any(c.isalpha() or c == "/" for c in raw):
        return False  # "x", "ext." or a letter read as a digit, or a date/fraction/path with slashes
    if sum(c.isdigit() for c in raw) - len(number.extension or "") < 7:
        return False
    before, after = text[max(0, start - 2) : start], text[end : end + 2]
    if (before and (before[-1].isalnum() or before[-1] == "_")) or (
        after and (after[0].isalnum() or after[0] == "_")
    ):
        return False  # part of a hash, a UUID or an identifier
    if re.fullmatch(r"\d[.:,]", before) or re.fullmatch(r"[.:,/]\d", after):
        return False
    if before.endswith(("/", "=", "#", "v")) and raw.isdigit():
        return False  # a path segment, an id parameter, an issue number
    if raw.count(".") == 1 or raw.lstrip("(").lstrip("+") in _INT_LIMITS:
        return False  # a decimal (+9.869604), or a 32-bit limit written in code
    bare = raw.lstrip("(")
    if bare.isdigit() and (len(bare) not in lengths or _in_number_list(text, end - len(bare), end)):
        return False  # a bare run is a phone only at a national length, and not as a constant in code
    if phonenumbers.is_valid_number(number):
        return True
    return _PHONE_LAYOUT_RE.search(raw) is not None
