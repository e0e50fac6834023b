"""Read training files and turn every row into chat messages, with errors that say where.

Formats are detected from each row's keys; one file holds one format:

    prompt/response      {"prompt": "What is ATP?", "response": "ATP stands for ..."}
    prompt/completion    {"prompt": "...", "completion": "..."}
    messages             {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}
    alpaca               {"instruction": "...", "input": "...", "output": "..."}

Files are JSONL (one object per line) or a JSON array (.json). The loss is later put on the
last assistant turn only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError
from lorafit.paths import temp_sibling
from lorafit.shipped import resolve

FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (required keys, optional keys)
    "prompt/response": (("prompt", "response"), ("system", "history")),
    "prompt/completion": (("prompt", "completion"), ("system", "history")),
    "messages": (("messages",), ()),
    "alpaca": (("instruction", "output"), ("input", "system")),
}
# Fields any format may carry: what `lorafit data generate` writes beside each question
# (its kind, and for held-out rows what the judge needs beyond the reference answer).
EXTRA_FIELDS = ("kind", "judge")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One training example: the conversation so far and the answer to learn."""

    prompt: tuple[dict[str, str], ...]  # system/user/assistant turns before the answer
    answer: str
    line: int = 0
    kind: str | None = None  # the question's kind (lorafit.data.kinds) when the row says
    judge: dict | None = None  # facts for judging held-out answers of that kind

    def messages(self) -> list[dict[str, str]]:
        return [*self.prompt, {"role": "assistant", "content": self.answer}]


@dataclass
class Dataset:
    path: str
    format: str
    examples: list[Example]
    warnings: list[str] = field(default_factory=list)
    duplicates: int = 0
    unknown_fields: set[str] = field(default_factory=set)


def detect_format(row: dict[str, Any]) -> str | None:
    keys = set(row)
    for name, (required, _optional) in FORMATS.items():
        if set(required) <= keys:
            return name
    return None


def _text(row: dict[str, Any], key: str, where: str, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None:
        raise LorafitError(f"{where}: field '{key}' is missing or null")
    if not isinstance(value, str):
        raise LorafitError(
            f"{where}: field '{key}' must be a string, got {type(value).__name__} ({value!r:.40})"
        )
    if not allow_empty and not value.strip():
        raise LorafitError(f"{where}: field '{key}' is empty")
    return value


def _messages(row: dict[str, Any], where: str) -> tuple[tuple[dict[str, str], ...], str]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise LorafitError(f"{where}: field 'messages' must be a non-empty list of turns")
    turns = []
    for i, m in enumerate(msgs):
        spot = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            raise LorafitError(f"{spot}: expected an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise LorafitError(f"{spot}: field 'role' must be one of {ROLES}, got {role!r}")
        turns.append({"role": role, "content": _text(m, "content", spot)})
    if turns[-1]["role"] != "assistant":
        raise LorafitError(f"{where}: the last turn in 'messages' must be the assistant's answer")
    if not any(t["role"] == "user" for t in turns):
        raise LorafitError(f"{where}: 'messages' has no user turn")
    return tuple(turns[:-1]), turns[-1]["content"]


def _extras(row: dict[str, Any], where: str) -> dict[str, Any]:
    kind, judge = row.get("kind"), row.get("judge")
    if kind is not None and not isinstance(kind, str):
        raise LorafitError(f"{where}: field 'kind' must be a string (a question kind)")
    if judge is not None and not isinstance(judge, dict):
        raise LorafitError(f"{where}: field 'judge' must be an object")
    return {"kind": kind, "judge": judge}


def _history(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """Earlier turns of a prompt/response row: user and assistant alternating, user first."""
    history = row.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise LorafitError(f"{where}: field 'history' must be a list of earlier turns")
    turns = []
    for i, turn in enumerate(history):
        spot = f"{where}: history[{i}]"
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(turn, dict) or turn.get("role") != want:
            raise LorafitError(f"{spot}: expected a {want} turn {{'role', 'content'}}")
        turns.append({"role": want, "content": _text(turn, "content", spot)})
    if len(turns) % 2:
        raise LorafitError(f"{where}: 'history' must end with the assistant's answer")
    return turns


def row_to_example(row: dict[str, Any], fmt: str, where: str, line: int = 0) -> Example:
    """Convert one validated row of format ``fmt`` to an :class:`Example`."""
    extras = _extras(row, where)
    if fmt == "messages":
        prompt, answer = _messages(row, where)
        return Example(prompt=prompt, answer=answer, line=line, **extras)
    system = row.get("system")
    turns: list[dict[str, str]] = []
    if system is not None:
        turns.append({"role": "system", "content": _text(row, "system", where)})
    if fmt != "alpaca":
        turns += _history(row, where)
    if fmt == "alpaca":
        user = _text(row, "instruction", where)
        extra = _text(row, "input", where, allow_empty=True) if row.get("input") is not None else ""
        if extra.strip():
            user = f"{user}\n\n{extra}"
        answer = _text(row, "output", where)
    else:
        user = _text(row, "prompt", where)
        answer = _text(row, "response" if fmt == "prompt/response" else "completion", where)
    turns.append({"role": "user", "content": user})
    return Example(prompt=tuple(turns), answer=answer, line=line, **extras)


def _decode(path: Path) -> str:
    if not path.is_file():
        raise LorafitError(f"{path}: data file not found")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raise LorafitError(
            f"{path}:1: the file starts with a UTF-8 byte-order mark (BOM), which JSON does not "
            "allow; re-save it as UTF-8 without BOM (e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//' FILE`)"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LorafitError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "re-save the file as UTF-8"
        ) from e


def _rows(path: Path, text: str) -> list[tuple[str, int, Any]]:
    """(where, line, parsed object) for each record, JSON array or JSONL."""
    if not text.strip():
        raise LorafitError(
            f'{path}: the file is empty; expected JSONL rows like {{"prompt": ..., "response": ...}}'
        )
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise LorafitError(f"{path}:{e.lineno}: invalid JSON array: {e.msg}") from e
        if not isinstance(items, list):
            raise LorafitError(f"{path}: expected a JSON array of objects")
        return [(f"{path}: item {i}", 0, item) for i, item in enumerate(items)]
    rows = []
    lines = jsonl_lines(text)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{lineno}", lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            hint = (
                " (the line looks cut off: was the file fully written?)"
                if lineno == len(lines)
                else ""
            )
            raise LorafitError(
                f"{path}:{lineno}: invalid JSON: {e.msg} at column {e.colno}{hint}"
            ) from e
    return rows


def read_dataset(path: str | Path) -> Dataset:
    """Read, detect the format of, and validate a training/eval file.

    Raises LorafitError on the first bad row (file:line: field: problem); soft problems
    (duplicates, unknown extra fields) are collected as warnings.
    """
    path = resolve(path)
    rows = _rows(path, _decode(path))
    fmt: str | None = None
    first_where = ""
    examples: list[Example] = []
    unknown: set[str] = set()
    seen: set[tuple] = set()
    duplicates = 0
    for where, lineno, row in rows:
        if not isinstance(row, dict):
            raise LorafitError(f"{where}: expected a JSON object, got {type(row).__name__}")
        row_fmt = detect_format(row)
        if row_fmt is None:
            expected = "; ".join(f"{n}: {'+'.join(req)}" for n, (req, _) in FORMATS.items())
            raise LorafitError(
                f"{where}: unknown format: keys {sorted(row)}; expected one of: {expected}"
            )
        if fmt is None:
            fmt, first_where = row_fmt, where
        elif row_fmt != fmt:
            raise LorafitError(
                f"{where}: mixed formats: this row is {row_fmt!r} but {first_where} is {fmt!r}; "
                "use one format per file"
            )
        required, optional = FORMATS[fmt]
        unknown |= set(row) - set(required) - set(optional) - set(EXTRA_FIELDS)
        example = row_to_example(row, fmt, where, lineno)
        key = (tuple((t["role"], t["content"]) for t in example.prompt), example.answer)
        if key in seen:
            duplicates += 1
        seen.add(key)
        examples.append(example)
    warnings = []
    if duplicates:
        warnings.append(f"{path}: {duplicates} duplicate row(s) (kept; they weigh double)")
    if unknown:
        warnings.append(f"{path}: ignored unknown field(s): {', '.join(sorted(unknown))}")
    assert fmt is not None
    return Dataset(str(path), fmt, examples, warnings, duplicates, unknown)


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text. Split on \n only (a \r before it is dropped): str.splitlines()
    also splits at U+2028, U+2029, U+0085 and other characters that are valid inside a JSON
    string, which would cut a row in two."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_jsonl_lines(path: str | Path) -> list[Any]:
    """Every non-blank line of a JSONL file lorafit wrote (a cache, predictions), parsed."""
    text = Path(path).read_text(encoding="utf-8")
    return [json.loads(line) for line in jsonl_lines(text) if line.strip()]


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL atomically (temp file + rename): never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
