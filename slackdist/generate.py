"""Reply generation shared by `chat`, `serve`, `eval` and `bench/chat_bench.py`.

Prompts are built only through `slackdist.model.template.build_prompt_ids`, the
function training uses, so the tuned model sees at inference exactly the token
layout it was trained on. Every `generate` call of the process runs on one
long-lived worker thread: replies stream back token by token through a queue,
concurrent callers are served in arrival order, and a `threading.Event` stops a
reply between two tokens.

For merged 16-bit models on CUDA the fast path (`GenerationSettings.fast`) uses a static
KV cache of a fixed size, which makes transformers compile the decode step with
`torch.compile(mode="reduce-overhead")` (CUDA graphs): one compilation per process,
then every reply reuses it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from slackdist.config import ChatConfig
from slackdist.errors import SlackdistError
from slackdist.model.load import InferenceModel
from slackdist.model.template import build_prompt_ids, stop_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Context window of a model without a training config, when neither the settings nor the model say
# less. Llama 3.2 accepts 128k tokens, but a static KV cache is allocated at full size.
DEFAULT_CONTEXT_TOKENS = 4096
FinishReason = Literal["stop", "length", "cancelled"]


class PromptTooLongError(SlackdistError):
    """The prompt leaves no room for a reply in the context window."""

    def __init__(self, prompt_tokens: int, limit: int, reserved: int = 0) -> None:
        self.prompt_tokens = prompt_tokens
        self.limit = limit
        self.reserved = reserved
        room = f" with {reserved} reserved for the reply" if reserved else ""
        super().__init__(
            f"the prompt is {prompt_tokens} tokens; the context holds {limit} tokens{room}: "
            "send a shorter message (or raise --max-context-tokens)"
        )


@dataclass
class GenerationSettings:
    """How one reply is sampled (the `chat` config section, per request in `serve`)."""

    temperature: float = 0.7
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 0.9
    """Nucleus sampling threshold."""
    max_new_tokens: int = 256
    """Longest reply (clipped to what the context leaves)."""
    repetition_penalty: float = 1.1
    """>1 discourages repeating tokens of the prompt and reply."""
    seed: int | None = None
    """Seed set before each reply, so the same prompt gives the same reply."""
    stop: tuple[str, ...] = ()
    """Strings that end the reply (not included in it)."""
    min_new_tokens: int = 0
    """Suppress end-of-turn before this many tokens (benchmarks force a fixed length)."""
    max_context_tokens: int = 0
    """Prompt + reply budget; 0: the length the model was trained on (`context_limit`)."""
    fast: bool | None = None
    """Static KV cache + compiled decode step; None: merged 16-bit models on CUDA (`use_fast_path`)."""

    @classmethod
    def from_config(cls, chat: ChatConfig) -> GenerationSettings:
        """Settings from the `chat` config section."""
        return cls(
            temperature=chat.temperature,
            top_p=chat.top_p,
            max_new_tokens=chat.max_new_tokens,
            repetition_penalty=chat.repetition_penalty,
            seed=chat.seed,
            max_context_tokens=chat.max_context_tokens,
        )

    def replace(self, **changes: Any) -> GenerationSettings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass
class ReplyStats:
    """What one `stream_reply` call did; filled in while it runs."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Generated tokens, the end-of-turn token included."""
    finish_reason: FinishReason | None = None
    first_token_s: float | None = None
    """Seconds from the call to the first generated token."""
    total_s: float = 0.0
    """Seconds from the call to the end of the reply."""
    fast: bool = False
    """Whether the static-cache compiled path was used."""


# ---------------------------------------------------------------- prompts


def with_system_prompt(messages: list[dict[str, str]], system: str) -> list[dict[str, str]]:
    """The messages with `system` as their system prompt, unless they already open with one."""
    if messages and messages[0].get("role") == "system":
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def context_limit(im: InferenceModel, settings: GenerationSettings) -> int:
    """Tokens of prompt + reply the model is asked to handle: `settings.max_context_tokens`, else the
    longest conversation the model was trained on (`train.max_seq_len`), else DEFAULT_CONTEXT_TOKENS;
    never beyond the model's own limit."""
    model_limit = getattr(_text_config(im.model), "max_position_embeddings", None) or DEFAULT_CONTEXT_TOKENS
    if settings.max_context_tokens > 0:
        wanted = settings.max_context_tokens
    else:
        wanted = im.max_seq_len or DEFAULT_CONTEXT_TOKENS
    return min(wanted, model_limit)


def trim_history(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    max_context_tokens: int,
    max_new_tokens: int,
) -> list[dict[str, str]]:
    """Drop the oldest turns (never the system prompt) until prompt + reply fit the context.

    After dropping, the history starts with a user turn again, as every training record does.

    Args:
        tokenizer: the model's tokenizer (with its chat template).
        messages: system prompt (optional) then the turns, newest last.
        max_context_tokens: prompt + reply budget.
        max_new_tokens: tokens kept free for the reply.

    Returns:
        A new list: the system prompt and the newest turns that fit.

    Raises:
        PromptTooLongError: even the newest turn alone does not fit.
    """
    budget = max_context_tokens - max_new_tokens
    system = list(messages[:1]) if messages and messages[0].get("role") == "system" else []
    turns = list(messages[len(system) :])
    n_tokens = 0
    while turns:
        n_tokens = len(build_prompt_ids(tokenizer, system + turns))
        if n_tokens <= budget:
            return system + turns
        turns = turns[1:]
        while len(turns) > 1 and turns[0].get("role") != "user":
            turns = turns[1:]
    raise PromptTooLongError(n_tokens, max_context_tokens, max_new_tokens)


# ---------------------------------------------------------------- the worker thread


class _GenerationThread:
    """One daemon thread that runs every `generate` call of the process, in arrival order.

    torch.compile's CUDA graphs (mode="reduce-overhead") are recorded per thread: the
    cudagraph tree manager lives in thread-local storage (torch/_inductor/cudagraph_trees.py),
    so generating on a fresh thread per reply would record them again for every reply.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="slackdist-generate", daemon=True)
                self._thread.start()
                atexit.register(self.shutdown)
        self._jobs.put(job)

    def shutdown(self) -> None:
        """Let the thread finish its jobs and end (at exit: a daemon thread still inside torch
        when the interpreter tears down can abort the process)."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()


_WORKER = _GenerationThread()
_END = object()


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _is_quantized(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "hf_quantizer", None) is not None or bool(getattr(base, "is_loaded_in_4bit", False))


def use_fast_path(im: InferenceModel, settings: GenerationSettings) -> bool:
    """Whether replies use the static-cache compiled path (see the module docstring).

    By default: merged 16-bit models on CUDA, the configuration measured by bench/chat_bench.py.
    bitsandbytes 4-bit layers do not compile (transformers skips compilation for them), and an
    unmerged adapter is left on the eager path until `chat_bench.py --adapter --fast on` has been
    measured on a GPU.
    """
    if settings.fast is not None:
        return settings.fast
    return im.kind == "merged" and _device(im.model).type == "cuda" and not _is_quantized(im.model)


_STOP_IDS: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()


def _stop_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """`template.stop_token_ids`, once per tokenizer (it builds the whole vocabulary dict: ~0.1 s at 128k)."""
    if tokenizer not in _STOP_IDS:
        _STOP_IDS[tokenizer] = stop_token_ids(tokenizer)
    return _STOP_IDS[tokenizer]


class _StopOnEvent(StoppingCriteria):
    """Ends generation at the next token once any event is set (Ctrl+C, a closed stream)."""

    def __init__(self, events: list[threading.Event]) -> None:
        self.events = events

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _TokenStreamer(BaseStreamer):
    """Puts each generated token id on a queue; `generate` first puts the prompt, which is skipped."""

    def __init__(self, out: queue.SimpleQueue) -> None:
        self.out = out
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.out.put(token)

    def end(self) -> None:
        pass


def _generate_kwargs(
    im: InferenceModel, settings: GenerationSettings, max_new_tokens: int, limit: int, fast: bool
) -> dict[str, Any]:
    sample = settings.temperature > 0
    tokenizer = im.tokenizer
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min(settings.min_new_tokens, max_new_tokens),
        do_sample=sample,
        # Greedy: neutral values, so the model's own sampling defaults raise no "unused flag" warnings.
        temperature=settings.temperature if sample else 1.0,
        top_p=settings.top_p if sample else 1.0,
        repetition_penalty=settings.repetition_penalty,
        eos_token_id=_stop_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    if sample:
        # transformers' default top_k=50 is no OpenAI parameter: sample with top_p alone, as OpenAI does.
        kwargs["top_k"] = 0
    if fast:
        kwargs["cache_implementation"] = "static"
        # One cache size for every reply: the compiled decode step never sees a new shape.
        if hasattr(GenerationConfig(), "max_cache_len"):
            kwargs["max_cache_len"] = limit
    return kwargs


def _generate_job(
    im: InferenceModel,
    prompt_ids: list[int],
    kwargs: dict[str, Any],
    seed: int | None,
    adapter: bool,
    events: list[threading.Event],
    out: queue.SimpleQueue,
) -> None:
    """Runs on the worker thread: one `generate` call, every token onto `out`, then `_END`."""
    try:
        if any(e.is_set() for e in events):  # cancelled while queued
            return
        if seed is not None:
            torch.manual_seed(seed)
        device = _device(im.model)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        ctx = contextlib.nullcontext() if adapter else im.model.disable_adapter()
        with ctx, torch.inference_mode():
            im.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                streamer=_TokenStreamer(out),
                stopping_criteria=StoppingCriteriaList([_StopOnEvent(events)]),
                **kwargs,
            )
    except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, raised there
        out.put(e)
    finally:
        out.put(_END)


class IncrementalDecoder:
    """Token ids -> new text, emitting only complete characters (byte-level BPE splits UTF-8).

    Decodes a short window of ids (the prefix/read offsets used by TGI and vLLM) instead of the
    whole reply at every token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""


class _StopStrings:
    """Holds back text that could be the start of a stop string; cuts the reply at the first one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.hit = False

    def feed(self, piece: str) -> str:
        """Add text; return what is safe to show now."""
        self.text += piece
        if not self.stops:
            return self._emit(len(self.text))
        cuts = [
            i for i in (self.text.find(s, max(0, self.emitted - self.hold)) for s in self.stops) if i >= 0
        ]
        if cuts:
            self.hit = True
            return self._emit(min(cuts))
        return self._emit(len(self.text) - self.hold)

    def flush(self) -> str:
        return "" if self.hit else self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out


# ---------------------------------------------------------------- public API


def stream_reply(
    im: InferenceModel,
    messages: list[dict[str, str]],
    settings: GenerationSettings,
    *,
    stop_event: threading.Event | None = None,
    adapter: bool = True,
    stats: ReplyStats | None = None,
) -> Iterator[str]:
    """Generate the assistant's next turn, yielding text as it is produced.

    Args:
        im: the loaded model and tokenizer.
        messages: the conversation, system prompt first, ending with a user turn.
        settings: sampling settings.
        stop_event: set it (from any thread, e.g. a SIGINT handler) to end the reply at the next token.
        adapter: False answers with the base model (the adapter disabled; adapter models only).
        stats: filled in with token counts, timings and the finish reason.

    Yields:
        Pieces of the reply text, in order; special tokens are not included.

    Raises:
        PromptTooLongError: the prompt leaves no room for a reply.
        SlackdistError: `adapter=False` on a model without an adapter.
        ValueError: malformed messages (from `encode_chat`).
    """
    t0 = time.perf_counter()
    stats = stats if stats is not None else ReplyStats()
    if not adapter and not hasattr(im.model, "disable_adapter"):
        raise SlackdistError(
            "this model has no adapter to disable (a merged model): no base model to compare"
        )
    prompt_ids = build_prompt_ids(im.tokenizer, messages)
    limit = context_limit(im, settings)
    if len(prompt_ids) >= limit:
        raise PromptTooLongError(len(prompt_ids), limit)
    max_new = min(settings.max_new_tokens, limit - len(prompt_ids))
    fast = use_fast_path(im, settings)
    stats.prompt_tokens, stats.fast = len(prompt_ids), fast

    halt = threading.Event()
    events = [halt] + ([stop_event] if stop_event is not None else [])
    tokens: queue.SimpleQueue = queue.SimpleQueue()
    kwargs = _generate_kwargs(im, settings, max_new, limit, fast)
    _WORKER.submit(lambda: _generate_job(im, prompt_ids, kwargs, settings.seed, adapter, events, tokens))

    end_ids = set(_stop_ids(im.tokenizer))
    decoder = IncrementalDecoder(im.tokenizer)
    stops = _StopStrings(settings.stop)
    ended_on_eos = False
    try:
        while (item := tokens.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            if stats.first_token_s is None:
                stats.first_token_s = time.perf_counter() - t0
            stats.completion_tokens += 1
            if item in end_ids:
                ended_on_eos = True
                continue
            if not stops.hit and (piece := stops.feed(decoder.add(item))):
                yield piece
            if stops.hit:
                halt.set()
        if piece := stops.flush():
            yield piece
        if ended_on_eos or stops.hit:
            stats.finish_reason = "stop"
        elif stop_event is not None and stop_event.is_set():
            stats.finish_reason = "cancelled"
        else:
            stats.finish_reason = "length" if stats.completion_tokens >= max_new else "stop"
    finally:
        halt.set()  # also when the caller stops iterating early
        if stats.finish_reason is None:
            stats.finish_reason = "cancelled"
        stats.total_s = time.perf_counter() - t0


def reply(
    im: InferenceModel,
    messages: list[dict[str, str]],
    settings: GenerationSettings,
    **kwargs: Any,
) -> str:
    """The whole reply as one string (see `stream_reply` for the arguments).

    Raises:
        PromptTooLongError: the prompt leaves no room for a reply.
    """
    return "".join(stream_reply(im, messages, settings, **kwargs))


def warm_up(im: InferenceModel, settings: GenerationSettings) -> bool:
    """Compile the fast path now (tens of seconds on a 3B model) instead of in the first reply.

    Returns:
        Whether there was anything to warm up (the fast path is on).
    """
    if not use_fast_path(im, settings):
        return False
    print("compiling the decode step (once per start) ...", file=sys.stderr, flush=True)
    # A few decode steps: CUDA graphs are recorded on the second or third run of the compiled step.
    warm = settings.replace(max_new_tokens=4, min_new_tokens=4, temperature=0.0, stop=())
    reply(im, [{"role": "user", "content": "hi"}], warm)
    return True
