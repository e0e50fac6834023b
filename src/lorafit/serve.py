"""Serve stage: an OpenAI-compatible HTTP API for a tuned model.

    lorafit serve runs/demo --port 8000
    # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...).chat.completions.create(...)

Generation and the OpenAI wire format (plain and streamed chat completions) come from
``transformers serve``'s own handler; this module only puts a guarded front on it:
- one model, named after the run (``/v1/models``); any other model name is a 404;
- an optional API key (``--api-key`` or ``LORAFIT_API_KEY``) checked on every request;
- bounded request size and ``max_tokens``, and a bounded queue of waiting requests (503 when
  full), so a client cannot make the server run out of memory;
- malformed JSON, empty or ill-typed messages and unsupported fields are 4xx answers;
- the system turn the model was trained with is added when the client sends none.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request  # module level: FastAPI resolves annotations by name
from fastapi.responses import JSONResponse, StreamingResponse

from lorafit.errors import LorafitError

API_KEY_ENV = "LORAFIT_API_KEY"
ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
# Fields that would bypass the server's bounds (generation_config sets max_new_tokens freely).
REFUSED_FIELDS = frozenset({"generation_config"})


@dataclass
class ServeLimits:
    max_request_bytes: int = 1_000_000
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256  # when the request does not say
    max_waiting: int = 64  # requests queued or running; more get 503


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": code}}, status_code=status
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


def validate_chat_request(body, model_name: str, limits: ServeLimits):
    """Return (status, message) for a bad request, or None. Fills in defaults in ``body``."""
    if not isinstance(body, dict):
        return 400, "the request body must be a JSON object"
    model = body.get("model")
    if model is not None and model != model_name:
        return 404, f"model {model!r} not found; this server serves {model_name!r}"
    refused = REFUSED_FIELDS & set(body)
    if refused:
        return 400, f"unsupported field(s): {', '.join(sorted(refused))}"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return 400, "messages must be a non-empty list of {role, content} objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return 400, f"messages[{i}]: needs a role among {', '.join(sorted(ROLES))}"
        content = m.get("content")
        if not isinstance(content, str | list) or (
            isinstance(content, list) and not all(isinstance(p, dict) for p in content)
        ):
            return 400, f"messages[{i}].content: must be a string or a list of content parts"
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return 400, f"{key}: must be a positive integer"
        if value > limits.max_tokens:
            return 400, f"{key}: {value} is above this server's limit of {limits.max_tokens}"
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = limits.default_max_tokens
    for key in ("temperature", "top_p"):
        if body.get(key) is not None and not isinstance(body[key], int | float):
            return 400, f"{key}: must be a number"
    return None


async def _renamed(chunks, private: str, public: str):
    async for chunk in chunks:
        if isinstance(chunk, bytes):
            chunk = chunk.decode()
        yield chunk.replace(private, public)


def build_app(
    model_dir: Path,
    model_name: str,
    system_prompt: str | None = None,
    api_key: str | None = None,
    limits: ServeLimits | None = None,
    device: str = "auto",
):
    """The FastAPI app: transformers' chat-completions handler behind lorafit's guards."""
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import GenerationState

    limits = limits or ServeLimits()
    manager = ModelManager(device=device, dtype="auto", force_model=str(model_dir))
    state = GenerationState(continuous_batching=False, compile=False)
    handler = ChatCompletionHandler(
        model_manager=manager, generation_state=state, chat_template_kwargs={}
    )
    waiting = asyncio.Semaphore(limits.max_waiting)
    private, public = json.dumps(str(model_dir))[1:-1], json.dumps(model_name)[1:-1]
    app = FastAPI(title=f"lorafit serve: {model_name}")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and request.url.path != "/health":
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key", "authentication_error")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_request_bytes:
            if int(size) <= limits.max_request_bytes * DRAIN_FACTOR:
                await read_bounded_body(request, limits.max_request_bytes)
            return _error(413, f"request body over {limits.max_request_bytes} bytes")
        return await call_next(request)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "lorafit"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await read_bounded_body(request, limits.max_request_bytes)
        if raw is None:
            return _error(413, f"request body over {limits.max_request_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"malformed JSON: {e}")
        problem = validate_chat_request(body, model_name, limits)
        if problem:
            status, message = problem
            return _error(status, message, code="model_not_found" if status == 404 else None)
        if system_prompt and not any(m.get("role") == "system" for m in body["messages"]):
            body["messages"] = [{"role": "system", "content": system_prompt}, *body["messages"]]
        body["model"] = str(model_dir)
        if waiting.locked():
            return _error(503, "server busy: too many requests waiting; retry later", "overloaded")
        async with waiting:
            response = await handler.handle_request(body, str(uuid.uuid4()))
        if isinstance(response, JSONResponse):
            # report the public model name, not the server's directory
            data = json.loads(response.body)
            if isinstance(data, dict) and "model" in data:
                data["model"] = model_name
            return JSONResponse(data, status_code=response.status_code)
        if isinstance(response, StreamingResponse):
            response.body_iterator = _renamed(response.body_iterator, private, public)
        return response

    return app


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
    from lorafit.rundir import read_json

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise LorafitError(
            f"--host {host} exposes the model to the network without an API key; "
            f"set --api-key or {API_KEY_ENV} (or keep the default 127.0.0.1)"
        )
    model_dir = servable_dir(target)
    merge_info = model_dir / "lorafit_merge.json"
    system_prompt = read_json(merge_info).get("system_prompt") if merge_info.is_file() else None
    name = model_name or Path(str(target).rstrip("/")).name or "lorafit"
    app = build_app(model_dir, name, system_prompt, api_key, limits)
    uvicorn.run(app, host=host, port=port, log_level="warning")
