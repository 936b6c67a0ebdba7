"""`slackdist serve` under load and under hostile requests: throughput, latency, /health, memory.

    # CPU: the tiny model (`slackdist tiny-model`, written to a temporary folder)
    python bench/serve_bench.py --json bench/results/serve_cpu.json
    # GPU: a Llama-3.2-3B-shaped merged model in bf16, built once (as chat_bench.py --build-3b does)
    python bench/serve_bench.py --build-3b /tmp/l32_3b_merged --new-tokens 128 --json bench/results/serve_gpu.json

The server is the real command (`python -m slackdist.cli serve`) in a child process on 127.0.0.1
(an ephemeral port; this script refuses any other address), with an API key from
$SLACKDIST_API_KEY and the default 4 MiB body limit. Then:

1. load: for 1, 8 and 32 concurrent clients, `--requests` chat completions (the same prompt of
   `--prompt-tokens`, greedy, at most `--new-tokens`) shared among the clients; latency p50/p99,
   requests/s and completion tokens/s, while /health is probed every 20 ms.
2. hostile: `--hostile` requests of each kind, one at a time, while /health is probed:
   a body announcing `--oversize-mb` MB in Content-Length, the same streamed chunked, and a
   prompt just under the body limit (parsed, measured, refused as too long). The server's
   resident memory (psutil, on its pid) is read before, after each kind, and its peak sampled.

Every request has a timeout and every loop a fixed count, so a run is bounded. Generation is
serialised in one process (a generation thread), so requests/s stays flat with more clients
and latency grows with the queue: batching many users is vLLM's job (README, "Serving safely").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLIENTS = (1, 8, 32)
MB = 2**20
BODY_LIMIT = 4 * MB  # the server's default --max-request-bytes
HEALTH_EVERY_S = 0.02


@dataclass
class LoadRow:
    """One concurrency level."""

    clients: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    completion_tokens_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    health_p50_ms: float
    health_p99_ms: float
    health_max_ms: float


@dataclass
class HostileRow:
    """One kind of hostile request, sent `requests` times."""

    case: str
    requests: int
    statuses: list[int]
    seconds_each_max: float
    health_max_ms: float
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    rss_after_each_mb: list[float]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the server


class Server:
    """`slackdist serve` in a child process on 127.0.0.1, stopped on exit."""

    def __init__(self, model_dir: Path, args: argparse.Namespace) -> None:
        self.key = secrets.token_urlsafe(24)
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "slackdist.cli", "serve", "--model-dir", str(model_dir)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--temperature", "0"]
        cmd += ["--max-new-tokens", str(args.new_tokens), "--repetition-penalty", "1.0"]
        cmd += ["--load-in-4bit" if args.load_in_4bit else "--no-load-in-4bit"]
        env = os.environ | {
            "SLACKDIST_API_KEY": self.key,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        if args.torch_threads:
            env["OMP_NUM_THREADS"] = str(args.torch_threads)
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.headers = {"authorization": f"Bearer {self.key}"}

    def wait_ready(self, timeout_s: float) -> None:
        """Poll /health until it answers (bounded); raise with the server's log if it does not."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        self.log.seek(0)
        raise SystemExit(f"the server did not start:\n{self.log.read().decode(errors='replace')[-3000:]}")

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / MB

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


class HealthProbe:
    """Times /health every 20 ms in a thread (and samples the server's RSS) until stopped."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.latencies_ms: list[float] = []
        self.rss_peak_mb = 0.0
        self._stop = threading.Event()
        self._probed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        self._probed.wait(timeout=60)  # probing before the work starts: at least one figure
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                client.get(f"{self.server.url}/health")
                self.latencies_ms.append((time.perf_counter() - start) * 1000)
                self.rss_peak_mb = max(self.rss_peak_mb, self.server.rss_mb())
                self._probed.set()
                self._stop.wait(HEALTH_EVERY_S)


# ---------------------------------------------------------------- load


def run_load(server: Server, body: dict[str, Any], clients: int, requests: int, timeout_s: float) -> LoadRow:
    """`requests` completions shared among `clients` threads; latency, throughput, /health meanwhile."""
    import httpx

    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    todo = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=timeout_s, headers=server.headers) as http:
            while True:
                with lock:
                    if next(todo, None) is None:
                        return
                start = time.perf_counter()
                r = http.post(f"{server.url}/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - start
                with lock:
                    if r.status_code != 200:
                        errors.append(r.text[:200])
                        continue
                    latencies.append(elapsed)
                    tokens.append(r.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    with HealthProbe(server) as probe:
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    if errors:
        print(f"  {len(errors)} failed requests, first: {errors[0]}", file=sys.stderr)
    return LoadRow(
        clients=clients,
        requests=len(latencies),
        errors=len(errors),
        seconds=round(seconds, 2),
        requests_per_s=round(len(latencies) / seconds, 2),
        completion_tokens_per_s=round(sum(tokens) / seconds, 1),
        latency_p50_ms=round(percentile(latencies, 50) * 1000, 1) if latencies else math.nan,
        latency_p99_ms=round(percentile(latencies, 99) * 1000, 1) if latencies else math.nan,
        health_p50_ms=round(statistics.median(probe.latencies_ms), 1),
        health_p99_ms=round(percentile(probe.latencies_ms, 99), 1),
        health_max_ms=round(max(probe.latencies_ms), 1),
    )


# ---------------------------------------------------------------- hostile requests


def filler(total: int, piece: int = MB) -> Iterator[bytes]:
    """`total` bytes of a JSON string's inside, in pieces (never held whole by the client)."""
    while total > 0:
        yield b"x" * min(piece, total)
        total -= piece


def oversize_body(total: int) -> Iterator[bytes]:
    """A valid JSON request of `total` bytes whose message is one long string."""
    head, tail = b'{"messages": [{"role": "user", "content": "', b'"}]}'
    yield head
    yield from filler(total - len(head) - len(tail))
    yield tail


def send(server: Server, content: Callable[[], Any], headers: dict[str, str], timeout_s: float) -> int:
    """POST one body; the status, or 0 when the connection broke before any answer."""
    import httpx

    try:
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            content=content(),
            headers=server.headers | {"content-type": "application/json"} | headers,
            timeout=timeout_s,
        )
        return r.status_code
    except httpx.TransportError:
        return 0


def run_hostile(
    server: Server, case: str, content: Callable[[], Any], headers: dict[str, str], n: int, timeout_s: float
) -> HostileRow:
    """Send one kind of hostile request `n` times, one after the other, while /health is probed."""
    rss_before = server.rss_mb()
    statuses, seconds, rss_after_each = [], [], []
    with HealthProbe(server) as probe:
        for _ in range(n):
            start = time.perf_counter()
            statuses.append(send(server, content, headers, timeout_s))
            seconds.append(time.perf_counter() - start)
            rss_after_each.append(round(server.rss_mb(), 1))
    return HostileRow(
        case=case,
        requests=n,
        statuses=statuses,
        seconds_each_max=round(max(seconds), 3),
        health_max_ms=round(max(probe.latencies_ms), 1),
        rss_before_mb=round(rss_before, 1),
        rss_peak_mb=round(max(probe.rss_peak_mb, rss_before), 1),
        rss_after_mb=rss_after_each[-1],
        rss_after_each_mb=rss_after_each,
    )


def hostile_cases(oversize_mb: int) -> list[tuple[str, Callable[[], Any], dict[str, str]]]:
    size = oversize_mb * MB
    under = BODY_LIMIT - 1024
    return [
        (f"{oversize_mb} MB, Content-Length", lambda: oversize_body(size), {"content-length": str(size)}),
        (f"{oversize_mb} MB, chunked", lambda: oversize_body(size), {}),
        ("4 MB prompt (within the limit)", lambda: b"".join(oversize_body(under)), {}),
    ]


# ---------------------------------------------------------------- the run


def model_folder(args: argparse.Namespace, scratch: Path) -> Path:
    if args.build_3b:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from chat_bench import build_3b

        return build_3b(Path(args.build_3b))
    if args.model_dir:
        return Path(args.model_dir)
    from slackdist.model.tiny import write_tiny_model

    return write_tiny_model(scratch / "tiny")


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "load_average_1m": round(os.getloadavg()[0], 2),  # CPU figures mean little on a busy machine
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from chat_bench import prompt_messages

    from slackdist.model.load import load_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = model_folder(args, Path(scratch))
        messages = prompt_messages(load_tokenizer(str(model_dir)), args.prompt_tokens)
        body = {"messages": messages, "max_tokens": args.new_tokens, "temperature": 0}
        server = Server(model_dir, args)
        try:
            server.wait_ready(args.start_timeout)
            run_load(server, body, 1, args.warm_up, args.timeout)  # compilation, allocator, first-call costs
            rss_idle = server.rss_mb()
            load = []
            for clients in args.clients:
                load.append(run_load(server, body, clients, args.requests, args.timeout))
                print(f"  {clients} clients done", file=sys.stderr)
            hostile = [
                run_hostile(server, case, content, headers, args.hostile, args.timeout)
                for case, content, headers in hostile_cases(args.oversize_mb)
            ]
            rss_end = server.rss_mb()
        finally:
            server.stop()
    return {
        "machine": machine(),
        "model_dir": str(model_dir) if args.model_dir or args.build_3b else "tiny (slackdist tiny-model)",
        "prompt_tokens_about": args.prompt_tokens,
        "new_tokens_max": args.new_tokens,
        "torch_threads": args.torch_threads or "default",
        "requests_per_level": args.requests,
        "rss_idle_mb": round(rss_idle, 1),
        "rss_end_mb": round(rss_end, 1),
        "load": [asdict(row) for row in load],
        "hostile": [asdict(row) for row in hostile],
    }


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    where = m["gpu"] or f"CPU ({m['cpu_count']} cores)"
    lines = [
        f"{where}, load average {m['load_average_1m']} at the start, torch {m['torch']}, {m['date']}; "
        f"model {result['model_dir']}, torch threads {result['torch_threads']}; prompt ~"
        f"{result['prompt_tokens_about']} tokens, at most {result['new_tokens_max']} new tokens, greedy",
        "",
        "| clients | requests | req/s | completion tok/s | p50 latency (ms) | p99 latency (ms) "
        "| /health p50 / p99 / max (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["load"]:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['completion_tokens_per_s']} "
            f"| {r['latency_p50_ms']} | {r['latency_p99_ms']} "
            f"| {r['health_p50_ms']} / {r['health_p99_ms']} / {r['health_max_ms']} |"
        )
    lines += [
        "",
        "| hostile request | n | statuses | slowest answer (s) | /health max (ms) | RSS before / peak / after (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["hostile"]:
        statuses = ", ".join(str(s) for s in sorted(set(r["statuses"])))
        lines.append(
            f"| {r['case']} | {r['requests']} | {statuses} | {r['seconds_each_max']} | {r['health_max_ms']} "
            f"| {r['rss_before_mb']} / {r['rss_peak_mb']} / {r['rss_after_mb']} |"
        )
    lines += [
        "",
        f"server RSS idle after warm-up {result['rss_idle_mb']} MiB, at the end {result['rss_end_mb']} MiB",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-dir", help="a model folder to serve (default: the tiny model, built here)")
    src.add_argument(
        "--build-3b", metavar="DIR", help="build (once) and serve a random Llama-3.2-3B-shaped model (GPU)"
    )
    p.add_argument("--load-in-4bit", action="store_true", help="serve the base in 4-bit (needs bitsandbytes)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS of the server (default: torch's choice, one per core; on a shared CPU its "
        "threads wait on each other: use the cores you own)",
    )
    p.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=list(CLIENTS))
    p.add_argument("--requests", type=int, default=64, help="completions per concurrency level (default: 64)")
    p.add_argument("--warm-up", type=int, default=4, help="completions before timing (default: 4)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default: 128)")
    p.add_argument("--new-tokens", type=int, default=32, help="most tokens per reply (default: 32)")
    p.add_argument("--hostile", type=int, default=3, help="requests of each hostile kind (default: 3)")
    p.add_argument("--oversize-mb", type=int, default=50, help="size of the oversize bodies (default: 50)")
    p.add_argument("--timeout", type=float, default=300, help="seconds any one request may take")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds the server may take to start")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.requests < 1 or args.warm_up < 1 or args.hostile < 1 or min(args.clients) < 1:
        p.error("--requests, --warm-up, --hostile and every --clients value must be >= 1")
    if args.oversize_mb * MB <= BODY_LIMIT:
        p.error(f"--oversize-mb must exceed the server's {BODY_LIMIT // MB} MiB limit")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
