"""Problems in an export that are safe to skip: counted per kind, described without quoting the data.

Every reader of the export (files, metadata, day files, messages) counts what it skips in one
:class:`Warnings`; ``--strict`` turns the first one into an error. A warning names the file and
describes a bad value by its JSON type and size (:func:`describe`), never by its content, so a
token hidden in a malformed item cannot reach the report.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from slackdist.errors import SlackdistError, first_line


@dataclass(frozen=True)
class ExportWarning:
    kind: str  # e.g. "bad_day_file", "missing_users", "unknown_user", "bad_metadata"
    where: str  # the file it concerns (export path + member)
    detail: str  # what is wrong, one line

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"


class Warnings:
    """Counts problems that were safe to skip, per kind, with the first few examples.

    ``--strict`` turns any of them into an error (:meth:`raise_if_any`). Notes (``note``) are informational
    (e.g. a non-day file skipped) and never fail a strict run.
    """

    def __init__(self, max_examples: int = 5) -> None:
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[ExportWarning]] = {}
        self.notes: Counter[str] = Counter()

    def add(self, kind: str, where: str, detail: str) -> None:
        """Count one warning; keep it as an example while fewer than ``max_examples`` of its kind are kept."""
        self.counts[kind] += 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < self.max_examples:
            examples.append(ExportWarning(kind, where, detail))

    def note(self, kind: str, count: int = 1) -> None:
        """Count something informational (never an error, not even with ``--strict``)."""
        self.notes[kind] += count

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __len__(self) -> int:
        return self.total

    def __bool__(self) -> bool:
        return self.total > 0

    def first(self) -> ExportWarning | None:
        for examples in self.examples.values():
            if examples:
                return examples[0]
        return None

    def raise_if_any(self) -> None:
        """For ``--strict``.

        Raises:
            SlackdistError: naming the first warning's file and problem, and how many there were.
        """
        first = self.first()
        if first is not None:
            more = f" (and {self.total - 1} more warnings)" if self.total > 1 else ""
            raise SlackdistError(f"{first}{more}; --strict turns warnings into errors")

    def summary(self) -> dict[str, Any]:
        """Counts and examples as plain data for report.json."""
        return {
            "counts": dict(self.counts),
            "examples": {k: [str(w) for w in v] for k, v in self.examples.items()},
            "notes": dict(self.notes),
        }

    def merge(self, other: Warnings) -> None:
        """Add another collector's counts, notes and examples (up to ``max_examples`` per kind)."""
        self.counts.update(other.counts)
        self.notes.update(other.notes)
        for kind, examples in other.examples.items():
            mine = self.examples.setdefault(kind, [])
            mine.extend(examples[: max(0, self.max_examples - len(mine))])


def describe(value: Any) -> str:
    """A JSON value described by its type and size, for warnings that must not quote data."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return "a non-finite number"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    return type(value).__name__


def error_reason(e: BaseException) -> str:
    """An exception as a warning or error quotes it: its first line, at most 160 characters."""
    return first_line(e)[:160]


TOO_DEEP = "JSON nested deeper than the parser's limit (about 1,000 levels)"


def json_problem(e: BaseException) -> str:
    """Why a JSON file could not be parsed, in the words of a warning."""
    return TOO_DEEP if isinstance(e, RecursionError) else error_reason(e)
