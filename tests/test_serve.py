"""The OpenAI-compatible server: request checks (unit), and live servers on loopback hit by the
official openai client and by hostile clients: oversized and over-long prompts, client-sent
templates, malformed fields, cross-site posts, DNS rebinding, a full queue, and a bounded load
test during which /health keeps answering (tiny random model: fast)."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from lorafit.chat_request import BadRequest, ServeLimits, parse_body, validate_chat_request

LIMITS = ServeLimits(max_tokens=100, default_max_tokens=16)
USER = [{"role": "user", "content": "hi"}]
KEY = "sk-test-123"
JINJA_BOMB = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


def _text_part(**part):
    return {"messages": [{"role": "user", "content": [part]}]}


def _tool_call(arguments):
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return {"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [call]}]}


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
        ({"messages": USER, "chat_template_kwargs": {"chat_template": JINJA_BOMB}}, 400),
        ({"messages": USER, "chat_template": JINJA_BOMB}, 400),
        ({"messages": USER, "temperature": "hot"}, 400),
        ({"messages": USER, "something_new": 1}, 400),
        (_text_part(type="text"), 400),  # no text
        (_text_part(text="hi"), 400),  # no type
        (_text_part(type="text", text=5), 400),
        (_text_part(type="image_url", image_url={"url": "x"}), 400),
        ({"messages": [{"role": "user", "content": [5]}]}, 400),
        (_tool_call("{not json"), 400),
        (_tool_call(None), 400),
        ({"messages": [*USER, {"role": "assistant", "tool_calls": "f()"}]}, 400),
        ({"messages": USER, "logit_bias": {"abc": 1}}, 400),
        ({"messages": USER, "logit_bias": {"999999999": 1}}, 400),
        ({"messages": USER, "logit_bias": [1, 2]}, 400),
        ({"messages": USER, "logit_bias": {"5": "x"}}, 400),
        ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400),
        ({"messages": USER, "stop": 5}, 400),
        ({"messages": USER, "frequency_penalty": -1}, 400),
        ({"messages": USER, "seed": "abc"}, 400),
        ({"messages": USER, "n": 2}, 400),
        ({"messages": USER, "tools": [1, 2]}, 400),
        ({"messages": USER, "stream": "no"}, 400),
    ],
)
def test_bad_requests_are_refused_with_a_4xx(body, status):
    with pytest.raises(BadRequest) as refused:
        validate_chat_request(body, "tuned", LIMITS, vocab_size=1000)
    assert refused.value.status == status


def test_deep_nesting_is_refused_without_a_recursion_error():
    for depth in (33, 200_000):
        raw = b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
        with pytest.raises(BadRequest, match="nested deeper"):
            parse_body(raw, LIMITS)


def test_a_good_request_gets_the_default_token_bound_capped_by_the_limit():
    body = {"model": "tuned", "messages": USER, "logit_bias": {"5": 1}}
    validate_chat_request(body, "tuned", LIMITS, vocab_size=1000)
    assert body["max_tokens"] == 16 and body["logit_bias"] == {"5": 1.0}
    body = {"messages": USER, "max_tokens": 100}
    validate_chat_request(body, "tuned", LIMITS)
    assert body["max_tokens"] == 100
    body = {"messages": USER}
    validate_chat_request(body, "tuned", ServeLimits(max_tokens=10))  # default 256 > limit
    assert body["max_tokens"] == 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, data=None, key=None, headers=None, timeout=60) -> tuple[int, bytes, dict]:
    all_headers = {"Authorization": f"Bearer {key}"} if key else {}
    if data is not None:
        all_headers["Content-Type"] = "application/json"
    all_headers.update(headers or {})
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data, all_headers), timeout=timeout
        ) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def _status(url: str, data: bytes | None = None, key: str | None = None, **kw) -> int:
    return _request(url, data, key, **kw)[0]


def _raw(base: str, body: bytes, headers: dict) -> tuple[int, bytes]:
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", body, headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _oversized_status(base: str, chunked: bool) -> int:
    """Status of a 1.1 MB chat request sent in full, as a client does: with a Content-Length
    (refused from the headers) or chunked with no length (refused as it arrives)."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
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
    key = extra[extra.index("--api-key") + 1] if "--api-key" in extra else None
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()[-3000:]}")
        try:
            if _status(base + "/health", key=key) == 200:
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
    proc, base = start_server(str(tiny_model_dir), "--name", "tiny", "--api-key", KEY)
    yield proc, base
    stop_server(proc)


@pytest.fixture(scope="module")
def keyless_server(tiny_model_dir, tmp_path_factory):
    """No API key (loopback), from a folder whose name is not ASCII, with room for 2 requests."""
    folder = tmp_path_factory.mktemp("srv") / "modèle-ü"
    shutil.copytree(tiny_model_dir, folder)
    proc, base = start_server(str(folder), "--name", "tiny", "--max-waiting", "2")
    yield proc, base, folder
    stop_server(proc)


def test_server_guards_on_a_live_server(tiny_server):
    from openai import OpenAI

    _, base = tiny_server
    assert _status(base + "/health") == 200  # health needs no key
    assert _status(base + "/v1/models") == 401
    assert _status(base + "/v1/models", key="wrong") == 401
    assert _status(base + "/v1/chat/completions", b"{not json", KEY) == 400
    assert _oversized_status(base, chunked=False) == 413
    assert _oversized_status(base, chunked=True) == 413

    client = OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
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


def test_prompts_over_the_context_are_refused_by_their_token_count(tiny_server):
    """The tiny model's context is 512 tokens: a ~2000-token prompt is a 400 that says so."""
    from openai import BadRequestError, OpenAI

    _, base = tiny_server
    client = OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    long = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(BadRequestError, match="context of 512 tokens"):
        client.chat.completions.create(model="tiny", messages=long, max_tokens=5)
    with pytest.raises(BadRequestError, match="context of 512 tokens"):
        client.chat.completions.create(model="tiny", messages=long, max_tokens=5, stream=True)
    start = time.monotonic()  # ~1 MB of text: counted on a worker thread, refused in seconds
    huge = json.dumps({"messages": [{"role": "user", "content": "ab " * 330_000}]}).encode()
    status, body = _raw(
        base, huge, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    )
    assert status == 400 and b"context" in body and time.monotonic() - start < 30


def test_a_client_sent_template_is_refused_and_health_keeps_answering(tiny_server):
    _, base = tiny_server
    body = {"messages": USER, "chat_template_kwargs": {"chat_template": JINJA_BOMB}}
    status, reply, _ = _request(base + "/v1/chat/completions", json.dumps(body).encode(), KEY)
    assert status == 400 and b"chat_template_kwargs" in reply
    started = time.monotonic()
    assert _status(base + "/health", timeout=2) == 200 and time.monotonic() - started < 2


@pytest.mark.parametrize(
    "body",
    [
        _text_part(type="text"),
        _tool_call("{not json"),
        {"messages": USER, "logit_bias": {"abc": 1}},
        {"messages": USER, "frequency_penalty": -1},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
    ],
)
def test_malformed_fields_are_a_4xx_on_the_live_server(tiny_server, body):
    _, base = tiny_server
    status, reply, _ = _request(base + "/v1/chat/completions", json.dumps(body).encode(), KEY)
    assert 400 <= status < 500, reply
    assert json.loads(reply)["error"]["message"]


def test_cross_site_posts_and_dns_rebinding_are_refused(keyless_server):
    _, base, _ = keyless_server
    body = json.dumps({"messages": USER, "max_tokens": 2}).encode()
    port = urllib.parse.urlsplit(base).port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert _status(base + "/v1/chat/completions", body, headers={"Host": host}) == 200
    # a page on evil.example whose name now points at 127.0.0.1
    assert _status(base + "/v1/models", headers={"Host": f"evil.example:{port}"}) == 403
    assert _status(base + "/v1/chat/completions", body, headers={"Host": "evil.example"}) == 403
    # a form or fetch() without preflight can only send text/plain
    status, _ = _raw(base, body, {"Content-Type": "text/plain"})
    assert status == 415


def test_the_model_folder_never_appears_in_a_response(keyless_server):
    from openai import OpenAI

    _, base, folder = keyless_server
    forms = {str(folder).encode(), json.dumps(str(folder)).encode()[1:-1]}
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.with_raw_response.create(
        model="tiny", messages=USER, max_tokens=4
    )
    raw = reply.http_response.read()
    assert not any(form in raw for form in forms) and json.loads(raw)["model"] == "tiny"
    body = json.dumps({"messages": USER, "max_tokens": 4, "stream": True}).encode()
    status, streamed, _ = _request(base + "/v1/chat/completions", body)
    assert status == 200 and b'"model": "tiny"' in streamed
    assert not any(form in streamed for form in forms)
    assert "modèle" not in streamed.decode() and "mod\\u00e8le" not in streamed.decode()


def test_a_full_queue_answers_503_streams_included(keyless_server):
    """Room for 2: slow streamed requests hold their place until they end; the rest get 503
    with Retry-After, and the server serves normally afterwards."""
    _, base, _ = keyless_server
    body = json.dumps({"messages": USER, "max_tokens": 400, "stream": True}).encode()

    def one(_):
        return _request(base + "/v1/chat/completions", body, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and 503 in statuses
    busy = next(headers for status, _, headers in results if status == 503)
    assert busy.get("retry-after") == "2"
    short = json.dumps({"messages": USER, "max_tokens": 2}).encode()
    assert _status(base + "/v1/chat/completions", short) == 200


def test_load_on_loopback_with_hostile_clients(tiny_server):
    """32 clients, 192 requests: streamed, plain, over the context, malformed. Every answer is
    a 2xx, 4xx or 503; /health answers within 2 s throughout; RSS stays bounded; then the
    server answers normally."""
    import psutil

    proc, base = tiny_server
    server = psutil.Process(proc.pid)
    url = base + "/v1/chat/completions"
    kinds = [
        {"messages": USER, "max_tokens": 8, "stream": True},
        {"messages": USER, "max_tokens": 8},
        {"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 8},
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        {"messages": USER, "chat_template_kwargs": {"chat_template": JINJA_BOMB}},
    ]

    def one(i: int) -> int:
        raw = b"{broken" if i % 6 == 5 else json.dumps(kinds[i % 6 % 5]).encode()
        return _request(url, raw, KEY, timeout=120)[0]

    health, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            started = time.monotonic()
            try:
                ok = _status(base + "/health", timeout=2) == 200
            except OSError:
                ok = False
            health.append(ok and time.monotonic() - started < 2)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(32) as pool:
        warm = list(pool.map(one, range(32)))
        warm_rss = server.memory_info().rss
        statuses = warm + list(pool.map(one, range(32, 192)))
    stop.set()
    watcher.join()
    assert all(200 <= s < 300 or 400 <= s < 500 or s == 503 for s in statuses), statuses
    assert statuses.count(200) >= 32 and health and all(health), health
    grown = server.memory_info().rss - warm_rss
    assert proc.poll() is None, "server died under load"
    assert grown < 150 * 2**20, f"server RSS grew by {grown / 2**20:.0f} MiB"
    assert server.memory_info().rss < 2 * 2**30
    assert _status(url, json.dumps({"messages": USER, "max_tokens": 2}).encode(), KEY) == 200


def test_public_host_needs_an_api_key(tiny_model_dir):
    from conftest import run_cli

    r = run_cli("serve", str(tiny_model_dir), "--host", "0.0.0.0", env={"LORAFIT_API_KEY": ""})
    assert r.returncode == 2 and "api key" in r.stderr.lower()
