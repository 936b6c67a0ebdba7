"""Cleaning: a raw :class:`Message` becomes a :class:`Post`, its text cleaned and redacted.

Mentions, channels and links are rewritten, entities decoded and emoji turned into Unicode
(``markup.py``); shared files and reactions are written into the text; secrets, e-mails and phone
numbers are replaced with placeholders (``redact.py``), in the speaker's name too. Code blocks are
kept as written, and each block is remembered as it was before redaction, so the report can check
that the records still hold it byte for byte.

A :class:`Post` is what the rest of the pipeline works on (``data/conversations.py`` groups posts
into conversations): nothing after this step sees raw mrkdwn or an unredacted secret.
"""

from __future__ import annotations

import re
from collections import Counter

from slackdist.config import DataConfig
from slackdist.slack.consent import Consent
from slackdist.slack.markup import MarkupContext, clean_text, code_blocks, decode_entities, format_reactions
from slackdist.slack.messages import Message
from slackdist.slack.post import Post
from slackdist.slack.redact import Redactor

_MENTION_RE = re.compile(r"<@([^|>\s]+)")


class Cleaner:
    """Raw Message -> cleaned, redacted Post (mentions, links, emoji, files, reactions, speaker name).

    With a ``consent``, left-out people's names, ids and e-mails typed into the text (code too) are
    replaced (``Consent.scrub``), and mentions of them are ``@someone`` (``ctx`` should use
    ``Consent.names``).
    """

    def __init__(
        self, cfg: DataConfig, ctx: MarkupContext, redactions: Counter, consent: Consent | None = None
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.consent = consent
        self.redactor = Redactor(keep_emails=cfg.keep_emails, keep_phones=cfg.keep_phones)
        self.redactions = redactions
        self._names: dict[str, tuple[str, Counter]] = {}  # display name -> (redacted, what was redacted)

    def __call__(self, msg: Message) -> Post | None:
        """The post of a human message, or None when nothing is left after cleaning."""
        raw = msg.text
        text = clean_text(raw, self.ctx).strip() if raw else ""
        reactions = msg.reactions if self.cfg.reactions else None
        if msg.files or reactions:
            parts = [text] if text else []
            # A legacy file_share's text already says "uploaded a file: <url|name>": name each file once.
            parts += [f"[file: {name}]" for name in dict.fromkeys(msg.files) if name not in text]
            if reactions:
                line = format_reactions(reactions, self.cfg.min_reaction_count, self.cfg.emoji_unicode)
                if line:
                    parts.append(line)
            text = "\n".join(parts)
        if not text:
            return None
        if self.consent is not None:
            text = self.consent.scrub(text)
        full = self.redactor.redact_into(text, self.redactions)
        code: tuple[str, ...] = ()
        changed: tuple[bool, ...] = ()
        if "```" in raw:
            # What the report checks the records against: each block as written, entities decoded,
            # before redaction (a block that held a secret is then reported as changed, "redacted").
            code = tuple(decode_entities(b) for b in code_blocks(raw))
            changed = tuple(self._cleared(b) != b for b in code)
        # The display name goes through the same redactor (an e-mail or phone number as a name).
        name = self._names.get(msg.user_name)
        if name is None:
            name = self._names[msg.user_name] = self.redactor.redact(msg.user_name)
        if name[1]:
            self.redactions.update(name[1])
        mentions = self._mentions(raw) if "<@" in raw else ()
        return Post.from_message(msg, full, code, name[0], changed, mentions)

    def _cleared(self, block: str) -> str:
        """A code block after redaction and consent's scrubbing (to tell why it is not intact)."""
        block = self.redactor.redact(block)[0]
        return block if self.consent is None else self.consent.scrub(block)

    def _mentions(self, raw: str) -> tuple[str, ...]:
        ids = dict.fromkeys(m.strip() for m in _MENTION_RE.findall(raw))
        return tuple(i for i in ids if i and not (self.consent is not None and self.consent.excludes(i)))
