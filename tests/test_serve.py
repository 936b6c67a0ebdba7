"""The OpenAI-compatible server (slackdist/serve.py): a live uvicorn server, the official `openai` client.

Every server here is a real uvicorn on 127.0.0.1 (an ephemeral port) in a thread of the test process;
every request loop is bounded by a count or a socket timeout.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from inference_helpers import write_tiny_adapter

from slackdist.config import ServeConfig
from slackdist.generate import GenerationSettings, reply
from slackdist.model.load import load_for_inference
from slackdist.model.template import build_prompt_ids
from slackdist.serve import (
    LOOPBACK_HOSTS,
    AccessPolicy,
    RequestError,
    _pieces,
    _prompt_tokens_at_least,
    build_app,
    describe_policy,
    host_name,
    is_loopback,
    parse_json,
)

CONTEXT = 256
SYSTEM = "You are a member of the acme Slack workspace. This conversation is from #general."
USER = [{"role": "user", "content": "is the build green?"}]
KEY = "sk-test-5f0c1d"
SMALL_LIMIT = 64 * 1024  # the guarded server's body limit
# /health must answer within this while another request is read or processed. The server needs ~70 ms at
# worst on a busy 2-core machine (and took 5-20 s before its work moved off the event loop); client and
# server share this process and its GIL, and CI machines are slower and shared, hence the margin.
HEALTH_BOUND_S = 1.0


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 in a thread; yields the base URL.

    The socket listens before uvicorn starts, so the first request queues in the backlog instead of
    being polled for.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def im(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    adapter = write_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("serve") / "out")
    return load_for_inference(str(adapter), device="cpu")


@pytest.fixture(scope="module")
def settings_() -> GenerationSettings:
    return GenerationSettings(temperature=0.0, max_new_tokens=8, max_context_tokens=CONTEXT)


@pytest.fixture(scope="module")
def server(im, settings_) -> Iterator[str]:
    """The default policy: no key, loopback host names, 4 MiB bodies."""
    with running(build_app(im, settings_, model_name="acme-bot", system_prompt=SYSTEM)) as url:
        yield url


@pytest.fixture(scope="module")
def guarded(im, settings_) -> Iterator[str]:
    """An API key and a 64 KiB body limit."""
    policy = AccessPolicy(api_key=KEY, max_request_bytes=SMALL_LIMIT)
    with running(build_app(im, settings_, system_prompt=SYSTEM, policy=policy)) as url:
        yield url


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return f"{server}/v1"


@pytest.fixture
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)


def assert_openai_error(r: httpx.Response, status: int, *, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if code is not None:
        assert error["code"] == code
    return error


def raw_request(url: str, head: str, body: bytes = b"") -> socket.socket:
    """Open a connection to the server at `url` and send a POST's head (and `body`) as raw bytes."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    lines = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
    sock.sendall(f"{lines}Content-Type: application/json\r\n{head}\r\n".encode() + body)
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the socket timeout)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# ---------------------------------------------------------------- the API


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["acme-bot"]


def test_completion_matches_the_shared_generator_with_the_training_system_prompt(client, im, settings_):
    done = client.chat.completions.create(model="acme-bot", messages=USER)
    choice = done.choices[0]
    assert choice.message.role == "assistant"
    expected = reply(im, [{"role": "system", "content": SYSTEM}, *USER], settings_)
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


def test_the_widest_seed_is_accepted(client):
    for seed in (2**63 - 1, -(2**63)):
        assert client.chat.completions.create(model="x", messages=USER, seed=seed, max_tokens=2).choices


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
        ({"messages": USER, "temperature": -0.5}, "temperature"),
        ({"messages": USER, "top_p": 0}, "top_p"),
        ({"messages": USER, "top_p": 1.5}, "top_p"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "max_completion_tokens": -1}, "max_completion_tokens"),
        ({"messages": USER, "seed": 2**70}, "seed"),  # was a plain-text 500 from torch.manual_seed
        ({"messages": USER, "seed": -(2**63) - 1}, "seed"),
        ({"messages": USER, "n": 2}, "n"),
        ({"messages": USER, "n": 0}, "n"),
        ({"messages": USER, "n": 2**70}, "n"),
        ({"messages": USER, "presence_penalty": 3}, "presence_penalty"),
        ({"messages": USER, "frequency_penalty": -2.5}, "frequency_penalty"),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
    ],
)
def test_malformed_requests_get_openai_errors(base_url, body, param):
    r = httpx.post(f"{base_url}/chat/completions", json=body, timeout=30)
    assert assert_openai_error(r, 400)["param"] == param


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "not valid JSON"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', "finite number"),
        (b"[1, 2]", "valid dictionary"),
        (b'{"messages": "\xff"}', "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "nested too deep"),
        (json.dumps({"messages": USER * 2049}).encode(), "at most 2048 items"),
        (json.dumps({"messages": USER, "x": [0] * 20_001}).encode(), "more than 20000 JSON values"),
    ],
)
def test_bodies_that_are_not_a_request_get_openai_errors(base_url, body, message):
    r = httpx.post(f"{base_url}/chat/completions", content=body, headers={"content-type": "application/json"})
    assert message in assert_openai_error(r, 400)["message"]


def test_many_problems_are_reported_in_one_bounded_message(base_url):
    body = {"messages": [{"role": "wizard", "content": "hi"}] * 1000}
    error = assert_openai_error(httpx.post(f"{base_url}/chat/completions", json=body), 400)
    assert error["message"].endswith("and 995 more") and len(error["message"]) < 1000


def test_invalid_json_unknown_route_wrong_method_and_content_type(base_url):
    r = httpx.post(
        f"{base_url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert "JSON" in assert_openai_error(r, 400)["message"]
    assert_openai_error(httpx.get(f"{base_url}/nothing-here"), 404)
    assert_openai_error(httpx.get(f"{base_url}/chat/completions"), 405)
    # A cross-site form or text/plain POST needs no CORS preflight: refused before its body is read.
    r = httpx.post(f"{base_url}/chat/completions", content=json.dumps({"messages": USER}))
    assert_openai_error(r, 415, code="unsupported_media_type")
    r = httpx.post(
        f"{base_url}/chat/completions", json={"messages": USER}, headers={"content-type": "text/plain"}
    )
    assert_openai_error(r, 415, code="unsupported_media_type")


def test_too_long_prompt_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "word " * CONTEXT}])
    assert caught.value.status_code == 400
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # fits, but not with the reply it asks for
        client.chat.completions.create(model="x", messages=USER, max_tokens=CONTEXT)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="x", messages=USER, max_tokens=2**70)
    assert caught.value.code == "context_length_exceeded"


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


# ---------------------------------------------------------------- access control


def test_api_key_is_required_except_on_health(guarded):
    assert httpx.get(f"{guarded}/health").json() == {"status": "ok"}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEY}"}):
        r = httpx.get(f"{guarded}/v1/models", headers=headers)
        assert_openai_error(r, 401, code="invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer" and KEY not in r.text
    r = httpx.post(f"{guarded}/v1/chat/completions", json={"messages": USER})
    assert_openai_error(r, 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded}/v1", api_key="wrong", max_retries=0).models.list()

    good = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert good.chat.completions.create(model="x", messages=USER, max_tokens=2).choices[0].message


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.nip.io", "localhost.evil"])
def test_a_foreign_host_header_is_refused(server, host):
    r = httpx.get(f"{server}/v1/models", headers={"host": host})
    assert_openai_error(r, 403, code="host_not_allowed")
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": USER}, headers={"host": host})
    assert_openai_error(r, 403, code="host_not_allowed")


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1234", "127.0.0.1", "[::1]:8000", "localhost."])
def test_loopback_host_names_are_served(server, host):
    assert httpx.get(f"{server}/v1/models", headers={"host": host}).status_code == 200


def test_policy_from_config():
    loopback = AccessPolicy.from_config(ServeConfig(), {})
    assert loopback == AccessPolicy(api_key=None, allowed_hosts=LOOPBACK_HOSTS)
    assert AccessPolicy.from_config(ServeConfig(host="0.0.0.0"), {}).allowed_hosts is None
    assert AccessPolicy.from_config(ServeConfig(allowed_hosts=["*"]), {}).allowed_hosts is None
    listed = AccessPolicy.from_config(ServeConfig(host="0.0.0.0", allowed_hosts=["Api.Example.com:443"]), {})
    assert listed.allowed_hosts == LOOPBACK_HOSTS | {"api.example.com"}
    env = {"SLACKDIST_API_KEY": "from-env"}
    assert AccessPolicy.from_config(ServeConfig(), env).api_key == "from-env"
    assert AccessPolicy.from_config(ServeConfig(api_key="flag"), env).api_key == "flag"
    assert AccessPolicy.from_config(ServeConfig(), {"SLACKDIST_API_KEY": ""}).api_key is None
    line = describe_policy(AccessPolicy(api_key="sekret", allowed_hosts=None))
    assert "sekret" not in line and "API key required" in line
    assert "warning" in describe_policy(AccessPolicy(allowed_hosts=None))


@given(
    name=st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}\.){0,3}[A-Za-z]{1,10}", fullmatch=True),
    port=st.none() | st.integers(0, 65535),
)
@settings(max_examples=200, deadline=None)
def test_host_name_drops_the_port_and_case(name, port):
    header = name if port is None else f"{name}:{port}"
    assert host_name(header) == name.lower()


@given(ip=st.ip_addresses(v=6), port=st.none() | st.integers(0, 65535))
@settings(max_examples=200, deadline=None)
def test_host_name_of_bracketed_ipv6(ip, port):
    header = f"[{ip}]" if port is None else f"[{ip}]:{port}"
    assert host_name(header) == str(ip)
    assert is_loopback(str(ip)) == ip.is_loopback


def test_loopback_listen_addresses():
    assert all(is_loopback(h) for h in ("localhost", "127.0.0.1", "127.8.9.1", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com"))


# ---------------------------------------------------------------- size limits and a responsive server


def test_an_oversize_content_length_is_refused_without_reading_the_body(guarded):
    sock = raw_request(guarded, "Content-Length: 100000000\r\n")  # the head only, no body
    with sock:
        response = read_to_eof(sock)  # the server answers and closes without waiting for 100 MB
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_an_oversize_chunked_body_stops_being_read(guarded):
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
    sent, cap = 0, 64 * 2**20
    sock = raw_request(guarded, "Transfer-Encoding: chunked\r\n")
    with sock:
        try:
            while sent < cap and not select.select([sock], [], [], 0)[0]:  # until the server answers
                sock.sendall(chunk)
                sent += 0x4000
        except OSError:  # the server closed the connection: it reads no more
            pass
        response = sock.recv(65536)
    # 64 KiB were read; the rest of what got through sat in loopback socket buffers (a few MiB).
    assert sent < 16 * 2**20
    assert response.startswith(b"HTTP/1.1 413")


def test_an_oversize_streamed_body_gets_a_413_from_a_normal_client(guarded):
    pulled = []

    def body() -> Iterator[bytes]:
        for _ in range(1024):  # 64 MiB at most
            pulled.append(1)
            yield b"x" * 65536

    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = httpx.post(f"{guarded}/v1/chat/completions", content=body(), headers=headers, timeout=30)
    assert_openai_error(r, 413, code="request_too_large")
    assert len(pulled) < 256


def test_a_body_within_the_limit_is_accepted(guarded):
    padded = json.dumps({"messages": USER, "max_tokens": 2, "user": "x" * (SMALL_LIMIT - 200)})
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = httpx.post(f"{guarded}/v1/chat/completions", content=padded, headers=headers, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def health_seconds(probe: httpx.Client, url: str) -> float:
    """How long one /health took."""
    start = time.perf_counter()
    assert probe.get(f"{url}/health").status_code == 200
    return time.perf_counter() - start


def probe_health_while(url: str, busy: threading.Thread) -> list[float]:
    """Seconds each /health took, probing until `busy` ends (at least once; bounded by its request)."""
    latencies = []
    with httpx.Client(timeout=30) as probe:
        while True:
            latencies.append(health_seconds(probe, url))
            if not busy.is_alive():
                return latencies


@pytest.mark.parametrize(
    "big, code",
    [
        # 4 MB of prompt: parsed, measured piece by piece and refused as too long. The old server
        # tokenized all of it on the event loop: /health waited 6 s.
        ({"messages": [{"role": "user", "content": "x" * (4 * 2**20 - 1000)}]}, "context_length_exceeded"),
        # 4 MB of tiny messages: a C or Rust JSON parser holds the GIL for 0.1-0.9 s on it.
        ({"messages": [{"role": "user", "content": "a"}] * (4 * 2**20 // 35)}, "request_too_complex"),
    ],
    ids=["one-long-message", "many-tiny-messages"],
)
def test_health_answers_while_a_large_request_is_processed(server, big, code):
    big = json.dumps(big).encode()
    assert 3.5 * 2**20 < len(big) < 4 * 2**20  # within the default limit
    answers = []
    busy = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                f"{server}/v1/chat/completions",
                content=big,
                headers={"content-type": "application/json"},
                timeout=120,
            )
        )
    )
    busy.start()
    latencies = probe_health_while(server, busy)
    busy.join()
    assert max(latencies) < HEALTH_BOUND_S, latencies
    assert_openai_error(answers[0], 400, code=code)


def test_health_answers_while_a_body_is_still_arriving(server):
    sock = raw_request(server, "Content-Length: 1000000\r\n", b'{"messages": [' + b" " * 400_000)
    with sock, httpx.Client(timeout=30) as probe:  # 0.4 of 1 MB sent; the request waits for the rest
        latencies = [health_seconds(probe, server) for _ in range(5)]
    assert max(latencies) < HEALTH_BOUND_S, latencies


# ---------------------------------------------------------------- parsing and measuring a request

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@given(value=JSON_VALUES, indent=st.sampled_from([None, 2]), ascii=st.booleans())
@settings(max_examples=300, deadline=None)
def test_parse_json_reads_what_json_writes(value, indent, ascii):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii)
    assert parse_json(text.encode()) == json.loads(text)


def test_parse_json_counts_objects_arrays_strings_and_numbers():
    assert parse_json(b'[{"a": "b"}, 1, 2.5, null, true]', max_values=5) is not None  # [ { "b" 1 2.5
    for extra in (b', "c"', b", 3", b", []", b", {}"):
        with pytest.raises(RequestError, match="more than 5 JSON values"):
            parse_json(b'[{"a": "b"}, 1, 2.5' + extra + b"]", max_values=5)
    for bad in (b"NaN", b"[Infinity]", b"-Infinity", b"{", b"\xff", b"[" * 5000):
        with pytest.raises(RequestError, match="not valid JSON"):
            parse_json(bad)


@given(text=st.text(max_size=300), size=st.integers(1, 40))
@settings(max_examples=300, deadline=None)
def test_pieces_cover_the_text_in_bounded_pieces(text, size):
    pieces = list(_pieces(text, size))
    assert "".join(pieces) == text
    assert all(len(p) <= size for p in pieces)


@given(
    words=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=400),
    joiner=st.sampled_from([" ", "", "\n"]),
    size=st.integers(64, 1024),
)
@settings(max_examples=100, deadline=None)
def test_the_piecewise_count_never_exceeds_the_prompt(im, words, joiner, size):
    # Each cut may split a word or a special token; CUT_SLACK_TOKENS per cut must cover what that adds.
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": joiner.join(words)}]
    exact = len(build_prompt_ids(im.tokenizer, messages))
    assert _prompt_tokens_at_least(im.tokenizer, messages, exact, size) <= exact


def test_the_piecewise_count_is_close_on_long_text(im):
    text = " ".join(f"ticket-{i} is {'green' if i % 3 else 'red'}; deploy?" for i in range(20_000))
    messages = [{"role": "user", "content": text}]
    exact = len(build_prompt_ids(im.tokenizer, messages))
    at_least = _prompt_tokens_at_least(im.tokenizer, messages, exact)
    assert exact * 0.99 <= at_least <= exact
    early = _prompt_tokens_at_least(im.tokenizer, messages, 100)  # stops after the piece that passes 100
    assert 100 < early < exact / 4


# ---------------------------------------------------------------- the command


def test_serve_command_refuses_a_taken_port(tmp_path, capsys):
    from slackdist.cli import main as cli_main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli_main(["serve", "--model-dir", str(tmp_path), "--port", str(port)])
    assert code == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_command_checks_its_settings_before_loading(tmp_path, capsys):
    from slackdist.cli import main as cli_main

    code = cli_main(
        [
            "serve",
            "--model-dir",
            str(tmp_path),
            "--max-request-bytes",
            "10",
            "--api-key",
            " ",
            "--port",
            "70000",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "serve.max_request_bytes=10" in err and "serve.api_key" in err and "serve.port=70000" in err
