"""What a message holds besides its ``text``: attachments, Block Kit blocks, files and reactions.

A message whose ``text`` is empty takes its text from ``attachments`` (the cards integrations
post), else from ``blocks`` (rich text as the composer writes it, or layout blocks). Blocks become
mrkdwn, escaped like message text, so the cleaner treats both alike. Parts of the wrong JSON type
are noted in ``problems`` (the caller turns them into one ``malformed_item`` warning) and skipped;
every walk over nested blocks is bounded by ``max_depth``.
"""

from __future__ import annotations

from typing import Any

from slackdist.slack.metadata import clean_str
from slackdist.slack.warnings import describe


def _items(value: Any, key: str, problems: list[str]) -> list[Any]:
    """``value`` when it is a list, [] when absent; anything else is noted as a problem and read as []."""
    if type(value) is list:
        return value
    if value is not None:
        problems.append(f"{key} is {describe(value)}, expected a list; skipped")
    return []


def _objects(value: Any, key: str, problems: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of the list ``value``; every other entry is noted as a problem and skipped."""
    found = []
    for i, entry in enumerate(_items(value, key, problems)):
        if type(entry) is dict:
            found.append(entry)
        else:
            problems.append(f"{key}[{i}] is {describe(entry)}, expected an object; skipped")
    return found


def fallback_text(item: dict[str, Any], text: str, problems: list[str], max_depth: int) -> tuple[str, bool]:
    """Text for a message whose ``text`` is empty: attachments, else blocks; and whether it was typed.

    Typed text is a rich_text block (what the composer writes); attachments and layout blocks are cards
    an integration built (see ``Message.is_feed``).
    """
    attachments = _objects(item.get("attachments"), "attachments", problems)
    if attachments:
        from_attachments = _attachments_text(attachments, problems)
        if from_attachments:
            return from_attachments, False
    blocks = _objects(item.get("blocks"), "blocks", problems)
    if blocks:
        return _BlockText(problems, max_depth).blocks(blocks)
    return text, False


def _attachments_text(attachments: list[dict[str, Any]], problems: list[str]) -> str:
    out: list[str] = []
    for i, att in enumerate(attachments):
        parts = [clean_str(att.get(k)) for k in ("pretext", "title", "text")]
        for f in _objects(att.get("fields"), f"attachments[{i}].fields", problems):
            title, value = clean_str(f.get("title")), clean_str(f.get("value"))
            parts.append(f"{title}: {value}" if title and value else title or value)
        parts = [p for p in parts if p]
        if not parts and clean_str(att.get("fallback")):
            parts = [clean_str(att.get("fallback"))]
        out.extend(parts)
    return "\n".join(out)


# ---- rich_text blocks -> mrkdwn. Block text is raw (not HTML-escaped), so it is escaped here and the
# cleaner treats it exactly like a message's `text`.


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class _BlockText:
    """Blocks -> mrkdwn, walking nested rich-text lists at most ``max_depth`` deep.

    Values of the wrong JSON type are noted in ``problems`` and skipped, never converted with ``str()``
    (which would quote them, and recurse without bound into a nested list).
    """

    def __init__(self, problems: list[str], max_depth: int) -> None:
        self.problems = problems
        self.max_depth = max_depth

    def blocks(self, blocks: list[dict[str, Any]]) -> tuple[str, bool]:
        """(mrkdwn, whether a rich_text block gave text)."""
        out: list[str] = []
        typed = False
        for i, block in enumerate(blocks):
            btype = block.get("type")
            if btype == "rich_text":
                elements = _objects(block.get("elements"), f"blocks[{i}].elements", self.problems)
                text = "".join(self._rich(e, 1) for e in elements)
                typed = typed or bool(text.strip())
                out.append(text)
            elif btype in ("section", "header", "context"):
                texts = _objects(block.get("fields"), f"blocks[{i}].fields", self.problems)
                texts += _objects(block.get("elements"), f"blocks[{i}].elements", self.problems)
                head = block.get("text")
                if type(head) is dict:
                    texts.insert(0, head)
                for t in texts:
                    if type(t.get("text")) is str:
                        # mrkdwn text objects are escaped like message text; plain_text ones are raw
                        out.append(t["text"] if t.get("type") == "mrkdwn" else _escape(t["text"]))
        return "\n".join(p for p in out if p), typed

    def _rich(self, element: dict[str, Any], depth: int) -> str:
        etype = element.get("type")
        children = _objects(element.get("elements"), "a rich text element's elements", self.problems)
        if etype == "rich_text_section":
            return "".join(self._inline(e) for e in children)
        if etype == "rich_text_preformatted":
            return "```" + "".join(self._inline(e, in_code=True) for e in children) + "```\n"
        if etype == "rich_text_quote":
            body = "".join(self._inline(e) for e in children)
            return "\n".join("> " + line for line in body.split("\n")) + "\n"
        if etype == "rich_text_list":
            if depth >= self.max_depth:
                self.problems.append(
                    f"rich text lists nested over {self.max_depth} levels; the deeper part skipped"
                )
                return ""
            bullet = "1." if element.get("style") == "ordered" else "-"
            return "".join(f"{bullet} {self._rich(e, depth + 1).strip()}\n" for e in children)
        return "".join(self._inline(e) for e in children)

    def _scalar(self, element: dict[str, Any], key: str, default: str = "") -> str:
        """``element[key]`` as text: strings as they are, numbers written out; other types noted, ''."""
        value = element.get(key)
        if type(value) is str:
            return value
        if type(value) in (int, float):
            return str(value)
        if value is not None:
            self.problems.append(f"a block element's {key} is {describe(value)}, expected a string; skipped")
        return default

    def _inline(self, element: dict[str, Any], in_code: bool = False) -> str:
        etype = element.get("type")
        if etype == "text":
            text = _escape(self._scalar(element, "text"))
            style = element.get("style") if type(element.get("style")) is dict else {}
            if style.get("code") and not in_code and text.strip() and "`" not in text:
                return f"`{text}`"
            return text
        if etype == "link":
            url = self._scalar(element, "url")
            label = self._scalar(element, "text")
            if in_code:
                return _escape(label or url)
            return f"<{url}|{_escape(label)}>" if label else f"<{url}>"
        if in_code:
            return _escape(self._scalar(element, "text") or self._scalar(element, "name"))
        if etype == "user":
            return f"<@{self._scalar(element, 'user_id')}>"
        if etype == "channel":
            return f"<#{self._scalar(element, 'channel_id')}>"
        if etype == "usergroup":
            return f"<!subteam^{self._scalar(element, 'usergroup_id')}>"
        if etype == "broadcast":
            return f"<!{self._scalar(element, 'range', 'here')}>"
        if etype == "emoji":
            return f":{self._scalar(element, 'name')}:"
        if etype == "date":
            return _escape(self._scalar(element, "fallback"))
        return _escape(self._scalar(element, "text"))


def file_names(item: dict[str, Any], text: str, problems: list[str]) -> list[str]:
    """Names of the files shared with a message, each once, leaving out files its text already links.

    The same file can sit in both the legacy ``file`` and ``files[]`` (or twice in ``files[]``), and a
    legacy upload notice's text links the file already ("uploaded a file: <permalink|title>"): adding
    ``[file: name]`` for those would show one file twice in a turn.
    """
    found = []
    legacy = item.get("file")
    if type(legacy) is dict:
        found.append(legacy)
    elif legacy is not None:
        problems.append(f"file is {describe(legacy)}, expected an object; skipped")
    found += _objects(item.get("files"), "files", problems)
    names: list[str] = []
    seen: set[str] = set()
    for f in found:
        if f.get("mode") in ("hidden_by_limit", "tombstone"):
            continue
        name = clean_str(f.get("name")) or clean_str(f.get("title"))
        if not name:
            continue
        file_id = clean_str(f.get("id"))
        key = file_id or name
        if key in seen:
            continue
        seen.add(key)
        permalink = clean_str(f.get("permalink"))
        if (permalink and permalink in text) or (file_id and f"/{file_id}/" in text):
            continue
        names.append(name)
    return names


def reactions(item: dict[str, Any], problems: list[str]) -> list[tuple[str, int]]:
    """(emoji name, count) of each reaction: its ``count``, else how many ``users`` it lists, else 1."""
    out = []
    for r in _objects(item.get("reactions"), "reactions", problems):
        name = clean_str(r.get("name"))
        if not name:
            continue
        count = r.get("count")
        if type(count) is not int or count < 0:
            users = r.get("users")
            count = len(users) if type(users) is list else 1
        out.append((name, count))
    return out
