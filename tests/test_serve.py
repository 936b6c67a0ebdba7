"""The OpenAI-compatible server (slackdist/serve.py): a live uvicorn server, the official `openai` client."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from inference_helpers import write_tiny_adapter

from slackdist.generate import GenerationSettings, reply
from slackdist.model.load import load_for_inference
from slackdist.serve import build_app

CONTEXT = 256
SYSTEM = "You are a member of the acme Slack workspace. This conversation is from #general."
USER = [{"role": "user", "content": "is the build green?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def im(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    adapter = write_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "out")
    return load_for_inference(str(adapter), device="cpu")


@pytest.fixture(scope="module")
def settings() -> GenerationSettings:
    return GenerationSettings(temperature=0.0, max_new_tokens=8, max_context_tokens=CONTEXT)


@pytest.fixture(scope="module")
def base_url(im, settings):
    app = build_app(im, settings, model_name="acme-bot", system_prompt=SYSTEM)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 30
    while True:  # ready when /v1/models answers (bounded)
        try:
            if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["acme-bot"]


def test_completion_matches_the_shared_generator_with_the_training_system_prompt(client, im, settings):
    done = client.chat.completions.create(model="acme-bot", messages=USER)
    choice = done.choices[0]
    assert choice.message.role == "assistant"
    expected = reply(im, [{"role": "system", "content": SYSTEM}, *USER], settings)
    assert choice.message.content == expected
    assert choice.finish_reason in ("stop", "length")
    assert done.object == "chat.completion" and done.model == "acme-bot"
    assert done.usage.completion_tokens <= 8 and done.usage.prompt_tokens > 10
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_request_parameters_are_applied(client):
    one = client.chat.completions.create(model="x", messages=USER, max_tokens=2)
    assert one.usage.completion_tokens <= 2 and one.choices[0].finish_reason == "length"
    seeded = dict(model="x", messages=USER, temperature=1.0, top_p=0.9, seed=5, max_completion_tokens=8)
    assert (
        client.chat.completions.create(**seeded).choices[0].message.content
        == client.chat.completions.create(**seeded).choices[0].message.content
    )
    system = [{"role": "system", "content": "You are a pirate."}, *USER]
    with_own_system = client.chat.completions.create(model="x", messages=system)
    assert with_own_system.usage.prompt_tokens != one.usage.prompt_tokens  # our default replaced, not added


def test_streaming(client):
    full = client.chat.completions.create(model="x", messages=USER).choices[0].message.content
    stream = client.chat.completions.create(
        model="x", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_raw_sse_ends_with_done(base_url):
    with httpx.stream(
        "POST", f"{base_url}/chat/completions", json={"messages": USER, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": USER, "temperature": 5}, "temperature"),
        ({"messages": USER, "n": 2}, "n"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    ],
)
def test_malformed_requests_get_openai_errors(base_url, body, param):
    r = httpx.post(f"{base_url}/chat/completions", json=body, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_invalid_json_and_unknown_route(base_url):
    r = httpx.post(
        f"{base_url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{base_url}/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_too_long_prompt_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "word " * CONTEXT}])
    assert caught.value.status_code == 400
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # fits, but not with the reply it asks for
        client.chat.completions.create(model="x", messages=USER, max_tokens=CONTEXT)


def test_concurrent_requests_are_queued_not_crashed(client):
    expected = client.chat.completions.create(model="x", messages=USER).choices[0].message.content

    def ask(i: int) -> str:
        if i % 2:
            stream = client.chat.completions.create(model="x", messages=USER, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        return client.chat.completions.create(model="x", messages=USER).choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    assert answers == [expected] * 6  # greedy: every request got the same, complete answer


def test_a_dropped_stream_does_not_block_the_server(base_url, client):
    body = {"messages": USER, "stream": True, "max_tokens": 200}
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # read one event, then hang up
    done = client.chat.completions.create(model="x", messages=USER, max_tokens=2)
    assert done.usage.completion_tokens <= 2


def test_serve_command_refuses_a_taken_port(tmp_path, capsys):
    from slackdist.cli import main as cli_main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli_main(["serve", "--model-dir", str(tmp_path), "--port", str(port)])
    assert code == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
