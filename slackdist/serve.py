"""`slackdist serve --model-dir DIR`: an OpenAI-compatible chat server (FastAPI + uvicorn).

Endpoints: `POST /v1/chat/completions` (JSON, or server-sent `chat.completion.chunk` events
ending with `data: [DONE]` when `stream` is true), `GET /v1/models`, `GET /health`.
Any OpenAI client works with `base_url=http://HOST:PORT/v1`. Replies are generated one
at a time on the shared generation thread (`slackdist.generate`): concurrent requests
wait their turn. Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with a 4xx status for bad requests (also for what FastAPI would answer with 422).

One process serves one model at a time; for many concurrent users hand the merged
model to vLLM (`vllm serve MERGED_DIR`), which batches requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from slackdist.chat import fast_replies, load_model
from slackdist.config import Config
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
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
except ImportError as e:  # raised while the CLI loads this command: printed as one line
    raise SlackdistError(
        f"slackdist serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'slackdist[serve]'"
    ) from None

MAX_STOP_STRINGS = 4


class RequestError(Exception):
    """A request the server refuses: rendered as OpenAI's error JSON."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


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
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
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


def _check_length(
    im: InferenceModel,
    settings: GenerationSettings,
    messages: list[dict[str, str]],
    req: ChatCompletionRequest,
) -> tuple[GenerationSettings, int]:
    """(settings with max_new_tokens, prompt tokens); 400 when prompt + requested reply exceed the context."""
    try:
        n_prompt = len(build_prompt_ids(im.tokenizer, messages))
    except ValueError as e:
        raise RequestError(str(e), param="messages") from None
    limit = context_limit(im, settings)
    requested = req.max_completion_tokens or req.max_tokens
    if n_prompt + (requested or 1) > limit:
        asked = (
            f"{n_prompt + requested} tokens ({n_prompt} in the messages, {requested} in the completion)"
            if requested
            else f"{n_prompt} tokens in the messages"
        )
        raise RequestError(
            f"This model's maximum context length is {limit} tokens. However, you requested {asked}. "
            "Please reduce the length of the messages or completion.",
            param="messages",
            code="context_length_exceeded",
        )
    return settings.replace(max_new_tokens=requested or settings.max_new_tokens), n_prompt


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
) -> FastAPI:
    """The FastAPI app serving one loaded model.

    Args:
        im: the loaded model.
        settings: default sampling settings; requests override temperature, top_p, max tokens, seed, stop.
        model_name: the id `/v1/models` reports and replies carry.
        system_prompt: put in front of requests that have no system message (the training one).

    Returns:
        The app (run it with uvicorn).
    """
    created = int(time.time())
    app = FastAPI(title="slackdist", version="1")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, param=exc.param, code=exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422; OpenAI answers 400 with its error object.
        problems, params = [], []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                problems.append(
                    f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'invalid')})"
                )
                params.append("")
                continue
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            params.append(".".join(loc))
            problems.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
        return JSONResponse(
            error_body(
                "; ".join(problems), param=params[0] if params and params[0] else None, code="invalid_value"
            ),
            status_code=400,
        )

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type=kind), status_code=exc.status_code)

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
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        messages = _messages(req)
        if system_prompt is not None:
            messages = with_system_prompt(messages, system_prompt)
        req_settings, n_prompt = _check_length(im, _settings(req, settings), messages, req)
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
            "usage": _usage(stats.prompt_tokens or n_prompt, stats.completion_tokens),
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


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist serve --model-dir DIR [--host 127.0.0.1 --port 8000]`.

    Raises:
        SlackdistError: the model folder is not a model, or the port is taken.
    """
    try:  # the [serve] extra; only this command needs it
        import uvicorn
    except ImportError:
        raise SlackdistError("slackdist serve needs uvicorn: pip install 'slackdist[serve]'") from None

    _check_port_free(cfg.serve.host, cfg.serve.port)
    im = fast_replies(load_model(cfg))
    settings = GenerationSettings.from_config(cfg.chat)
    system = cfg.chat.system or im.info.system_prompt_for(cfg.chat.persona)
    warm_up(im, settings)
    app = build_app(im, settings, model_name=cfg.serve.model_name, system_prompt=system)
    print(
        f"serving {cfg.chat.model_dir} as '{cfg.serve.model_name}' on http://{cfg.serve.host}:{cfg.serve.port}/v1"
    )
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="info")
    return 0
