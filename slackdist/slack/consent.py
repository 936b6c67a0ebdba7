"""Consent: leaving people out of a dataset, wherever their words or names could reach it.

`prepare --exclude-users A,B`, `prepare --only-users A,B` (an opt-in workspace: everyone else is left
out) and `slackdist forget USER` name people by display, real or user name, user id or e-mail from
users.json (:func:`resolve_people`). A :class:`Consent` then works on the raw export, before anything
is grouped:

- their messages never become part of a turn (``Message.excluded``, counted as ``excluded_user`` in
  the report), in every channel, thread and DM, thread_broadcast copies included;
- what other people's messages carry of them is taken out of the raw item (:meth:`Consent.scrub_item`):
  a message of theirs shared or quoted as an attachment, a file they uploaded, their reactions (a
  reaction's count loses them), a thread_broadcast's ``root`` copy of their message;
- a mention of them becomes ``@someone`` (:meth:`Consent.names`), and their names, user id and e-mail
  typed into anyone's text, code included, become ``someone`` / ``[EMAIL]`` (:meth:`Consent.scrub`),
  as do conversation names that hold them (a group DM's folder, ``mpdm-ann--bob-1``).

A name or word of a name shared with someone who stays (another person's user name, given name or
full name) is left in free text, since it names that person too; a mention by user id is always
replaced. A left-out person's given name that is also an ordinary word is replaced as that word too:
consent comes before the text of others. Bots are not people: ``--only-users`` keeps them (they are
still dropped unless ``--include-bots``).
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from slackdist.errors import SlackdistError
from slackdist.slack.metadata import SLACKBOT_ID, UNKNOWN_USER, UserInfo

SOMEONE = "someone"
"""What a left-out person's mention (``@someone``) and name become."""
EMAIL = "[EMAIL]"
HASH_PREFIX = "sha256:"
"""How report.json writes the people a dataset leaves out (see :func:`hashed_user_id`)."""
_WORD_RE = re.compile(r"\w+")


def hashed_user_id(salt: str, user_id: str) -> str:
    """A user id as report.json records it: ``sha256:`` + 32 hex digits of the id keyed by the export.

    The key is the export's identity (``slackdist.provenance.export_identity``), so the record names
    nobody to a reader without the export, while `prepare` and `forget`, which hold the export, can
    match it back to the person (``--exclude-users sha256:...`` is accepted like a name).
    """
    return HASH_PREFIX + hashlib.sha256(f"{salt}\0{user_id}".encode()).hexdigest()[:32]


def name_forms(user: UserInfo) -> list[str]:
    """Every way users.json names a person: user id, user, display and real name, e-mail."""
    forms = (user.id, user.username, user.display_name, user.real_name, user.name, user.email)
    return list(dict.fromkeys(f for f in forms if f and f != UNKNOWN_USER))


def _given_name(user: UserInfo) -> str:
    """The first word of a real name of two or more words ("Ada" of "Ada Lovelace"), else ""."""
    words = user.real_name.split()
    return words[0] if len(words) >= 2 else ""


def resolve_people(
    names: Iterable[str], users: Mapping[str, UserInfo], *, flag: str, salt: str, where: str
) -> frozenset[str]:
    """The user ids named by ``names`` (case-insensitive; every user a name matches).

    Args:
        names: display, real or user names, user ids, e-mails, or ``sha256:...`` as report.json writes them.
        users: the export's users (``load_users``).
        flag: the option being resolved, for the error message.
        salt: the export's identity, the key of :func:`hashed_user_id`.
        where: the users file, for the error message.

    Raises:
        SlackdistError: a name matches nobody; the one line lists the closest names.
    """
    index: dict[str, set[str]] = {}
    spelled: dict[str, str] = {}
    for user in users.values():
        for form in name_forms(user):
            index.setdefault(form.casefold(), set()).add(user.id)
            spelled.setdefault(form.casefold(), form)
        index.setdefault(hashed_user_id(salt, user.id), set()).add(user.id)
    found: set[str] = set()
    for name in names:
        key = name.strip().lstrip("@").casefold()
        if not key:
            continue
        ids = index.get(key)
        if not ids:
            close = difflib.get_close_matches(key, list(spelled), n=4, cutoff=0.6)
            hint = f"; closest: {', '.join(spelled[c] for c in close)}" if close else ""
            raise SlackdistError(
                f"{where}: {flag} {name.strip()!r}: nobody in users.json has that name, user id or e-mail{hint}"
            )
        found |= ids
    return frozenset(found)


@dataclass(frozen=True)
class Consent:
    """Who is left out, and how their traces are taken out of everyone else's messages.

    Attributes:
        left_out: user ids left out by name (``--exclude-users``, ``forget``).
        kept: with ``--only-users``, the user ids kept (the people named, and every bot); None otherwise.
        pattern: the left-out people's names, user ids and e-mails as they may be typed (None: none).
        replacements: lowercased form -> what it becomes (e-mails ``[EMAIL]``; the rest ``someone``).
        author_names: casefolded names an attachment's ``author_name`` / ``author_subname`` may give.
    """

    left_out: frozenset[str]
    kept: frozenset[str] | None
    pattern: re.Pattern[str] | None
    replacements: Mapping[str, str]
    author_names: frozenset[str]

    @classmethod
    def build(
        cls,
        users: Mapping[str, UserInfo],
        *,
        exclude: Iterable[str] = (),
        only: Iterable[str] = (),
        salt: str,
        where: str,
    ) -> Consent | None:
        """The consent that ``--exclude-users`` and ``--only-users`` ask for, or None when neither is set.

        Raises:
            SlackdistError: a name matches nobody in users.json.
        """
        exclude, only = list(exclude), list(only)
        if not exclude and not only:
            return None
        left_out = resolve_people(exclude, users, flag="--exclude-users", salt=salt, where=where)
        kept = None
        if only:
            opted = resolve_people(only, users, flag="--only-users", salt=salt, where=where)
            bots = {u.id for u in users.values() if u.is_bot} | {SLACKBOT_ID}
            kept = frozenset((opted | bots) - left_out)
        gone = [u for u in users.values() if u.id in left_out or (kept is not None and u.id not in kept)]
        staying = [u for u in users.values() if u.id not in {g.id for g in gone}]
        replacements = _replacements(gone, staying)
        return cls(
            left_out=left_out,
            kept=kept,
            pattern=_pattern(replacements),
            replacements=replacements,
            author_names=frozenset(f.casefold() for u in gone for f in name_forms(u)),
        )

    def excludes(self, user_id: Any) -> bool:
        """Whether this user id's messages, mentions and traces are left out (bots' own posts are not)."""
        if type(user_id) is not str or not user_id:
            return False
        return user_id in self.left_out or (self.kept is not None and user_id not in self.kept)

    def scrub(self, text: str) -> str:
        """Left-out people's names and user ids -> ``someone``, their e-mails -> ``[EMAIL]``."""
        if self.pattern is None or not text:
            return text
        return self.pattern.sub(lambda m: self.replacements.get(m.group(0).lower(), SOMEONE), text)

    def names(self, names: Mapping[str, str]) -> Mapping[str, str]:
        """A ``user id -> name`` mapping for mentions in which left-out people are ``someone``."""
        return _ConsentNames(names, self)

    def scrub_item(self, item: dict[str, Any]) -> dict[str, Any]:
        """A kept message's raw item without what it holds of left-out people (a copy, if anything changed).

        Attachments they authored (a shared or quoted message of theirs), files they uploaded, their
        reactions, and a ``root`` copy of their message. Values of unexpected types are left for the
        reader, which warns about them.
        """
        changes: dict[str, Any] = {}
        attachments = item.get("attachments")
        if type(attachments) is list:
            kept = [a for a in attachments if not (type(a) is dict and self._authored(a))]
            if len(kept) != len(attachments):
                changes["attachments"] = kept
        files = item.get("files")
        if type(files) is list:
            kept = [f for f in files if not (type(f) is dict and self.excludes(f.get("user")))]
            if len(kept) != len(files):
                changes["files"] = kept
        for key in ("file", "root"):
            value = item.get(key)
            if type(value) is dict and self.excludes(value.get("user")):
                changes[key] = None
        reactions = item.get("reactions")
        if type(reactions) is list:
            kept_reactions = list(self._reactions(reactions))
            if kept_reactions != reactions:
                changes["reactions"] = kept_reactions
        if not changes:
            return item
        out = dict(item)
        for key, value in changes.items():
            if value is None:
                del out[key]
            else:
                out[key] = value
        return out

    def _authored(self, attachment: dict[str, Any]) -> bool:
        if self.excludes(attachment.get("author_id")):
            return True
        return any(
            type(attachment.get(k)) is str
            and attachment[k].strip().lstrip("@").casefold() in self.author_names
            for k in ("author_name", "author_subname")
        )

    def _reactions(self, reactions: list[Any]) -> Iterator[Any]:
        for r in reactions:
            users = r.get("users") if type(r) is dict else None
            if type(users) is not list:
                yield r
                continue
            others = [u for u in users if not self.excludes(u)]
            gone = len(users) - len(others)
            if not gone:
                yield r
                continue
            count = r.get("count")
            count = count - gone if type(count) is int else len(others)
            if count > 0:
                yield {**r, "users": others, "count": count}


def _replacements(gone: list[UserInfo], staying: list[UserInfo]) -> dict[str, str]:
    """Lowercased form -> replacement, for every form of a left-out person that names nobody who stays."""
    taken: set[str] = set()
    for user in staying:
        for form in (user.username, user.display_name, user.real_name, user.name):
            if form:
                taken.add(form.lower())
                taken.update(w.lower() for w in _WORD_RE.findall(form))
    out: dict[str, str] = {}
    for user in gone:
        for form in [*name_forms(user), _given_name(user)]:
            key = form.lower()
            if len(key) >= 2 and key not in taken and key != SOMEONE:
                out[key] = EMAIL if form == user.email else SOMEONE
    return out


def _spaced(char: str) -> bool:
    """Whether words of this character's script are set apart by spaces (not CJK), so a name needs a boundary."""
    return (char.isalnum() or char == "_") and ord(char) < 0x2E80


def _pattern(forms: Iterable[str]) -> re.Pattern[str] | None:
    """One case-insensitive regex for every form, on word boundaries where its script has them.

    The forms are compiled as a trie (``per(?:son 7(?:0)?|...)``), not a flat alternation: an
    opt-in workspace leaves hundreds of names out, and a flat alternation tries each of them at
    every position of every message (8x the whole `prepare` at 450 forms); the trie tries only the
    branches of the characters there. Longer forms win: each branch is greedy and backtracks.
    """
    groups: dict[tuple[bool, bool], list[str]] = {}
    for form in forms:
        groups.setdefault((_spaced(form[0]), _spaced(form[-1])), []).append(form)
    if not groups:
        return None
    parts = []
    for (head, tail), members in sorted(groups.items(), reverse=True):
        parts.append((r"(?<!\w)" if head else "") + f"(?:{_trie(members)})" + (r"(?!\w)" if tail else ""))
    return re.compile("|".join(parts), re.IGNORECASE)


def _trie(words: Iterable[str]) -> str:
    """A regex matching exactly ``words``, shaped as their trie."""
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}
    return _branches(root)


def _branches(node: dict[str, Any]) -> str:
    options = [re.escape(char) + _branches(child) for char, child in sorted(node.items()) if char]
    if not options:
        return ""
    body = options[0] if len(options) == 1 else f"(?:{'|'.join(options)})"
    return f"(?:{body})?" if "" in node else body


class _ConsentNames(Mapping):
    """``user id -> name`` in which every left-out user id (known or not) is ``someone``."""

    def __init__(self, names: Mapping[str, str], consent: Consent) -> None:
        self._names = names
        self._consent = consent

    def __getitem__(self, key: str) -> str:
        return SOMEONE if self._consent.excludes(key) else self._names[key]

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return SOMEONE if self._consent.excludes(key) else self._names.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
