"""The base model's answers, cached: they do not change between runs.

Evaluation answers every held-out prompt twice, with the base model and with the tuned one.
The base model and its greedy answers are the same for every run on the same base, so they are
kept under ``$LORAFIT_HOME/answers``, keyed by what decides them: the base model's content
(its hash, or its Hub commit), the exact chat prompt, the answer length bound, and the code
and machine that compute them (library versions, CPU kind, device and dtype: floating point
sums in other orders can flip a near-tie). Greedy decoding is deterministic for all of these
fixed, so a cached answer is the answer the model would give again (in a batch of the same
prompts: a prompt batched with others of other lengths can flip a near-tie too).

lorafit also ships answers of its embedded default model (``lorafit:answers/KEY.jsonl``), made
by ``make base-answers`` with the demo on one machine kind: the demo's held-out questions,
probes and replay prompts. They are read, never written, under the same keys, so only a machine
that would compute the very same answers (same model bytes, libraries, CPU instruction set and
precision) uses them; any other computes and caches its own. The replay prompts alone take a
minute on a 2-core CPU and the base model's eval answers two.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from lorafit.data.formats import read_jsonl_lines, write_jsonl
from lorafit.paths import exclusive_lock, lorafit_home

FOLDER = "answers"
# the instruction sets CPU matmul kernels dispatch on: another set sums in another order
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_isa() -> list[str]:
    """Which of ISA_FLAGS this CPU has (empty where /proc/cpuinfo is missing)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in ISA_FLAGS if f in flags]


def model_key(base_record: dict, model, precision: str = "fp32") -> str:
    """What decides the base model's greedy answers, as one hash (``precision``: the autocast
    they are computed in; fp32 keeps the keys cached before it was a setting)."""
    from importlib.metadata import version

    param = next(model.parameters())
    if base_record.get("sha256"):  # the content alone: the same file in another place or name
        base = {"sha256": base_record["sha256"]}
    else:
        base = {k: base_record.get(k) for k in ("kind", "source", "revision", "name")}
    identity = {
        "base": base,
        "device": str(param.device),
        "dtype": str(param.dtype),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "machine": [platform.machine(), cpu_isa()],
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
        ship = shipped_answers(key)
        keys = [_prompt_key(p, max_new_tokens) for p in prompts]
        todo = [i for i, k in enumerate(keys) if k not in known and k not in ship]
        if progress is not None and len(todo) < len(prompts):
            progress(len(prompts) - len(todo))
        if todo:
            for i, (text, stopped) in zip(todo, answer([prompts[i] for i in todo]), strict=True):
                known[keys[i]] = {"key": keys[i], "text": text, "stopped": stopped}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, list(known.values()))
        found = {**ship, **known}
        return [(found[k]["text"], found[k]["stopped"]) for k in keys]


def shipped_answers(key: str) -> dict[str, dict]:
    """The answers lorafit ships under ``key`` ({prompt key: record}; empty for most keys)."""
    from lorafit.shipped import available, shipped

    name = f"{key}.jsonl"
    if name not in available(FOLDER):
        return {}
    return {r["key"]: r for r in read_jsonl_lines(shipped(f"{FOLDER}/{name}"))}
