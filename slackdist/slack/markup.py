"""Slack mrkdwn -> plain text: mentions, channels, links, escapes and emoji; code left as written.

Rules (the README's "Prepare" section, "Cleaning keeps knowledge"):

- ``<@U123>`` / ``<@U123|name>`` -> ``@Display Name`` (the label when the id is unknown, else
  ``@unknown-user``; never the raw id); ``<#C123|general>`` -> ``#general``; ``<!here>`` -> ``@here``;
  ``<!subteam^S1|@team>`` -> ``@team``; ``<!date^...|fallback>`` -> fallback.
- ``<https://x.y>`` -> ``https://x.y``; ``<https://x.y|label>`` -> ``label (https://x.y)`` when the label
  differs from the url; ``<mailto:a@b.c|a@b.c>`` -> ``a@b.c``.
- ``&amp; &lt; &gt;`` decoded; ``:emoji:`` short names -> Unicode where the ``emoji`` package knows them.
- Code (```` ```fenced``` ```` blocks and ```inline``` spans) keeps its markup as written. Slack escapes
  ``& < >`` inside code as well, so code gets the entity decoding and nothing else.

Entity decoding runs to a fixed point (``&amp;lt;`` -> ``<``), everywhere. That loses a literal ``&lt;``
typed into a message (rare) but makes the cleaner idempotent and guarantees that no ``&amp;``/``&lt;``/``&gt;``
survives; :func:`decode_entities` is the same decoding the report uses to check that code blocks survive.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache

UNKNOWN_USER = "unknown-user"
UNKNOWN_CHANNEL = "unknown-channel"

# Code: a fence (may span lines, may be empty) or an inline span (one line). Fences are tried first.
_CODE_RE = re.compile(r"```.*?```|`[^`\n]+`", re.DOTALL)
# Any one-line <...> without nested angle brackets; _replace_angle decides whether it is Slack markup.
# (Slack markup never spans lines; a rewrite that removed a newline could re-pair backticks around code.)
_ANGLE_RE = re.compile(r"<([^<>\n]+)>")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
# :name: not glued to a letter or digit on either side ("12:30:45", "1:100:2" stay as they are).
# The ':' comes before the lookbehind (which then checks the character before it) so the pattern
# starts with a literal, which the regex engine scans for quickly: ~3x faster on text with links.
_EMOJI_RE = re.compile(r":(?<![A-Za-z0-9]:)([a-z0-9_+'\-]+):(?![A-Za-z0-9])")
_SKIN_TONES = {f"skin-tone-{i}": chr(0x1F3FB + i - 2) for i in range(2, 7)}
# What the report counts as raw markup / escapes left outside code (DESIGN "Quality figures").
_RAW_MARKUP_RE = re.compile(r"<[@#!][^<>\n]*>|<(?:https?|mailto):[^<>\n]*>|&(?:amp|lt|gt);")
_MAX_PASSES = 4


@dataclass
class MarkupContext:
    """What the cleaner needs to know about the workspace.

    Attributes:
        users: user id -> display name (without the ``@``). Any mapping works; see ``from_users``.
        channels: channel id -> channel name (without the ``#``).
        emoji_unicode: turn ``:emoji:`` short names into Unicode where one exists.
    """

    users: Mapping[str, str] = field(default_factory=dict)
    channels: Mapping[str, str] = field(default_factory=dict)
    emoji_unicode: bool = True

    @classmethod
    def from_users(cls, users: Mapping, channels: Iterable, *, emoji_unicode: bool = True) -> MarkupContext:
        """Build a context from ``load_users`` output and ``list_channels`` output.

        The user mapping is a live view: names that the reader learns later (from ``user_profile`` of
        users missing in users.json) are seen by the cleaner too.
        """
        return cls(
            users=_NameView(users),
            channels={c.id: c.name for c in channels},
            emoji_unicode=emoji_unicode,
        )


class _NameView(Mapping):
    """Read-only ``user id -> name`` view over a ``dict[str, UserInfo]``."""

    def __init__(self, users: Mapping) -> None:
        self._users = users

    def __getitem__(self, key: str) -> str:
        return self._users[key].name

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        # Mapping.get goes through __getitem__ and catches KeyError: this runs for every mention.
        info = self._users.get(key)
        return default if info is None else info.name

    def __iter__(self):
        return iter(self._users)

    def __len__(self) -> int:
        return len(self._users)


def decode_entities(text: str) -> str:
    """Decode ``&amp; &lt; &gt;`` (the only escapes Slack writes) until none is left, in linear time.

    The result is what replacing the three entities again and again until none is left gives
    (``&amp;amp;lt;`` -> ``&amp;lt;`` -> ``&lt;`` -> ``<``), without the pass per level that made a long
    ``&amp;amp;amp;...`` chain quadratic. Only a decoded ``&`` can form a new entity, and only with the
    text after it, so each chain ``&(amp;)*`` followed by ``lt;``/``gt;`` decodes at once to ``<``/``>``,
    and one that is not to ``&``. (The three rules never overlap, so every order of replacing them
    ends in the same text.)
    """
    if "&" not in text:
        return text
    if "&amp;" not in text:  # no '&' can be decoded, so no new entity can form: one pass is final
        return text.replace("&lt;", "<").replace("&gt;", ">")
    return _ENTITY_CHAIN_RE.sub(_decode_chain, text)


_ENTITY_CHAIN_RE = re.compile(r"&(?:amp;)+(?:lt;|gt;)?|&lt;|&gt;")


def _decode_chain(m: re.Match) -> str:
    end = m.group(0)[-3:]
    return "<" if end == "lt;" else ">" if end == "gt;" else "&"


def clean_text(text: str, ctx: MarkupContext) -> str:
    """Slack mrkdwn -> plain text (see the module docstring for the rules).

    Idempotent: ``clean_text(clean_text(x, ctx), ctx) == clean_text(x, ctx)``. Markup that only appears
    after decoding (``&lt;@U1&gt;`` typed literally) is rewritten too, so no raw markup survives outside code.
    """
    if not text:
        return text
    cleaned = _clean_once(text, ctx)
    # One pass is final unless a '<' is left (decoded ``&lt;@U1&gt;``, or literal ``<<@U1>>``) or the text
    # has backticks (a label's backtick is replaced, so code spans may pair differently): then repeat until
    # nothing changes. Both are rare, so the common message is cleaned in one pass.
    if cleaned == text or ("<" not in cleaned and "`" not in text):
        return cleaned
    for _ in range(_MAX_PASSES):
        text, cleaned = cleaned, _clean_once(cleaned, ctx)
        if cleaned == text:
            return cleaned
    return _neutralize(cleaned)


def _clean_once(text: str, ctx: MarkupContext) -> str:
    if "<" not in text and "&" not in text and ":" not in text:
        return text  # fast path: nothing to rewrite
    if "`" not in text:
        return _clean_plain(text, ctx)
    out: list[str] = []
    pos = 0
    for m in _CODE_RE.finditer(text):
        out.append(_clean_plain(text[pos : m.start()], ctx))
        out.append(decode_entities(m.group(0)))
        pos = m.end()
    out.append(_clean_plain(text[pos:], ctx))
    return "".join(out)


def _clean_plain(text: str, ctx: MarkupContext) -> str:
    """Clean text that holds no code: markup first (labels are still escaped), then entities, then emoji."""
    if "<" in text:
        text = _ANGLE_RE.sub(lambda m: _replace_angle(m, ctx), text)
    if "&" in text:
        text = decode_entities(text)
    if ctx.emoji_unicode and text.count(":") > 1:
        text = _EMOJI_RE.sub(_replace_emoji, text)
    return text


def _replace_angle(m: re.Match, ctx: MarkupContext) -> str:
    body = m.group(1)
    head = body[0]
    if head == "@":
        return _mention(body[1:], ctx)
    if head == "#":
        ident, _, label = body[1:].partition("|")
        if label:
            return "#" + _safe(label.lstrip("#"))
        return "#" + _safe(decode_entities(ctx.channels.get(ident.strip()) or UNKNOWN_CHANNEL).lstrip("#"))
    if head == "!":
        return _special(body[1:])
    if _SCHEME_RE.match(body):
        return _link(body)
    return m.group(0)  # "a <b> c" typed literally: not markup


def _mention(body: str, ctx: MarkupContext) -> str:
    ident, _, label = body.partition("|")
    name = ctx.users.get(ident.strip())
    if name:  # names are not Slack-escaped: decode now so the chunk's decoding cannot make markup of them
        return "@" + _safe(decode_entities(name))
    return "@" + _safe(label.lstrip("@") or UNKNOWN_USER)


def _special(body: str) -> str:
    command, _, label = body.partition("|")
    kind = command.split("^", 1)[0]
    if kind in ("here", "channel", "everyone"):
        return "@" + kind
    if kind == "subteam":
        return "@" + _safe(label.lstrip("@") or "team")
    if kind == "date":
        if label:
            return _safe(label)
        parts = command.split("^")
        try:
            return datetime.fromtimestamp(int(parts[1]), UTC).strftime("%Y-%m-%d %H:%M UTC")
        except (IndexError, ValueError, OverflowError, OSError):
            return "a date"
    return _safe(label) if label else "@" + _safe(kind)


def _link(body: str) -> str:
    url, _, label = body.partition("|")
    url = url.strip()
    if url.lower().startswith("mailto:"):
        url = url[len("mailto:") :].split("?", 1)[0]
    elif url.lower().startswith("tel:"):
        url = url[len("tel:") :]
    label = label.strip()
    if not label or _same_target(label, url):
        return _safe(url)
    return f"{_safe(label)} ({_safe(url)})"


def _same_target(label: str, url: str) -> bool:
    """True when the label only repeats the url (Slack writes ``<http://x.com|x.com>`` for typed links)."""
    lab, u = decode_entities(label).rstrip("/"), decode_entities(url).rstrip("/")
    if lab == u:
        return True
    for prefix in ("https://", "http://", "mailto:"):
        if u.startswith(prefix) and u[len(prefix) :] == lab:
            return True
    return False


def _safe(value: str) -> str:
    """Inserted names and labels must not open code spans or new markup in the next pass."""
    if "`" in value or "<" in value or ">" in value:
        value = value.replace("`", "'").replace("<", "‹").replace(">", "›")
    return value


@cache
def _emoji_table() -> dict[str, str]:
    """Short name (without colons) -> emoji, from the ``emoji`` package's English names and aliases."""
    import emoji  # light, but only needed once text holds a :name:

    table: dict[str, str] = {}
    for char, data in emoji.EMOJI_DATA.items():
        if data.get("status", 2) > 2:  # keep fully / minimally qualified emoji only
            continue
        for name in [data.get("en", ""), *data.get("alias", [])]:
            key = name.strip(":").lower()
            if key and key not in table:
                table[key] = char
    for key in list(table):  # Slack spells some names with '-' where the package uses '_'
        table.setdefault(key.replace("_", "-"), table[key])
    table.update(_SKIN_TONES)
    return table


def emoji_for(name: str) -> str | None:
    """The Unicode emoji for a Slack short name (``tada``, ``+1``, ``thumbsup::skin-tone-2``), or None."""
    table = _emoji_table()
    base, _, tone = name.partition("::")
    char = table.get(base.lower())
    if char is None:
        return None
    if tone:
        modifier = _SKIN_TONES.get(tone)
        if modifier is None:
            return None
        char += modifier
    return char


def _replace_emoji(m: re.Match) -> str:
    return _emoji_table().get(m.group(1), m.group(0))


def format_reactions(
    reactions: Iterable[tuple[str, int]], min_count: int = 1, emoji_unicode: bool = True
) -> str:
    """Reactions as one line, e.g. ``[reactions: 👍 3, 🎉 1]``; "" when none reaches ``min_count``.

    Args:
        reactions: (short name, count) pairs as ``Message.reactions`` holds them.
        min_count: keep a reaction when at least this many people used it.
        emoji_unicode: show Unicode where one exists, else ``:name:``.
    """
    parts = []
    for name, count in reactions:
        if count < min_count:
            continue
        shown = emoji_for(name) if emoji_unicode else None
        parts.append(f"{shown or ':' + _safe(name) + ':'} {count}")
    return f"[reactions: {', '.join(parts)}]" if parts else ""


def _neutralize(text: str) -> str:
    """Last resort when passes do not settle (names that contain markup): defuse what is left."""

    def defuse(chunk: str) -> str:
        return _RAW_MARKUP_RE.sub(
            lambda m: m.group(0).replace("<", "‹").replace(">", "›").replace("&", "＆"), chunk
        )

    out, pos = [], 0
    for m in _CODE_RE.finditer(text):
        out.append(defuse(text[pos : m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(defuse(text[pos:]))
    return "".join(out)


def split_code(text: str) -> list[tuple[bool, str]]:
    """Split text into (is_code, chunk) pieces, in order; code pieces keep their backticks."""
    pieces: list[tuple[bool, str]] = []
    pos = 0
    for m in _CODE_RE.finditer(text):
        if m.start() > pos:
            pieces.append((False, text[pos : m.start()]))
        pieces.append((True, m.group(0)))
        pos = m.end()
    if pos < len(text):
        pieces.append((False, text[pos:]))
    return pieces


def code_blocks(text: str) -> list[str]:
    """The contents of the fenced (```` ``` ````) blocks in a text, without the fences, as written."""
    if "```" not in text:
        return []
    return [m.group(0)[3:-3] for m in _CODE_RE.finditer(text) if m.group(0).startswith("```")]


def find_raw_markup(text: str) -> list[str]:
    """Raw Slack markup (``<@U…>``, ``<#C…>``, ``<!…>``, ``<http…>``, ``<mailto:…>``) and ``&amp;``-style
    escapes outside code. After ``clean_text`` this is always empty."""
    # A match outside code is also a match of the whole text: one scan settles the common clean turn.
    if ("<" not in text and "&" not in text) or not _RAW_MARKUP_RE.search(text):
        return []
    found: list[str] = []
    for is_code, chunk in split_code(text):
        if not is_code:
            found.extend(_RAW_MARKUP_RE.findall(chunk))
    return found
