"""What `lorafit serve` accepts in an OpenAI chat request, checked before any work is done.

Every field is checked for type and bounds before the request reaches transformers' handler,
so a malformed request is a 4xx with a message, never a 500, and nothing a client sends reaches
the chat template as code or the generation config as raw settings:
- fields that change the chat template or generation internals (``chat_template``,
  ``chat_template_kwargs``, ``generation_config``, ...) are refused: a client-sent Jinja
  template with nested loops froze every endpoint, /health included;
- unknown fields are refused by name (the handler would answer a bare 422);
- JSON nesting is bounded (a deeply nested body crashed ``json.loads`` with RecursionError);
- content parts, tool calls, ``logit_bias``, ``stop`` and the sampling numbers are checked.
The prompt's length in tokens is checked by lorafit.serve, which owns the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
# Fields that reach Jinja or the generation config as code or raw settings.
REFUSED_FIELDS = frozenset(
    {
        "chat_template",
        "chat_template_kwargs",
        "generation_config",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "top_k",
        "repetition_penalty",
    }
)
ACCEPTED_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stream",
        "stream_options",
        "stop",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "n",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "response_format",
        "logprobs",
    }
)
MAX_STOP = 4  # as OpenAI's API
MAX_STOP_CHARS = 64  # each stop string costs the handler ~40 ms to prepare
MAX_TOOLS = 32


@dataclass
class ServeLimits:
    max_request_bytes: int = 1_000_000
    max_tokens: int = 1024  # the most a request may ask for
    default_max_tokens: int = 256  # when the request does not say (never above max_tokens)
    max_waiting: int = 64  # requests queued or running, streams until they end; more get 503
    max_context: int | None = None  # prompt + max_tokens; None: the model's own context
    max_depth: int = 32  # JSON nesting
    max_messages: int = 1024


class BadRequest(Exception):
    """A request the server refuses: ``status`` and a message for the client."""

    def __init__(self, message: str, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def parse_body(raw: bytes, limits: ServeLimits) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    except RecursionError:
        raise BadRequest(f"JSON nested deeper than {limits.max_depth} levels") from None
    if _depth(body) > limits.max_depth:
        raise BadRequest(f"JSON nested deeper than {limits.max_depth} levels")
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack += [(v, level + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, level + 1) for v in item]
    return deepest


def _number(body: dict, key: str, low: float, high: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"{key}: must be a number from {low} to {high}")


def _content(i: int, content: Any) -> None:
    where = f"messages[{i}].content"
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise BadRequest(f"{where}: must be a string or a list of content parts")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise BadRequest(f"{where}[{j}]: a content part is an object with a 'type'")
        if part["type"] != "text":
            raise BadRequest(f"{where}[{j}]: type {part['type']!r}: this model reads text only")
        if not isinstance(part.get("text"), str):
            raise BadRequest(f"{where}[{j}]: a text part needs 'text' (a string)")


def _tool_calls(i: int, calls: Any) -> None:
    where = f"messages[{i}].tool_calls"
    if calls is None:
        return
    if not isinstance(calls, list):
        raise BadRequest(f"{where}: must be a list")
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"{where}[{j}]: needs a 'function' with a 'name'")
        arguments = function.get("arguments")
        try:
            if not isinstance(arguments, str):
                raise ValueError
            json.loads(arguments)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            raise BadRequest(f"{where}[{j}].function.arguments: must be a JSON string") from None


def _messages(body: dict, limits: ServeLimits) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    if len(messages) > limits.max_messages:
        raise BadRequest(f"messages: at most {limits.max_messages}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}]: needs a role among {', '.join(sorted(ROLES))}")
        if m.get("content") is None and not m.get("tool_calls"):
            raise BadRequest(f"messages[{i}]: needs content")
        _content(i, m.get("content"))
        _tool_calls(i, m.get("tool_calls"))
        if m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
            raise BadRequest(f"messages[{i}].tool_call_id: must be a string")


def _token_bound(body: dict, limits: ServeLimits) -> None:
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadRequest(f"{key}: must be a positive integer")
        if value > limits.max_tokens:
            raise BadRequest(f"{key}: {value} is above this server's limit of {limits.max_tokens}")
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = min(limits.default_max_tokens, limits.max_tokens)


def _sampling(body: dict, vocab_size: int) -> None:
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "frequency_penalty", -0.99, 2)  # the handler uses 1 + it as a divisor
    _number(body, "presence_penalty", -2, 2)
    if body.get("n") not in (None, 1):
        raise BadRequest("n: this server returns one choice per request")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest("seed: must be an integer")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise BadRequest("stream: must be true or false")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stop is not None and (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise BadRequest(f"stop: a string or up to {MAX_STOP} strings of 1-{MAX_STOP_CHARS} chars")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise BadRequest("logit_bias: must map token ids to numbers")
        for key, value in bias.items():
            if not key.isdigit() or int(key) >= vocab_size:
                raise BadRequest(f"logit_bias: {key!r} is not a token id below {vocab_size}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise BadRequest(f"logit_bias[{key}]: must be a number from -100 to 100")
            if not -100 <= value <= 100:
                raise BadRequest(f"logit_bias[{key}]: must be a number from -100 to 100")
        body["logit_bias"] = {k: float(v) for k, v in bias.items()}  # the handler wants floats
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise BadRequest("response_format: only {'type': 'text'} is supported")
    if body.get("logprobs"):
        raise BadRequest("logprobs: not supported by this server")
    tools = body.get("tools")
    if tools is not None and (
        not isinstance(tools, list)
        or len(tools) > MAX_TOOLS
        or not all(isinstance(t, dict) for t in tools)
    ):
        raise BadRequest(f"tools: a list of at most {MAX_TOOLS} tool objects")


def validate_chat_request(
    body: dict, model_name: str, limits: ServeLimits, vocab_size: int = 2**31
) -> None:
    """Raise BadRequest for anything the server will not run; fill in the token bound."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise BadRequest(
            f"model {model!r} not found; this server serves {model_name!r}",
            404,
            "model_not_found",
        )
    refused = sorted(REFUSED_FIELDS & set(body))
    if refused:
        raise BadRequest(
            f"not accepted by this server: {', '.join(refused)} (it would change the chat "
            "template or the generation settings the model was checked with)"
        )
    unknown = sorted(set(body) - ACCEPTED_FIELDS - REFUSED_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    _messages(body, limits)
    _token_bound(body, limits)
    _sampling(body, vocab_size)
