"""Serve stage: an OpenAI-compatible HTTP API for a tuned model.

    lorafit serve runs/demo --port 8000
    # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...).chat.completions.create(...)

Generation and the OpenAI wire format (plain and streamed chat completions) come from
``transformers serve``'s own handler; this module puts a guarded front on it, so that no client
can knock the server over or read what it should not:
- one model, named after the run (``/v1/models``); any other model name is a 404;
- an API key (``--api-key`` or ``LORAFIT_API_KEY``) checked on every request; without one the
  server binds loopback only, answers only requests addressed to a loopback or its own host
  name (a web page cannot drive it through DNS rebinding) and only JSON posts (no cross-site
  form posts);
- every request field checked first (lorafit.chat_request): malformed input is a 4xx;
- the prompt counted in tokens on a worker thread, and refused when it and ``max_tokens`` do
  not fit the model's context (or ``--max-context``): a 1 MB prompt is ~500k tokens;
- a bounded number of requests queued or running, streams included until they end (503 with
  Retry-After when full), a bounded body and ``max_tokens``;
- the model's folder never appears in a response: the public model name replaces it;
- the system turn the model was trained with is added when the client sends none.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request  # module level: FastAPI resolves annotations by name
from fastapi.responses import JSONResponse, StreamingResponse

from lorafit.chat_request import BadRequest, ServeLimits, parse_body, validate_chat_request
from lorafit.errors import LorafitError

log = logging.getLogger(__name__)
API_KEY_ENV = "LORAFIT_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
RETRY_AFTER_S = 2

__all__ = ["ServeLimits", "build_app", "serve"]


def _error(status: int, message: str, kind: str = "invalid_request_error", code=None, headers=None):
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": code}},
        status_code=status,
        headers=headers,
    )


# A refused body is still read (and dropped) up to this many times the limit before the
# answer: a server that answers while the client is still sending closes on unread data, and
# the client then sees a broken pipe instead of the 413 that says what is wrong.
DRAIN_FACTOR = 4


async def read_bounded_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it is over ``limit`` bytes. Memory stays bounded for
    chunked uploads that send no length: an oversized body is dropped as it arrives."""
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit * DRAIN_FACTOR:
            return None
        if size <= limit:
            parts.append(chunk)
    return None if size > limit else b"".join(parts)


def allowed_hosts(host: str, port: int) -> set[str]:
    """Host headers a keyless server answers: loopback names and the address it is bound to."""
    names = {*LOOPBACK, host}
    out = set()
    for name in names:
        shown = f"[{name}]" if ":" in name else name
        out |= {shown, f"{shown}:{port}"}
    return out


class Scrubber:
    """Replace the model's folder with its public name in anything sent to a client (the path
    as written, and as JSON writes it, ASCII-escaped or not)."""

    def __init__(self, model_dir: Path, public: str):
        path = str(model_dir)
        self.public = public
        forms = {path, json.dumps(path)[1:-1], json.dumps(path, ensure_ascii=False)[1:-1]}
        self.forms = sorted((f for f in forms if f), key=len, reverse=True)

    def text(self, text: str) -> str:
        for form in self.forms:
            text = text.replace(form, self.public)
        return text

    def event(self, chunk: str | bytes) -> str:
        """One server-sent event of the handler's stream, with the public model name."""
        if isinstance(chunk, bytes):
            chunk = chunk.decode()
        lines = []
        for line in chunk.split("\n"):
            if line.startswith("data: ") and line != "data: [DONE]":
                try:
                    data = json.loads(line[6:])
                    if isinstance(data, dict) and "model" in data:
                        data["model"] = self.public
                    line = "data: " + json.dumps(data, ensure_ascii=False)
                except json.JSONDecodeError:
                    pass
            lines.append(self.text(line))
        return "\n".join(lines)


class GuardedChat:
    """transformers' chat-completions handler for one model, behind lorafit's guards."""

    def __init__(
        self, model_dir: Path, model_name: str, system_prompt, api_key, limits, device, hosts
    ):
        from transformers import AutoConfig, AutoTokenizer

        from lorafit.hooks import openai_chat_handler

        self.model_dir, self.model_name, self.system_prompt = model_dir, model_name, system_prompt
        self.api_key, self.limits, self.hosts = api_key, limits, hosts
        self.handler, self.template_messages = openai_chat_handler(model_dir, device)
        # its own tokenizer: the handler's is used by the inference thread at the same time
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model_config = AutoConfig.from_pretrained(model_dir).get_text_config()
        self.context = min(model_config.max_position_embeddings, limits.max_context or 10**9)
        self.vocab = model_config.vocab_size
        self.counter = ThreadPoolExecutor(1, thread_name_prefix="lorafit-count")
        self.waiting = asyncio.Semaphore(limits.max_waiting)
        self.scrub = Scrubber(model_dir, model_name)

    def prompt_tokens(self, body: dict) -> int:
        """The prompt's length in tokens, rendered as the handler will render it."""
        ids = self.tokenizer.apply_chat_template(
            self.template_messages(body["messages"]),
            add_generation_prompt=True,
            tools=body.get("tools"),
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        return len(ids)

    async def guard(self, request: Request, call_next):
        """Key, Host header, JSON content type and body size, before any route runs."""
        limit = self.limits.max_request_bytes
        if self.api_key:
            if request.url.path != "/health":
                sent = request.headers.get("authorization", "")
                if not hmac.compare_digest(sent.encode(), f"Bearer {self.api_key}".encode()):
                    return _error(401, "missing or wrong API key", "authentication_error")
        elif self.hosts is not None and request.headers.get("host", "") not in self.hosts:
            return _error(403, "this server only answers requests addressed to localhost")
        if request.method == "POST":
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return _error(415, "send the request as JSON (Content-Type: application/json)")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limit:
            if int(size) <= limit * DRAIN_FACTOR:
                await read_bounded_body(request, limit)
            return _error(413, f"request body over {limit} bytes")
        return await call_next(request)

    def health(self):
        return {"status": "ok", "model": self.model_name}

    def models(self):
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "lorafit"}
        return {"object": "list", "data": [card]}

    async def chat_completions(self, request: Request):
        raw = await read_bounded_body(request, self.limits.max_request_bytes)
        if raw is None:
            return _error(413, f"request body over {self.limits.max_request_bytes} bytes")
        try:
            body = parse_body(raw, self.limits)
            validate_chat_request(body, self.model_name, self.limits, self.vocab)
        except BadRequest as e:
            return _error(e.status, self.scrub.text(str(e)), code=e.code)
        messages = body["messages"]
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            body["messages"] = [{"role": "system", "content": self.system_prompt}, *messages]
        if self.waiting.locked():
            retry = {"Retry-After": str(RETRY_AFTER_S)}
            return _error(
                503,
                "server busy: too many requests waiting; retry later",
                "overloaded",
                headers=retry,
            )
        await self.waiting.acquire()
        handed_over = False
        try:
            response = await self._answer(body)
            if isinstance(response, StreamingResponse):
                # the stream keeps its place in the queue until it ends (or the client leaves)
                response = HoldsSlot(response, self.waiting.release)
                handed_over = True
            return response
        finally:
            if not handed_over:
                self.waiting.release()

    async def _answer(self, body: dict):
        loop = asyncio.get_running_loop()
        try:
            count = await loop.run_in_executor(self.counter, self.prompt_tokens, body)
        except Exception as e:  # noqa: BLE001 - the template could not render these messages
            return _error(400, self.scrub.text(f"these messages cannot be rendered: {e}"))
        wanted = body.get("max_completion_tokens") or body.get("max_tokens")
        if count + wanted > self.context:
            return _error(
                400,
                f"the prompt is {count} tokens; with max_tokens {wanted} that is over this "
                f"server's context of {self.context} tokens: shorten the conversation or ask "
                "for fewer tokens",
                code="context_length_exceeded",
            )
        body["model"] = str(self.model_dir)
        try:
            response = await self.handler.handle_request(body, str(uuid.uuid4()))
        except Exception as e:  # noqa: BLE001 - a 4xx/5xx in OpenAI's shape, never a traceback
            status = getattr(e, "status_code", None)
            if status is None:
                log.exception("chat completion failed")
                return _error(500, "the model failed on this request", "server_error")
            detail = self.scrub.text(str(getattr(e, "detail", e)))
            return _error(400 if status == 422 else status, detail)
        if isinstance(response, JSONResponse):
            data = json.loads(response.body)
            if isinstance(data, dict) and "model" in data:
                data["model"] = self.model_name
            text = self.scrub.text(json.dumps(data, ensure_ascii=False))
            return JSONResponse(json.loads(text), status_code=response.status_code)
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._public(response.body_iterator)
        return response

    async def _public(self, chunks):
        async for chunk in chunks:
            yield self.scrub.event(chunk)


def build_app(
    model_dir: Path,
    model_name: str,
    system_prompt: str | None = None,
    api_key: str | None = None,
    limits: ServeLimits | None = None,
    device: str = "auto",
    hosts: set[str] | None = None,
):
    """The FastAPI app: transformers' chat-completions handler behind lorafit's guards.

    ``hosts``: the Host headers a keyless server answers (None: any, as in unit tests).
    """
    chat = GuardedChat(
        model_dir, model_name, system_prompt, api_key, limits or ServeLimits(), device, hosts
    )
    app = FastAPI(title=f"lorafit serve: {model_name}")
    app.middleware("http")(chat.guard)
    app.get("/health")(chat.health)
    app.get("/v1/models")(chat.models)
    app.post("/v1/chat/completions")(chat.chat_completions)
    return app


class HoldsSlot(StreamingResponse):
    """A streamed response that gives its place in the queue back when sending ends, however
    it ends: finished, failed, or the client gone (even before the first chunk)."""

    def __init__(self, inner: StreamingResponse, release):
        self.__dict__.update(inner.__dict__)
        self._release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def serve(
    target: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: ServeLimits | None = None,
    model_name: str | None = None,
) -> None:
    import uvicorn

    from lorafit.merge import servable_dir
    from lorafit.rundir import MERGE_INFO, read_json

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if host not in LOOPBACK and not api_key:
        raise LorafitError(
            f"--host {host} exposes the model to the network without an API key; "
            f"set --api-key or {API_KEY_ENV} (or keep the default 127.0.0.1)"
        )
    model_dir = servable_dir(target)
    merge_info = model_dir / MERGE_INFO
    system_prompt = read_json(merge_info).get("system_prompt") if merge_info.is_file() else None
    name = model_name or Path(str(target).rstrip("/")).name or "lorafit"
    hosts = None if api_key else allowed_hosts(host, port)
    app = build_app(model_dir, name, system_prompt, api_key, limits, hosts=hosts)
    uvicorn.run(app, host=host, port=port, log_level="warning")
