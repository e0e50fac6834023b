"""The base model's answers, cached: they do not change between runs.

Evaluation answers every held-out prompt twice, with the base model and with the tuned one.
The base model and its greedy answers are the same for every run on the same base, so they are
kept under ``$LORAFIT_HOME/answers``, keyed by what decides them: the base model's content
(its hash, or its Hub commit), the exact chat prompt, the answer length bound, and the code
and machine that compute them (library versions, CPU kind, device and dtype: floating point
sums in other orders can flip a near-tie). Greedy decoding is deterministic for all of these
fixed, so a cached answer is the answer the model would give again.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from lorafit.data.formats import read_jsonl_lines, write_jsonl
from lorafit.paths import exclusive_lock, lorafit_home

FOLDER = "answers"


def model_key(base_record: dict, model, precision: str = "fp32") -> str:
    """What decides the base model's greedy answers, as one hash (``precision``: the autocast
    they are computed in; fp32 keeps the keys cached before it was a setting)."""
    from importlib.metadata import version

    from lorafit.model import cpu_has_bf16

    param = next(model.parameters())
    identity = {
        "base": {k: base_record.get(k) for k in ("kind", "source", "revision", "sha256", "name")},
        "device": str(param.device),
        "dtype": str(param.dtype),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "machine": [platform.machine(), cpu_has_bf16()],
    }
    if precision != "fp32":
        identity["precision"] = precision
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _prompt_key(prompt: list[dict], max_new_tokens: int) -> str:
    return hashlib.sha256(json.dumps([prompt, max_new_tokens]).encode()).hexdigest()


def cached_answers(key: str | None, prompts: list, max_new_tokens: int, answer, progress=None):
    """``answer(prompts)`` for the prompts not cached under ``key`` (None: no cache), the rest
    from the cache; [(text, stopped)] in prompt order."""
    if key is None:
        return answer(prompts)
    path = lorafit_home() / FOLDER / f"{key}.jsonl"
    with exclusive_lock(path.with_suffix(".lock")):  # two evaluations never race on the file
        known = {r["key"]: r for r in read_jsonl_lines(path)} if path.is_file() else {}
        keys = [_prompt_key(p, max_new_tokens) for p in prompts]
        todo = [i for i, k in enumerate(keys) if k not in known]
        if progress is not None and len(todo) < len(prompts):
            progress(len(prompts) - len(todo))
        if todo:
            for i, (text, stopped) in zip(todo, answer([prompts[i] for i in todo]), strict=True):
                known[keys[i]] = {"key": keys[i], "text": text, "stopped": stopped}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, list(known.values()))
        return [(known[k]["text"], known[k]["stopped"]) for k in keys]


def cache_size(key: str) -> int:
    path = lorafit_home() / FOLDER / f"{key}.jsonl"
    return len(read_jsonl_lines(path)) if Path(path).is_file() else 0
