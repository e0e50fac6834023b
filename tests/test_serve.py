"""The OpenAI-compatible server: request guards (unit), and a live server on loopback hit by the
official openai client, including a bounded load test (tiny random model: fast)."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from lorafit.serve import ServeLimits, validate_chat_request

LIMITS = ServeLimits(max_tokens=100, default_max_tokens=16)
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ([], 400),
        ({"messages": []}, 400),
        ({"messages": "hi"}, 400),
        ({"messages": [{"content": "no role"}]}, 400),
        ({"messages": [{"role": "user", "content": 5}]}, 400),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400),
        ({"model": "other", "messages": USER}, 404),
        ({"messages": USER, "max_tokens": 101}, 400),
        ({"messages": USER, "max_tokens": 0}, 400),
        ({"messages": USER, "max_tokens": "10"}, 400),
        ({"messages": USER, "max_completion_tokens": 10**9}, 400),
        ({"messages": USER, "generation_config": '{"max_new_tokens": 100000}'}, 400),
        ({"messages": USER, "temperature": "hot"}, 400),
    ],
)
def test_bad_requests_are_refused_with_a_4xx(body, status):
    problem = validate_chat_request(body, "tuned", LIMITS)
    assert problem is not None and problem[0] == status


def test_a_good_request_gets_the_default_token_bound():
    body = {"model": "tuned", "messages": USER}
    assert validate_chat_request(body, "tuned", LIMITS) is None
    assert body["max_tokens"] == 16
    body = {"messages": USER, "max_tokens": 100}
    assert validate_chat_request(body, "tuned", LIMITS) is None and body["max_tokens"] == 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str, data: bytes | None = None, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60).status
    except urllib.error.HTTPError as e:
        return e.code


def _oversized_status(base: str, chunked: bool) -> int:
    """Status of a 1.1 MB chat request sent in full, as a client does: with a Content-Length
    (refused from the headers) or chunked with no length (refused as it arrives)."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Authorization": "Bearer sk-test-123", "Content-Type": "application/json"}
    pieces = [b'{"messages": [{"role": "user", "content": "']
    pieces += [b"x" * 100_000] * 11 + [b'"}]}']
    try:
        body = iter(pieces) if chunked else b"".join(pieces)
        conn.request("POST", "/v1/chat/completions", body, headers, encode_chunked=chunked)
        return conn.getresponse().status
    finally:
        conn.close()


def start_server(model: str, *extra: str, env: dict | None = None):
    """`lorafit serve` in a subprocess; returns (process, base URL) once /health answers."""
    import os

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorafit", "serve", model, "--port", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()[-3000:]}")
        try:
            if _status(base + "/health") == 200:
                return proc, base
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not come up in 180 s")


def stop_server(proc) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    proc, base = start_server(str(tiny_model_dir), "--name", "tiny", "--api-key", "sk-test-123")
    yield proc, base
    stop_server(proc)


def test_server_guards_on_a_live_server(tiny_server):
    from openai import OpenAI

    _, base = tiny_server
    assert _status(base + "/health") == 200  # health needs no key
    assert _status(base + "/v1/models") == 401
    assert _status(base + "/v1/models", key="wrong") == 401
    assert _status(base + "/v1/chat/completions", b"{not json", "sk-test-123") == 400
    assert _oversized_status(base, chunked=False) == 413
    assert _oversized_status(base, chunked=True) == 413

    client = OpenAI(base_url=base + "/v1", api_key="sk-test-123", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=USER, max_tokens=5)
    assert reply.model == "tiny" and reply.usage.completion_tokens <= 5
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=USER)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=10**6)
    with pytest.raises(openai.APIStatusError, match="over 1000000 bytes") as refused:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x" * 1_100_000}]
        )
    assert refused.value.status_code == 413


def test_load_on_loopback_no_crash_no_memory_growth(tiny_server):
    """200 requests, 16 at a time, plain and streamed: all answered, RSS does not keep growing."""
    import psutil
    from openai import OpenAI

    proc, base = tiny_server
    client = OpenAI(base_url=base + "/v1", api_key="sk-test-123", max_retries=0, timeout=120)

    def one(i: int) -> bool:
        messages = [{"role": "user", "content": f"Request {i}: say something."}]
        if i % 2:
            chunks = client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=4, stream=True
            )
            return sum(1 for _ in chunks) > 0
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
        return reply.choices[0].finish_reason in ("stop", "length")

    server = psutil.Process(proc.pid)
    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, range(40)))  # warm-up: allocator and caches settle
        warm_rss = server.memory_info().rss
        assert all(pool.map(one, range(200)))
    grown = server.memory_info().rss - warm_rss
    assert proc.poll() is None, "server died under load"
    assert grown < 100 * 2**20, f"server RSS grew by {grown / 2**20:.0f} MiB over 200 requests"


def test_public_host_needs_an_api_key(tiny_model_dir):
    from conftest import run_cli

    r = run_cli("serve", str(tiny_model_dir), "--host", "0.0.0.0", env={"LORAFIT_API_KEY": ""})
    assert r.returncode == 2 and "api key" in r.stderr.lower()
