"""`slackdist serve --model-dir DIR`: an OpenAI-compatible chat server (FastAPI + uvicorn).

Endpoints: `POST /v1/chat/completions` (JSON, or server-sent `chat.completion.chunk` events
ending with `data: [DONE]` when `stream` is true), `GET /v1/models`, `GET /health`.
Any OpenAI client works with `base_url=http://HOST:PORT/v1`. Replies are generated one
at a time on the shared generation thread (`slackdist.generate`): concurrent requests
wait their turn. Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with a 4xx status for bad requests (also for what FastAPI would answer with 422).

Every request passes `RequestGuard` before the app sees it: the `Host` header (DNS-rebinding
protection on a loopback address), the API key, a JSON content type and the body-size limit,
the body read and counted as it arrives. Parsing, validation and tokenization then run on a
worker thread, so the event loop (and `/health`) stays responsive during a large request.

One process serves one model at a time; for many concurrent users hand the merged
model to vLLM (`vllm serve MERGED_DIR`), which batches requests.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import json.decoder
import json.scanner
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

# transformers renders chat templates with jinja2 (a dependency of ours, optional in transformers).
from jinja2 import TemplateError

from slackdist.chat import fast_replies, load_model
from slackdist.config import Config, ServeConfig
from slackdist.errors import SlackdistError
from slackdist.generate import (
    GenerationSettings,
    ReplyStats,
    context_limit,
    stream_reply,
    warm_up,
    with_system_prompt,
)
from slackdist.model.load import InferenceModel
from slackdist.model.template import build_prompt_ids

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as e:  # raised while the CLI loads this command: printed as one line
    raise SlackdistError(
        f"slackdist serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'slackdist[serve]'"
    ) from None

MAX_STOP_STRINGS = 4
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# A liveness probe reveals nothing about the model, so it answers without the API key.
OPEN_PATHS = frozenset({"/health"})
API_KEY_ENV = "SLACKDIST_API_KEY"
# OpenAI's seed is an int64; torch.manual_seed raises on anything wider than 64 bits.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Prompts longer than this many characters are measured in pieces first (`_prompt_tokens_at_least`).
COUNT_PIECE_CHARS = 1 << 16
# Tokens a cut between two pieces may add (a word or special token cut in two, counted as parts).
CUT_SLACK_TOKENS = 16
MAX_REPORTED_PROBLEMS = 5
# OpenAI's limit on messages; JSON values (objects, arrays, strings, numbers) a body may hold: a
# 2048-message conversation with content parts and tool schemas stays far below it.
MAX_MESSAGES = 2048
MAX_JSON_VALUES = 20_000


class RequestError(Exception):
    """A request the server refuses: rendered as OpenAI's error JSON."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status
        self.headers = dict(headers or {})

    def response(self, *, close: bool = False) -> JSONResponse:
        """The JSON response; `close` ends the connection after it (the body was not read)."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        headers = self.headers | ({"connection": "close"} if close else {})
        body = error_body(self.message, type=kind, param=self.param, code=self.code)
        return JSONResponse(body, status_code=self.status, headers=headers)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------- who may call, and how much


def is_loopback(host: str) -> bool:
    """Whether a listen address takes only local connections (`localhost`, 127.0.0.0/8, `::1`)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a `Host` header, lower case, without port, brackets or trailing dot.

    `"LocalHost:8000"` -> `"localhost"`, `"[::1]:8000"` -> `"::1"`, `""` -> `""`.
    """
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name = header.rpartition(":")[0] if header.count(":") == 1 else header
    return name.rstrip(".")


@dataclass(frozen=True)
class AccessPolicy:
    """Who may call the server and how large a request may be (enforced by `RequestGuard`)."""

    api_key: str | None = None
    """Required as `Authorization: Bearer KEY` on every path but `/health`; None: no key."""
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS
    """`Host` header names answered (lower case, any port); None: any."""
    max_request_bytes: int = ServeConfig.max_request_bytes
    """Largest request body; a larger one is answered 413 without being read."""

    @classmethod
    def from_config(cls, serve: ServeConfig, environ: Mapping[str, str]) -> AccessPolicy:
        """The policy of `slackdist serve`.

        The key comes from `serve.api_key`, else `$SLACKDIST_API_KEY`. Hosts: `*` in
        `serve.allowed_hosts` answers any; otherwise the loopback names plus the listed ones
        when bound to a loopback address or when names are listed, else any (a server on a
        public address is reached by names we cannot guess: protect it with the key).
        """
        listed = frozenset(host_name(h) for h in serve.allowed_hosts)
        if "*" in listed or not (listed or is_loopback(serve.host)):
            hosts = None
        else:
            hosts = LOOPBACK_HOSTS | listed
        return cls(
            api_key=serve.api_key or environ.get(API_KEY_ENV) or None,
            allowed_hosts=hosts,
            max_request_bytes=serve.max_request_bytes,
        )


class RequestGuard:
    """ASGI middleware: checks every request before the app sees any of it.

    In order: the `Host` header (a web page can reach a loopback server through DNS
    rebinding, but its requests carry the attacker's host name), the API key (compared in
    constant time), a JSON content type on POST (a cross-site "simple" request cannot send
    one without a CORS preflight, which this server never grants), and the body size:
    `Content-Length` first, then a count of the bytes as they arrive (chunked bodies).
    The accepted body, at most `max_request_bytes`, is handed to the app in one message.

    A refusal is OpenAI's error JSON with `Connection: close`: uvicorn would otherwise go on
    reading, and discarding, the rest of an unread body to keep the connection open.
    (Starlette's own `RequestBodyLimitMiddleware` keeps the connection, answers a too-long
    `Content-Length` in plain text on routes that do not read the body, and needs Starlette 1.x.)
    """

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy
        self._key = policy.api_key.encode() if policy.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_headers(scope)
            body = await self._read_body(scope, receive)
        except RequestError as e:
            await e.response(close=True)(scope, receive, send)
            return
        if body is not None:  # None: the client hung up before the body was complete
            await self.app(scope, _replay(body, receive), send)

    def _check_headers(self, scope: Scope) -> None:
        headers = _headers(scope)
        allowed = self.policy.allowed_hosts
        host = headers.get(b"host", b"").decode("latin-1")
        if allowed is not None and host_name(host) not in allowed:
            raise RequestError(
                f"Host {host[:100]!r} is not served here (DNS-rebinding protection); "
                f"start the server with --allowed-hosts NAME to answer other names",
                status=403,
                code="host_not_allowed",
            )
        if self._key is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                raise RequestError(
                    "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.",
                    status=401,
                    code="invalid_api_key",
                    headers={"www-authenticate": "Bearer"},
                )
            if not hmac.compare_digest(token.strip(), self._key):
                raise RequestError(
                    "Incorrect API key provided.",
                    status=401,
                    code="invalid_api_key",
                    headers={"www-authenticate": "Bearer"},
                )
        if scope["method"] == "POST":
            kind = headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
            if kind != b"application/json":
                raise RequestError(
                    "Content-Type must be application/json", status=415, code="unsupported_media_type"
                )

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        # The error is made where it is raised: one kept in a local would hold this frame, and the
        # chunks read so far, in a reference cycle (frame -> error -> traceback -> frame) until the
        # cyclic garbage collector runs.
        limit = self.policy.max_request_bytes
        declared = _headers(scope).get(b"content-length")
        if declared is not None and not declared.isdigit():
            raise RequestError("invalid Content-Length header")
        if declared is not None and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(limit: int) -> RequestError:
    return RequestError(
        f"The request body is larger than this server accepts ({limit} bytes; --max-request-bytes).",
        status=413,
        code="request_too_large",
    )


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """Request headers by lower-case name; the first of repeated ones."""
    return dict(reversed(scope["headers"]))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the whole body once, then the connection's events."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


# ---------------------------------------------------------------- the request


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that this server uses."""

    # Unknown fields (tools, logit_bias, user, ...) are ignored, as lenient OpenAI servers do.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = 1
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)


def _messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """Request messages -> `{"role", "content"}` dicts (developer = system, text parts joined)."""
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise RequestError("only text content parts are supported", param=f"messages.{i}.content")
            content = "".join(p.text for p in content)
        if content is None:
            raise RequestError("message content is required", param=f"messages.{i}.content")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _settings(req: ChatCompletionRequest, base: GenerationSettings) -> GenerationSettings:
    """The server's settings with the request's overrides."""
    if req.n != 1:
        raise RequestError("only n=1 is supported", param="n", code="unsupported_value")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    changes: dict[str, Any] = {"stop": stop, "seed": req.seed if req.seed is not None else base.seed}
    if req.temperature is not None:
        changes["temperature"] = req.temperature
    if req.top_p is not None:
        changes["top_p"] = req.top_p
    return base.replace(**changes)


def _too_long(
    limit: int, prompt_tokens: int, requested: int | None, *, at_least: bool = False
) -> RequestError:
    """OpenAI's context_length_exceeded error."""
    more = "at least " if at_least else ""
    asked = (
        f"{more}{prompt_tokens + requested} tokens ({more}{prompt_tokens} in the messages, "
        f"{requested} in the completion)"
        if requested
        else f"{more}{prompt_tokens} tokens in the messages"
    )
    return RequestError(
        f"This model's maximum context length is {limit} tokens. However, you requested {asked}. "
        "Please reduce the length of the messages or completion.",
        param="messages",
        code="context_length_exceeded",
    )


def _pieces(text: str, size: int) -> Iterator[str]:
    """`text` in pieces of at most `size` characters, each cut before a space where one is near."""
    start = 0
    while len(text) - start > size:
        end = start + size
        space = text.rfind(" ", end - size // 16, end)
        end = space if space > start else end
        yield text[start:end]
        start = end
    yield text[start:]


def _prompt_tokens_at_least(
    tokenizer: Any, messages: list[dict[str, str]], enough: int, piece_chars: int = COUNT_PIECE_CHARS
) -> int | None:
    """A lower bound on the prompt's length in tokens, measured piece by piece until it passes `enough`.

    `build_prompt_ids` on a multi-megabyte prompt holds the GIL for up to ~0.4 s at a time
    (converting, then freeing, an encoding of a million tokens), which stalls the event loop
    and `/health` even from a worker thread, and its encodings (~100 bytes a token) leave
    hundreds of MB in the allocator. Here the rendered prompt is cut into pieces, each encoded
    by `tokenizers` (GIL released) and freed before the next one, and counting stops once
    the bound passes `enough`: a prompt far too long costs one or two pieces. A cut can
    split a token in two, so `CUT_SLACK_TOKENS` per piece are taken off.

    Returns:
        The bound, or None for a tokenizer without a `tokenizers` backend.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    at_least = 0
    for piece in _pieces(text, piece_chars):
        # encode_batch releases the GIL while it works; encode does not.
        (encoding,) = backend.encode_batch([piece], add_special_tokens=False)
        at_least += len(encoding) - CUT_SLACK_TOKENS
        if at_least > enough:
            break
    return at_least


def _check_length(
    im: InferenceModel,
    settings: GenerationSettings,
    messages: list[dict[str, str]],
    req: ChatCompletionRequest,
) -> tuple[GenerationSettings, int]:
    """(settings with max_new_tokens, prompt tokens); 400 when prompt + requested reply exceed the context."""
    limit = context_limit(im, settings)
    requested = req.max_completion_tokens or req.max_tokens
    try:
        if sum(len(m["content"]) for m in messages) > COUNT_PIECE_CHARS:
            at_least = _prompt_tokens_at_least(im.tokenizer, messages, limit - (requested or 1))
            if at_least is not None and at_least + (requested or 1) > limit:
                raise _too_long(limit, at_least, requested, at_least=True)
        n_prompt = len(build_prompt_ids(im.tokenizer, messages))
    except (ValueError, TemplateError) as e:
        raise RequestError(str(e), param="messages") from None
    if n_prompt + (requested or 1) > limit:
        raise _too_long(limit, n_prompt, requested)
    return settings.replace(max_new_tokens=requested or settings.max_new_tokens), n_prompt


class _TooManyValues(Exception):
    pass


def parse_json(body: bytes, max_values: int = MAX_JSON_VALUES) -> Any:
    """A request body as Python values, parsed so that the event loop keeps running meanwhile.

    The standard library's pure-Python scanner (strings still decoded in C) instead of a C or
    Rust parser: those hold the GIL from start to end, 0.1-0.9 s for 4 MB of small objects,
    numbers or empty arrays, during which `/health` cannot answer even though the parse runs on
    a worker thread. Python code gives the GIL up every few milliseconds, and counting values
    stops a body of a million tiny ones after `max_values`. True, false and null are not counted.

    Raises:
        RequestError: not UTF-8 JSON (NaN and Infinity included), nested too deep, or more than
            `max_values` objects, arrays, strings and numbers.
    """
    values = 0

    def counted(parse: Any) -> Any:
        def parse_and_count(*args: Any) -> Any:
            nonlocal values
            values += 1
            if values > max_values:
                raise _TooManyValues
            return parse(*args)

        return parse_and_count

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    decoder = json.JSONDecoder(parse_float=counted(float), parse_int=counted(int), parse_constant=no_constant)
    decoder.parse_object = counted(json.decoder.JSONObject)
    decoder.parse_array = counted(json.decoder.JSONArray)
    decoder.parse_string = counted(json.decoder.scanstring)
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    try:
        return decoder.decode(body.decode("utf-8"))
    except _TooManyValues:
        raise RequestError(
            f"the request body holds more than {max_values} JSON values", code="request_too_complex"
        ) from None
    except RecursionError:
        raise RequestError("the request body is not valid JSON (nested too deep)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN, an integer of over 4300 digits
        raise RequestError(f"the request body is not valid JSON ({e})") from None


def _invalid(error: ValidationError) -> RequestError:
    """Pydantic's complaints as one OpenAI 400 (where FastAPI would answer 422)."""
    problems, params = [], []
    for err in error.errors(include_url=False, include_input=False):
        loc = ".".join(str(x) for x in err["loc"])
        params.append(loc)
        problems.append(f"{loc or 'body'}: {err['msg']}")
    if len(problems) > MAX_REPORTED_PROBLEMS:
        rest = len(problems) - MAX_REPORTED_PROBLEMS
        problems = [*problems[:MAX_REPORTED_PROBLEMS], f"and {rest} more"]
    return RequestError("; ".join(problems), param=params[0] or None, code="invalid_value")


@dataclass
class PreparedRequest:
    """A chat completion request checked and ready for the generation thread."""

    request: ChatCompletionRequest
    messages: list[dict[str, str]]
    """The conversation the model answers, system prompt first."""
    settings: GenerationSettings
    prompt_tokens: int


def prepare_request(
    body: bytes, im: InferenceModel, settings: GenerationSettings, system_prompt: str | None
) -> PreparedRequest:
    """Parse, validate and measure one request body (seconds for a multi-megabyte one: call it off the event loop).

    Args:
        body: the raw JSON body (already limited in size by `RequestGuard`).
        im: the loaded model (its tokenizer measures the prompt).
        settings: the server's default sampling settings.
        system_prompt: put in front of messages that have no system message.

    Returns:
        The request, its messages, its settings and the prompt's length in tokens.

    Raises:
        RequestError: invalid JSON or fields, or a prompt the context cannot hold.
    """
    try:
        req = ChatCompletionRequest.model_validate(parse_json(body))
    except ValidationError as e:
        raise _invalid(e) from None
    messages = _messages(req)
    if system_prompt is not None:
        messages = with_system_prompt(messages, system_prompt)
    req_settings, n_prompt = _check_length(im, _settings(req, settings), messages, req)
    return PreparedRequest(req, messages, req_settings, n_prompt)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def build_app(
    im: InferenceModel,
    settings: GenerationSettings,
    *,
    model_name: str = "slackdist",
    system_prompt: str | None = None,
    policy: AccessPolicy | None = None,
) -> FastAPI:
    """The FastAPI app serving one loaded model.

    Args:
        im: the loaded model.
        settings: default sampling settings; requests override temperature, top_p, max tokens, seed, stop.
        model_name: the id `/v1/models` reports and replies carry.
        system_prompt: put in front of requests that have no system message (the training one).
        policy: API key, accepted hosts and body limit (default: no key, loopback names, 4 MiB).

    Returns:
        The app (run it with uvicorn).
    """
    created = int(time.time())
    app = FastAPI(title="slackdist", version="1")
    app.add_middleware(RequestGuard, policy=policy or AccessPolicy())

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return RequestError(str(exc.detail), status=exc.status_code).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback; the client gets OpenAI's shape instead of plain text.
        return RequestError("The server had an error processing your request.", status=500).response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "slackdist"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await request.body()  # complete and within the limit: RequestGuard read it
        prepared = await run_in_threadpool(prepare_request, body, im, settings, system_prompt)
        req, messages, req_settings = prepared.request, prepared.messages, prepared.settings
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _sse(im, messages, req_settings, completion_id, model_name, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        stats = ReplyStats()
        text = await run_in_threadpool(lambda: "".join(stream_reply(im, messages, req_settings, stats=stats)))
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": _finish(stats.finish_reason),
                }
            ],
            "usage": _usage(stats.prompt_tokens or prepared.prompt_tokens, stats.completion_tokens),
        }

    return app


async def _sse(
    im: InferenceModel,
    messages: list[dict[str, str]],
    settings: GenerationSettings,
    completion_id: str,
    model_name: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events of one streamed completion; a closed connection stops generation."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[Any] = asyncio.Queue()
    done = object()
    stop = threading.Event()
    stats = ReplyStats()

    def send(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            stop.set()

    def pump() -> None:
        try:
            for piece in stream_reply(im, messages, settings, stop_event=stop, stats=stats):
                send(piece)
        except Exception as e:  # noqa: BLE001 - reported to the client as an error event
            send(e)
        finally:
            send(done)

    def event(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model_name,
            "system_fingerprint": None,
            "choices": choices,
        }
        return event(body | extra)

    def delta(content: dict[str, Any], finish: str | None = None) -> str:
        return chunk([{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}])

    loop.run_in_executor(None, pump)
    try:
        yield delta({"role": "assistant", "content": ""})
        while (item := await pieces.get()) is not done:
            if isinstance(item, Exception):
                yield event(error_body(str(item), type="server_error"))
                return
            yield delta({"content": item})
        yield delta({}, _finish(stats.finish_reason))
        if include_usage:  # OpenAI's last chunk: no choices, the usage
            yield chunk([], usage=_usage(stats.prompt_tokens, stats.completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        stop.set()


def _check_port_free(host: str, port: int) -> None:
    """Raises SlackdistError when the address is taken (uvicorn would only log it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SlackdistError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def describe_policy(policy: AccessPolicy) -> str:
    """One line for the start-up log: what protects the server (never the key itself)."""
    key = "API key required" if policy.api_key else f"no API key (--api-key or ${API_KEY_ENV})"
    hosts = "any Host" if policy.allowed_hosts is None else "Host: " + ", ".join(sorted(policy.allowed_hosts))
    line = f"{key}; {hosts}; bodies up to {policy.max_request_bytes} bytes"
    if policy.api_key is None and policy.allowed_hosts is None:
        line += "\nwarning: anyone who can reach this address can use the model; set an API key"
    return line


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist serve --model-dir DIR [--host 127.0.0.1 --port 8000]`.

    Raises:
        SlackdistError: the model folder is not a model, or the port is taken.
    """
    try:  # the [serve] extra; only this command needs it
        import uvicorn
    except ImportError:
        raise SlackdistError("slackdist serve needs uvicorn: pip install 'slackdist[serve]'") from None

    policy = AccessPolicy.from_config(cfg.serve, os.environ)
    _check_port_free(cfg.serve.host, cfg.serve.port)
    im = fast_replies(load_model(cfg))
    settings = GenerationSettings.from_config(cfg.chat)
    system = cfg.chat.system or im.info.system_prompt_for(cfg.chat.persona)
    warm_up(im, settings)
    app = build_app(im, settings, model_name=cfg.serve.model_name, system_prompt=system, policy=policy)
    print(
        f"serving {cfg.chat.model_dir} as '{cfg.serve.model_name}' on http://{cfg.serve.host}:{cfg.serve.port}/v1"
    )
    print(describe_policy(policy), flush=True)
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="info")
    return 0
