"""Conversation -> chat record (roles, persona, system prompt), token budget, train/validation/test split.

A record is ``{"messages": [{"role", "content"}, ...], "meta": {...}}``: the system prompt first,
then user / assistant alternating, user first, assistant last.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from slackdist.config import DEFAULT_SYSTEM_PROMPT, PERSONA_SYSTEM_PROMPT, DataConfig, split_fractions
from slackdist.data.conversations import Conversation, Turn, WindowPlan, split_group, split_windows
from slackdist.errors import SlackdistError, first_line
from slackdist.model.chat_formats import LLAMA3

CHARS_PER_TOKEN = 4
# Without a tokenizer: the default model's (Llama 3) tokens per message besides its content; with
# --tokenizer the overhead is measured through the model family's own chat template.
ESTIMATED_MESSAGE_OVERHEAD = LLAMA3.message_overhead
SPLIT_NAMES = ("train", "validation", "test")


def format_system_prompt(
    template: str,
    *,
    workspace: str,
    channel: str,
    persona: str | None = None,
    participants: Sequence[str] = (),
) -> str:
    """Fill ``{workspace}``, ``{channel}``, ``{persona}`` and ``{participants}`` into a system prompt template.

    With a persona and the stock template, the stock persona template is used instead, so training,
    chat, eval and serve build the same prompt from the same config. Other braces in a custom
    template are left alone (no ``str.format``).

    A DM or group DM has no channel name (its folder is a ``D…`` id): pass its ``participants``, and
    the stock templates say "This conversation is a direct message between Ann and Bob." instead of
    naming a channel; in a custom template ``{channel}`` becomes "Ann and Bob (direct message)".

    Args:
        template: the template (``data.system_prompt``).
        workspace: workspace name.
        channel: channel name, with or without the leading ``#``.
        persona: the person the assistant speaks as, if any.
        participants: for a DM or group DM, the (redacted) names of the people in the conversation.
    """
    if persona and template == DEFAULT_SYSTEM_PROMPT:
        template = PERSONA_SYSTEM_PROMPT
    names = _join_names(participants)
    if participants:
        kind = "direct message" if len(participants) <= 2 else "group direct message"
        if template in (DEFAULT_SYSTEM_PROMPT, PERSONA_SYSTEM_PROMPT):
            template = template.replace(
                _CHANNEL_SENTENCE, f"This conversation is a {kind} between {{participants}}."
            )
        channel = f"{names} ({kind})"
    values = {
        "workspace": workspace,
        "channel": channel.lstrip("#"),
        "persona": persona or "",
        "participants": names,
    }
    out = template
    for key, value in values.items():
        out = out.replace("{" + key + "}", value)
    return out


_CHANNEL_SENTENCE = "This conversation is from #{channel}."  # in both stock templates (tested)


def _join_names(names: Sequence[str], last: str = "and") -> str:
    """``Ann``, ``Ann and Bob``, ``Ann, Bob and Cat`` (``last="or"``: ``Ann or Bob``)."""
    names = list(names)
    if len(names) <= 1:
        return "".join(names)
    return f"{', '.join(names[:-1])} {last} {names[-1]}"


def persona_names(spec: str | None) -> list[str]:
    """The people ``--as`` names: ``"Ann, @Bob"`` -> ``["Ann", "Bob"]`` (each once, in order)."""
    names = (n.strip().lstrip("@").strip() for n in (spec or "").split(","))
    return list(dict.fromkeys(n for n in names if n))


def persona_label(names: Sequence[str]) -> str:
    """How a system prompt names the persona(s) a record answers as: ``Ann``, ``Ann or Bob``.

    With several personas, each record's prompt names the ones that answer in it, so a record where
    only Ann answers has exactly the prompt of an Ann-only run: what `chat --as Ann` gives.
    """
    return _join_names(names, "or")


# ---------------------------------------------------------------- token counting


class TokenCounter(Protocol):
    """Tokens a record costs; the window planner and the budget check use the same counter."""

    def turn(self, content: str) -> int:
        """Tokens one message with this content adds to a record."""

    def base(self, system: str) -> int:
        """Tokens of a record holding only this system prompt."""

    def record(self, messages: list[dict[str, str]]) -> int:
        """Tokens of the whole rendered record."""


class CharTokenCounter:
    """~4 characters a token plus the Llama 3 template's per-message overhead (no tokenizer needed)."""

    @staticmethod
    def for_length(n_chars: int) -> int:
        """Tokens of one message whose content has ``n_chars`` characters."""
        return -(-n_chars // CHARS_PER_TOKEN) + ESTIMATED_MESSAGE_OVERHEAD  # ceil, in integers

    def turn(self, content: str) -> int:
        return self.for_length(len(content))

    def base(self, system: str) -> int:
        return 1 + self.turn(system)

    def record(self, messages: list[dict[str, str]]) -> int:
        ceil_tokens = sum(-(-len(m["content"]) // CHARS_PER_TOKEN) for m in messages)
        return 1 + ceil_tokens + ESTIMATED_MESSAGE_OVERHEAD * len(messages)


class HFTokenCounter:
    """Counts with a real tokenizer: the full record through its chat template.

    Per-turn costs (used to plan windows) are the content's tokens plus the template's
    per-message overhead, measured once; the final check renders the whole record.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        probe = "x"
        system = [{"role": "system", "content": probe}]
        pair = [{"role": "user", "content": probe}, {"role": "assistant", "content": probe}]
        # What one more user/assistant pair costs, per message: where a family puts the system prompt
        # (Mistral: in the last user turn, Gemma: in the first) cancels out.
        added = self.record(system + pair + pair) - self.record(system + pair) - 2 * self._encode(probe)
        self.overhead = max(0, -(-added // 2))

    def _encode(self, text: str) -> int:
        # Special-token strings in Slack text are text (as training encodes them: `encode_chat`).
        return len(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def turn(self, content: str) -> int:
        return self._encode(content) + self.overhead

    def base(self, system: str) -> int:
        return self.record([{"role": "system", "content": system}])

    def record(self, messages: list[dict[str, str]]) -> int:
        from slackdist.model.template import encode_chat  # with the tokenizer: training's own count

        return len(encode_chat(self.tokenizer, messages)[0])


def load_token_counter(tokenizer: str | None) -> TokenCounter:
    """A counter for ``--tokenizer ID|DIR``, or the ~4 characters a token estimate when None.

    Raises:
        SlackdistError: the tokenizer cannot be loaded.
    """
    if not tokenizer:
        return CharTokenCounter()
    # prepare may fork workers after the tokenizer has run; without this, Rust tokenizers warn on fork.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers import AutoTokenizer  # only when asked: data prep must stay light

        from slackdist.model.families import read_model_type
        from slackdist.model.template import ensure_chat_template

        # The model family's chat template, as `slackdist train` will give it (model.chat_template=auto).
        tok = ensure_chat_template(
            AutoTokenizer.from_pretrained(tokenizer), model_type=read_model_type(tokenizer), source=tokenizer
        )
    except (OSError, ValueError) as e:
        raise SlackdistError(f"{tokenizer}: cannot load tokenizer ({first_line(e)})") from None
    return HFTokenCounter(tok)


# ---------------------------------------------------------------- roles


@dataclass
class PersonaMatcher:
    """Who ``--as NAME`` is: a user id, or a name (case-insensitive) among the person's names."""

    name: str
    user_ids: frozenset[str] = frozenset()

    def __call__(self, turn: Turn) -> bool:
        if turn.speaker_id is not None and (turn.speaker_id in self.user_ids or turn.speaker_id == self.name):
            return True
        return turn.speaker.casefold() == self.name.casefold()


@dataclass
class BuiltRecord:
    """A record (or why there is none) and which turns of the conversation reached it.

    Attributes:
        record: the chat record, or None when the conversation gives none.
        reason: why there is no record, else None.
        used_turns: ``Turn.index`` of each turn whose text is in the record.
        tokens: tokens of the record (as rendered; also set when it is over the budget).
        turns: the Turn objects of ``used_turns``, in the same order (so the report need not look them up).
        groups: the turns behind each user/assistant message, in message order (``messages[1:]``).
    """

    record: dict[str, Any] | None
    reason: str | None = None
    used_turns: list[int] = field(default_factory=list)
    tokens: int = 0
    turns: list[Turn] = field(default_factory=list)
    groups: list[list[Turn]] = field(default_factory=list)


Part = tuple[str, str, list[Turn]]  # (role, content, the turns it holds)
_DM_KINDS = ("dm", "mpim")


def _prefixed(turn: Turn, speaker_names: bool) -> str:
    return f"{turn.speaker}: {turn.text}" if speaker_names else turn.text


def alternate_roles(n_turns: int) -> list[tuple[str, int, int]]:
    """Roles for ``n_turns`` turns: ``(role, first, end)`` spans, user first, assistant last, no turn left out.

    Roles are counted back from the last turn, which is always the assistant: the message that
    closes a conversation (often the answer that settles a thread) is the one most worth learning.
    With an even number of turns that is plain alternation. With an odd number, the first turn
    would land on the assistant; it cannot open a record, so the opening two turns form one user
    message: the question and the first reply to it together are the context the rest answers.
    Dropping the trailing turn instead (the recipe's first version) lost 9% of the messages that
    had a reply partner; two overlapping windows would keep them but train on half the conversations
    twice. Fewer than two turns give no spans.
    """
    if n_turns < 2:
        return []
    spans = [("user", 0, 2)] if n_turns % 2 else []
    start = 2 if n_turns % 2 else 0
    for i in range(start, n_turns):
        spans.append(("assistant" if (n_turns - 1 - i) % 2 == 0 else "user", i, i + 1))
    return spans


def _alternate(turns: list[Turn], speaker_names: bool) -> list[Part]:
    """user, assistant, ..., assistant over every turn (see :func:`alternate_roles`)."""
    texts = [_prefixed(t, speaker_names) for t in turns]
    return [
        (role, texts[a] if b - a == 1 else "\n".join(texts[a:b]), turns[a:b])
        for role, a, b in alternate_roles(len(turns))
    ]


def _persona(
    turns: list[Turn], is_persona: Callable[[Turn], bool], speaker_names: bool, named_answers: bool = False
) -> list[Part]:
    """The persona's turns are the assistant, everyone else the user; same-role runs merged.

    ``named_answers`` (several personas): assistant turns keep the speaker's name too, so the model
    learns which of them says what, and a merged run of two personas' turns stays readable. The
    opening turn is then the user's even when a persona speaks it, so a conversation between two
    of them (one asks, the other answers) gives a record, as it does when only the second is the
    persona.
    """
    runs: list[tuple[str, list[Turn]]] = []
    for i, t in enumerate(turns):
        role = "assistant" if is_persona(t) and not (named_answers and i == 0) else "user"
        if runs and runs[-1][0] == role:
            runs[-1][1].append(t)
        else:
            runs.append((role, [t]))
    while runs and runs[0][0] == "assistant":  # the record must open with a user turn
        runs.pop(0)
    if runs and runs[-1][0] == "user":  # ... and end with the persona answering
        runs.pop()
    out = []
    for role, group in runs:
        # One persona's own words are not prefixed: the model should answer as them, not write "Name:".
        names = speaker_names and (role == "user" or named_answers)
        out.append((role, "\n".join(_prefixed(t, names) for t in group), group))
    return out


# Re-planning rounds when the rendered records come out longer than the per-turn estimate (a real
# tokenizer merges across turn boundaries): each round lowers the budget by the largest overshoot.
_MAX_REPLANS = 8


class RecordBuilder:
    """Turns conversation windows into records, with the config's roles, names and token budget."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        workspace: str,
        counter: TokenCounter | None = None,
        persona: PersonaMatcher | Sequence[PersonaMatcher] | None = None,
    ) -> None:
        self.cfg = cfg
        self.workspace = workspace
        self.counter = counter or CharTokenCounter()
        self.persona_mode = cfg.roles == "persona" or bool(cfg.persona)
        if persona is None:
            personas = [PersonaMatcher(name) for name in persona_names(cfg.persona)]
        else:
            personas = [persona] if isinstance(persona, PersonaMatcher) else list(persona)
        if self.persona_mode and not personas:
            raise SlackdistError("persona roles need --as NAME")
        self.personas = personas
        # The prompt's persona when the record is not known yet (window planning): all of them.
        self.persona_label = persona_label([p.name for p in personas]) if self.persona_mode else None
        self._system_cache: dict[tuple[str, tuple[str, ...], str | None], tuple[str, int]] = {}
        self._channel_prompts: dict[str, str] = {}

    def is_persona(self, turn: Turn) -> bool:
        """Whether one of the ``--as`` people speaks this turn."""
        return any(p(turn) for p in self.personas)

    def _channel_prompt(self, channel: str) -> str:
        prompt = self._channel_prompts.get(channel)
        if prompt is None:
            prompt = self._channel_prompts[channel] = self.system(channel)[0]
        return prompt

    def system(
        self, channel: str, participants: Sequence[str] = (), persona: str | None = None
    ) -> tuple[str, int]:
        """(system prompt, its base token cost) for a channel, or for a DM between ``participants``.

        ``persona``: who the record answers as (default: every ``--as`` person, in persona mode).
        """
        persona = persona or self.persona_label
        key = (channel, tuple(participants), persona)
        if key not in self._system_cache:
            prompt = format_system_prompt(
                self.cfg.system_prompt,
                workspace=self.workspace,
                channel=channel,
                persona=persona,
                participants=participants,
            )
            self._system_cache[key] = (prompt, self.counter.base(prompt))
        return self._system_cache[key]

    def _answering(self, parts: list[Part]) -> str | None:
        """With several personas, the ones that answer in a record (``persona_label``); else None."""
        if len(self.personas) < 2:
            return None
        turns = [t for role, _, group in parts if role == "assistant" for t in group]
        return persona_label([p.name for p in self.personas if any(p(t) for t in turns)])

    @staticmethod
    def participants(conv: Conversation) -> list[str]:
        """Who a DM or group DM's system prompt names (its speakers); nobody for a channel."""
        return conv.speakers if conv.channel.kind in _DM_KINDS else []

    def turn_cost(self, turn: Turn) -> int:
        """What one turn costs in a record (for window planning)."""
        if type(self.counter) is CharTokenCounter:
            # The estimate needs only the length of "Name: text": skip building the string (once per turn).
            n = len(turn.text) + (len(turn.speaker) + 2 if self.cfg.speaker_names else 0)
            return CharTokenCounter.for_length(n)
        return self.counter.turn(_prefixed(turn, self.cfg.speaker_names))

    def build(self, conv: Conversation) -> BuiltRecord:
        """One record from one conversation window.

        Reasons when there is no record: ``too_short`` (fewer than two turns left after the role
        rules), ``persona_never_answers``, ``over_token_budget`` (the rendered record is longer than
        the budget: :meth:`build_conversation` then cuts the conversation into smaller windows).
        """
        answering = None
        if self.persona_mode:
            named = len(self.personas) > 1
            parts = _persona(conv.turns, self.is_persona, self.cfg.speaker_names, named)
            if not any(role == "assistant" for role, _, _ in parts):
                return BuiltRecord(None, "persona_never_answers")
            answering = self._answering(parts)
        else:
            parts = _alternate(conv.turns, self.cfg.speaker_names)
        if len(parts) < 2:
            return BuiltRecord(None, "too_short")
        if conv.channel.kind in _DM_KINDS:
            system, _ = self.system(conv.channel.name, conv.speakers, answering)
        elif answering is not None:
            system, _ = self.system(conv.channel.name, (), answering)
        else:  # the common case, without building a cache key
            system = self._channel_prompt(conv.channel.name)
        messages = [{"role": "system", "content": system}] + [{"role": r, "content": c} for r, c, _ in parts]
        tokens = self.counter.record(messages)
        if tokens > self.cfg.max_tokens:
            return BuiltRecord(None, "over_token_budget", tokens=tokens)
        groups = [group for _, _, group in parts]
        used_turns = [t for group in groups for t in group]
        record = {
            "messages": messages,
            "meta": {
                "conversation_id": conv.id,
                "channel": conv.channel.name,
                "thread_ts": conv.thread_ts,
                "start": used_turns[0].start,
                "end": used_turns[-1].end,
                "speakers": list(dict.fromkeys(t.speaker for t in used_turns)),
            },
        }
        return BuiltRecord(record, None, [t.index for t in used_turns], tokens, used_turns, groups)

    def build_conversation(
        self, conv: Conversation
    ) -> tuple[WindowPlan, list[tuple[Conversation, BuiltRecord]]]:
        """Window one whole conversation and build a record from each window.

        The windows are planned with per-turn token estimates; when a rendered record comes out over
        the budget anyway, the whole conversation is planned again with a budget lower by the
        largest overshoot (so every window keeps its place and id), never by dropping turns.

        Returns:
            The window plan and (window, built record) for each eligible window.
        """
        cfg = self.cfg
        _, base_cost = self.system(conv.channel.name, self.participants(conv))
        over = 0
        for _ in range(_MAX_REPLANS):
            plan = split_windows(
                conv,
                min_turns=cfg.min_turns,
                max_turns=cfg.max_turns,
                overlap=cfg.window_overlap,
                max_tokens=cfg.max_tokens,
                turn_cost=self.turn_cost,
                base_cost=base_cost + over,
            )
            built = [(window, self.build(window)) for window in plan.windows]
            excess = 0
            for _, b in built:
                if b.reason == "over_token_budget":
                    excess = max(excess, b.tokens - cfg.max_tokens)
            if not excess:
                break
            over += excess
        return plan, built


def validate_record(record: Any) -> list[str]:
    """Problems with one record's shape (empty when it is valid)."""
    problems = []
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return ["not an object with a 'messages' list"]
    msgs = record["messages"]
    if len(msgs) < 3:
        problems.append("fewer than 3 messages")
    for i, m in enumerate(msgs):
        want = "system" if i == 0 else _TURN_ROLES[i % 2]
        if not (isinstance(m, dict) and m.get("role") == want and isinstance(m.get("content"), str)):
            problems.append(f"message {i}: expected role {want!r} with string content")
    if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") != "assistant":
        problems.append("last message is not the assistant")
    meta = record.get("meta")
    if not isinstance(meta, dict) or meta.keys() != _META_KEYS:
        problems.append(f"meta must have exactly {sorted(_META_KEYS)}")
    return problems


_TURN_ROLES = ("assistant", "user")  # role of message i (i >= 1) is _TURN_ROLES[i % 2]
_META_KEYS = frozenset({"conversation_id", "channel", "thread_ts", "start", "end", "speakers"})


# ---------------------------------------------------------------- split


def group_of(record: dict[str, Any]) -> str:
    """The key every window of one conversation shares (the split keeps them together)."""
    return split_group(record["meta"]["conversation_id"])


@dataclass(frozen=True)
class Split:
    """Which split (0 train, 1 validation, 2 test) each conversation goes to; decided here and only here.

    By ``hash``: a stable hash of the conversation's group (:func:`group_of`) with ``seed``, known as
    soon as its first record is (:meth:`now`), so records go straight into their split's file. By
    ``time``: the newest conversations go to test, the next newest to validation, known once every
    conversation's start is (:meth:`assign`). Every window and part of a conversation shares its
    group, so no conversation appears in two splits.

    Attributes:
        fractions: (train, validation, test), summing to 1.
        by: ``hash`` or ``time``.
        seed: seed of the hash split.
    """

    fractions: tuple[float, float, float]
    by: Literal["hash", "time"] = "hash"
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: DataConfig) -> Split:
        """The split that ``--split``, ``--split-by`` and ``--seed`` ask for."""
        return cls(split_fractions(cfg.split), cfg.split_by, cfg.seed)

    def now(self, group: str) -> int | None:
        """The split of a conversation group when the group alone decides it (by hash), else None."""
        return self._by_hash(group) if self.by == "hash" else None

    def assign(self, starts: Mapping[str, float]) -> dict[str, int]:
        """The split of every conversation group.

        Args:
            starts: conversation group -> its start time (the earliest ``meta.start`` of its records).
        """
        if self.by == "hash":
            return {group: self._by_hash(group) for group in starts}
        order = sorted(starts, key=lambda g: (starts[g], g))
        n = len(order)
        n_test = round(n * self.fractions[2])
        n_val = round(n * self.fractions[1])
        n_train = max(0, n - n_test - n_val)
        out = {}
        for i, g in enumerate(order):
            out[g] = 0 if i < n_train else (1 if i < n_train + n_val else 2)
        return out

    def _by_hash(self, group: str) -> int:
        digest = hashlib.sha256(f"{self.seed}:{group}".encode()).digest()
        x = int.from_bytes(digest[:8], "big") / 2**64
        acc = 0.0
        for i, frac in enumerate(self.fractions):
            acc += frac
            if x < acc:
                return i
        return len(self.fractions) - 1 if self.fractions[-1] > 0 else 0
