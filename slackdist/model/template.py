"""The chat template a tokenizer gets, and the one function that turns messages into token ids.

Training (labels), chat, serve and eval all build ids through `encode_chat`, so the prompt a tuned
model sees at inference is byte-for-byte the prefix it was trained on. The templates themselves
(one per family, each with `{% generation %}` markers) are in `slackdist.model.chat_formats`;
which one a model gets is decided in `slackdist.model.families`.

Special tokens are text. Only the template writes control tokens: a message that quotes
`<|eot_id|>` or `<|im_start|>system` (ML teams talk about chat templates) is encoded as the ordinary
text tokens of those characters, so it can neither end a training turn mid-reply nor forge a system
turn in chat or serve. `encode_chat` wraps the control-token strings found in the messages in two
private-use characters that no message contains, renders the template, and encodes the result piece
by piece: the template's control tokens (the unmarked ones) become their ids, and everything between
them is encoded by a copy of the tokenizer that has no control tokens. Control tokens are the
tokenizer's special tokens plus any other added token the template names (the rule of transformers'
`sanitize_control_tokens`, which cannot return the assistant mask training needs). For text without
control-token strings, ids and mask equal `apply_chat_template`'s (tested for every family).
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import re
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer, pre_tokenizers
from transformers.utils.chat_template_utils import render_jinja_template

from slackdist.model.chat_formats import CHAT_FORMATS, GENERIC, LLAMA3, ChatFormat
from slackdist.model.families import has_generation_markers, missing_tokens, resolve_chat_format

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
LLAMA3_CHAT_TEMPLATE = LLAMA3.template
GENERIC_CHAT_TEMPLATE = GENERIC.template
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
)
TOKENIZER_TEMPLATE = "tokenizer"
"""`chat_template_name` of a template that is none of ours: the tokenizer's own."""


def apply_chat_format(tokenizer: PreTrainedTokenizerBase, fmt: ChatFormat) -> PreTrainedTokenizerBase:
    """Give the tokenizer this format's template, and a pad token if it has none (changed in place).

    Raises:
        ValueError: the vocabulary lacks one of the format's control tokens, or (generic) has no eos.
    """
    missing = missing_tokens(fmt, tokenizer)
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)} token for the {fmt.name} chat template")
    if fmt is GENERIC and tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos token to end turns with")
    tokenizer.chat_template = fmt.template
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = next((t for t in fmt.pad_tokens if t in vocab), tokenizer.eos_token)
    return tokenizer


def ensure_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    chat_template: str = "auto",
    *,
    model_type: str | None = None,
    source: str = "model",
) -> PreTrainedTokenizerBase:
    """Give the tokenizer the chat template `model.chat_template` selects, and a pad token.

    Args:
        tokenizer: a Hugging Face fast tokenizer; changed in place.
        chat_template: auto, llama3, chatml, mistral, gemma, phi3, tokenizer (`slackdist.model.families`),
            or generic (what a model folder records for a model of no known family).
        model_type: `config.json`'s `model_type`, for `auto`.
        source: the model's name, for messages.

    Returns:
        The same tokenizer.

    Raises:
        ValueError: a choice the tokenizer cannot render (missing tokens, no generation markers).
    """
    fmt = (
        GENERIC
        if chat_template == GENERIC.name
        else resolve_chat_format(chat_template, tokenizer, model_type, source=source)
    )
    if fmt is not None:
        return apply_chat_format(tokenizer, fmt)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_template_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """Which template the tokenizer renders: a `chat_formats` name, or "tokenizer" (one it brought itself)."""
    template = getattr(tokenizer, "chat_template", None)
    return next((f.name for f in CHAT_FORMATS.values() if f.template == template), TOKENIZER_TEMPLATE)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a reply: eos, and every family's end-of-turn tokens the template writes.

    A token counts when the vocabulary has it and the chat template names it (`<|eot_id|>` and
    `<|end_of_text|>` for Llama 3, `<|im_end|>` for ChatML, `<end_of_turn>` for Gemma, ...).
    """
    vocab = tokenizer.get_vocab()
    template = getattr(tokenizer, "chat_template", None) or ""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    fmt = CHAT_FORMATS.get(chat_template_name(tokenizer))
    stops = fmt.stop_tokens if fmt is not None else ()
    for f in CHAT_FORMATS.values():
        stops += tuple(t for t in f.stop_tokens if t in template)
    for tok in stops:
        if tok in vocab and vocab[tok] not in ids:
            ids.append(vocab[tok])
    return ids


def _check_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': str}}, got {m!r:.80}"
            )
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


# ---------------------------------------------------------------- control tokens are the template's only


@dataclass(frozen=True)
class _Control:
    """One control token: its id, and whether it swallows the whitespace before / after it."""

    id: int
    lstrip: bool
    rstrip: bool


@dataclass
class _Piece:
    """Text between two of the template's control tokens, as chunks of the rendered chat."""

    chunks: list[tuple[int, str]]
    """(position in the rendered chat, text), in order; control strings from messages included."""

    def text(self) -> str:
        return "".join(text for _, text in self.chunks)

    def strip_end(self) -> int | None:
        """Drop trailing whitespace (an lstrip control token swallows it); returns where it began, if any."""
        began = None
        while self.chunks:
            at, text = self.chunks[-1]
            kept = text.rstrip()
            if len(kept) < len(text):
                began = at + len(kept)
            if kept:
                self.chunks[-1] = (at, kept)
                break
            self.chunks.pop()
        return began

    def rendered_spans(self, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Map [start, end) offsets in `text()` to spans in the rendered chat."""
        starts = list(itertools.accumulate((len(t) for _, t in self.chunks), initial=0))[:-1]

        def position(i: int) -> int:
            k = max(0, bisect.bisect_right(starts, i) - 1)
            return self.chunks[k][0] + (i - starts[k])

        return [(position(a), position(b - 1) + 1 if b > a else position(a)) for a, b in offsets]


@dataclass(frozen=True)
class _Markers:
    """Two characters that no message of a chat contains, wrapped around the control-token strings
    found in its messages, so the rendered chat tells them apart from the template's own."""

    start: str
    end: str

    @classmethod
    def absent_from(cls, texts: list[str]) -> _Markers:
        """The first pair of private-use characters (plane 15) none of `texts` contains."""
        for code in range(0xF0000, 0xFFFFD, 2):
            start, end = chr(code), chr(code + 1)
            if not any(start in text or end in text for text in texts):
                return cls(start, end)
        raise ValueError("the messages contain every private-use character of plane 15")


@dataclass
class _ChatEncoder:
    """What `encode_chat` needs of one tokenizer and template, built once per tokenizer (`_chat_encoder`)."""

    key: tuple[Any, ...]
    """(chat template, vocabulary size): the encoder is rebuilt when either changes."""
    controls: dict[str, _Control]
    control_re: re.Pattern[str]
    """Any control token's string (longest first)."""
    text: Tokenizer
    """The tokenizer without its control tokens, so their strings encode as text."""
    text_inside: Tokenizer
    """The same for text that does not start the chat: where a Metaspace pre-tokenizer adds "▁" only
    at the start of its input ("first"), it never adds it here, as the tokenizer does after a token."""

    def mark(self, content: str, markers: _Markers) -> str:
        """Wrap every control-token string of a message in the markers."""
        return self.control_re.sub(lambda m: markers.start + m.group(0) + markers.end, content)

    def split(self, rendered: str, markers: _Markers) -> list[_Piece | tuple[str, int, int]]:
        """The rendered chat as text pieces and (control token, start, end) spans, in order."""
        controls = self.control_re.pattern
        # a marked control string (group 1: text from a message) or an unmarked one (group 2: the template's)
        piece_re = re.compile(f"{re.escape(markers.start)}({controls}){re.escape(markers.end)}|({controls})")
        out: list[_Piece | tuple[str, int, int]] = []
        piece = _Piece([])
        swallow = False  # the last control token swallows the whitespace after it

        def add(at: int, text: str) -> None:
            nonlocal swallow
            if swallow:
                kept = text.lstrip()
                name, start, end = out[-1]
                out[-1] = (name, start, end + len(text) - len(kept))
                at, text = at + len(text) - len(kept), kept
                swallow = not text
            if text:
                piece.chunks.append((at, text))

        pos = 0
        for m in piece_re.finditer(rendered):
            add(pos, rendered[pos : m.start()])
            if m.group(1) is not None:
                add(m.start(1), m.group(1))
            elif m.group(2) is not None:
                name, start = m.group(2), m.start()
                if self.controls[name].lstrip:
                    began = piece.strip_end()
                    start = start if began is None else began
                if piece.chunks:
                    out.append(piece)
                piece = _Piece([])
                out.append((name, start, m.end()))
                swallow = self.controls[name].rstrip
            pos = m.end()
        add(pos, rendered[pos:])
        if piece.chunks:
            out.append(piece)
        return out

    def encode(self, rendered: str, markers: _Markers) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of a rendered chat and each token's span in it; only unmarked control strings become control tokens.

        Raises:
            ValueError: the tokenizer turns a control-token string into that token even as plain text.
        """
        parts = self.split(rendered, markers)
        texts = [p for p in parts if isinstance(p, _Piece)]
        encodings = (
            self.text_inside.encode_batch([p.text() for p in texts], add_special_tokens=False)
            if texts
            else []
        )
        if texts and parts[0] is texts[0]:  # text at the very start of the chat
            encodings[0] = self.text.encode(texts[0].text(), add_special_tokens=False)
        by_piece = dict(zip(map(id, texts), encodings, strict=True))
        control_ids = {c.id for c in self.controls.values()}
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        for part in parts:
            if isinstance(part, _Piece):
                encoding = by_piece[id(part)]
                forged = control_ids.intersection(encoding.ids)
                if forged:
                    raise ValueError(
                        f"the tokenizer encodes {self.text.id_to_token(min(forged))!r} as a control token "
                        "even in plain text"
                    )
                ids += encoding.ids
                spans += part.rendered_spans(encoding.offsets)
            else:
                name, start, end = part
                ids.append(self.controls[name].id)
                spans.append((start, end))
        return ids, spans


_ENCODERS: weakref.WeakKeyDictionary[Any, _ChatEncoder] = weakref.WeakKeyDictionary()
"""One `_ChatEncoder` per tokenizer object (building one copies the tokenizer: ~0.2 s at 49k tokens)."""


def _prepending_metaspaces(pre_tokenizer: Any) -> list[Any]:
    """The Metaspace pre-tokenizers (also inside a Sequence) that add "▁" only at the start of their input."""
    if isinstance(pre_tokenizer, pre_tokenizers.Metaspace) and pre_tokenizer.prepend_scheme == "first":
        return [pre_tokenizer]
    found = []
    if isinstance(pre_tokenizer, pre_tokenizers.Sequence):
        for i in itertools.count():
            try:
                found += _prepending_metaspaces(pre_tokenizer[i])
            except IndexError:
                break
    return found


def _text_tokenizer(backend: Tokenizer, controls: dict[str, _Control], special: set[str]) -> Tokenizer:
    """A copy of the backend tokenizer that encodes every control token's string as text."""
    state = backend.to_str()
    if set(controls) - special:  # control tokens that are not special: only dropping them makes them text
        data = json.loads(state)
        data["added_tokens"] = [t for t in data.get("added_tokens") or [] if t["content"] not in controls]
        state = json.dumps(data)
    text = Tokenizer.from_str(state)
    text.encode_special_tokens = True  # special tokens' strings are text
    text.no_truncation()
    text.no_padding()
    return text


def _chat_encoder(tokenizer: PreTrainedTokenizerBase) -> _ChatEncoder:
    """The tokenizer's `_ChatEncoder`, built on first use and whenever its template or vocabulary changes.

    Raises:
        ValueError: a tokenizer without a Rust backend (a "slow" tokenizer) or without a chat template.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        raise ValueError(
            "the tokenizer has no chat template (see slackdist.model.template.ensure_chat_template)"
        )
    key = (template, len(tokenizer))
    cached = _ENCODERS.get(tokenizer)
    if cached is not None and cached.key == key:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer (tokenizer.json) ")
    controls = {
        token.content: _Control(token_id, token.lstrip, token.rstrip)
        for token_id, token in tokenizer.added_tokens_decoder.items()
        if token.content.strip() and (token.special or token.content in template)
    }
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    alternatives = "|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True)) or "(?!)"
    text = inside = _text_tokenizer(backend, controls, special)
    if _prepending_metaspaces(text.pre_tokenizer):
        # After a control token the tokenizer never adds the "▁" it adds at the start of the text.
        inside = _text_tokenizer(backend, controls, special)
        for metaspace in _prepending_metaspaces(inside.pre_tokenizer):
            metaspace.prepend_scheme = "never"
    encoder = _ChatEncoder(
        key=key,
        controls=controls,
        control_re=re.compile(alternatives),
        text=text,
        text_inside=inside,
    )
    _ENCODERS[tokenizer] = encoder
    return encoder


def _assistant_mask(spans: list[tuple[int, int]], generation: list[tuple[int, int]]) -> list[int]:
    """1 for every token that overlaps a `{% generation %}` span (as transformers' `apply_chat_template`)."""
    mask = [0] * len(spans)
    k = 0
    for i, (start, end) in enumerate(spans):
        while k < len(generation) and start >= generation[k][1]:
            k += 1
        if k == len(generation):
            break
        if end > generation[k][0]:
            mask[i] = 1
    return mask


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and the mask of tokens an assistant wrote.

    The one function training, chat, serve and eval use to build ids. The mask is 1 on
    each assistant turn's content and its closing end-of-turn token, 0 on the begin
    token, headers, system and user turns and the generation prompt. Control-token strings
    inside the messages are encoded as text (module docstring).

    Args:
        tokenizer: a fast tokenizer with a chat template that has generation markers
            (see `ensure_chat_template`).
        messages: `[{"role": "system"|"user"|"assistant", "content": str}, ...]`; extra keys are ignored.
        add_generation_prompt: append the assistant header, for generating the next reply.

    Returns:
        (input_ids, assistant_mask), two lists of the same length.

    Raises:
        ValueError: a message without a known role or string content, a template without generation
            markers, or a tokenizer that cannot encode a control-token string as text.
    """
    messages = _check_messages(messages)
    encoder = _chat_encoder(tokenizer)
    if not has_generation_markers(tokenizer.chat_template):
        raise ValueError("the chat template has no {% generation %} markers (see ensure_chat_template)")
    markers = _Markers.absent_from([m["content"] for m in messages])
    marked = [{"role": m["role"], "content": encoder.mark(m["content"], markers)} for m in messages]
    rendered, generation = render_jinja_template(
        conversations=[marked],
        chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
        **tokenizer.special_tokens_map,
    )
    ids, spans = encoder.encode(rendered[0], markers)
    return ids, _assistant_mask(spans, generation[0])


def build_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[int]:
    """Ids of a chat prompt ending with the assistant header, ready for `generate`.

    Raises:
        ValueError: as `encode_chat`.
    """
    return encode_chat(tokenizer, messages, add_generation_prompt=True)[0]
