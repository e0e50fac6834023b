"""The base model's answers, cached: they do not change between runs.

Evaluation answers every held-out prompt twice, with the base model and with the tuned one.
The base model and its greedy answers are the same for every run on the same base, so they are
kept under ``$LORAFIT_HOME/answers``, keyed by what decides them: the base model's content
(its hash, or its Hub commit), the exact chat prompt, the answer length bound, and the code
and machine that compute them (library versions, CPU kind, device and dtype: floating point
sums in other orders can flip a near-tie). Greedy decoding is deterministic for all of these
fixed, so a cached answer is the answer the model would give again, up to near-ties: a prompt
batched with others of other lengths (another batch size, another set of prompts) can flip a
near-tie too, and so can another number of compute threads (1 of the demo's first 48 held-out
answers differs at 1 thread from 2) or another CPU of the same instruction sets. Those are not
in the key: they would keep every machine from the shipped answers for a near-tie or two.

lorafit also ships answers of its embedded default model (``lorafit:answers/KEY.jsonl``), made
by ``make base-answers`` with the demo on one machine kind: the demo's held-out questions,
probes and replay prompts, answered in the demo's batches. They are read, never written, under
the same keys, so only a machine with the same model bytes, libraries, CPU instruction sets,
device and precision uses them; any other computes and caches its own. The replay prompts
alone take a minute on a 2-core CPU and the base model's eval answers two. Evaluation records
where its base answers came from (metrics.json ``base_answers``: shipped, cached, computed);
the tuned model's answers are always computed. ``eval.cache_base_answers: false`` computes
every base answer, for evaluation and replay alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections import Counter
from pathlib import Path

from lorafit.data.formats import read_jsonl_lines, write_jsonl
from lorafit.paths import exclusive_lock, lorafit_home

log = logging.getLogger(__name__)

FOLDER = "answers"
# bump when lorafit's generation or prompt rendering changes what the base model answers:
# every cached and shipped answer is then stale (make base-answers ships new ones)
ANSWERS_VERSION = 3  # 3: ended answers leave their batch (inference.greedy_ids)
# the instruction sets CPU matmul kernels dispatch on: another set sums in another order
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_isa() -> list[str]:
    """Which of ISA_FLAGS this CPU has (empty where /proc/cpuinfo is missing)."""
    from lorafit.model import cpu_flags

    flags = cpu_flags()
    return [f for f in ISA_FLAGS if f in flags]


def model_key(base_record: dict, model, precision: str = "fp32") -> str:
    """What decides the base model's greedy answers, as one hash (``precision``: the autocast
    they are computed in)."""
    return key_of(model_identity(base_record, model, precision))


def key_of(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def model_identity(base_record: dict, model, precision: str = "fp32") -> dict:
    """What decides the base model's greedy answers: model, code, libraries, machine."""
    from importlib.metadata import version

    from lorafit.inference import is_quantized
    from lorafit.loss import _causal_lm

    param = next(model.parameters())
    if base_record.get("kind") in ("embedded", "gguf") and base_record.get("sha256"):
        # a GGUF holds weights, tokenizer and chat template: its content alone, wherever it
        # lies (the embedded one is inside each checkout's virtualenv)
        base = {"sha256": base_record["sha256"]}
    else:  # a folder's hash covers its weights only: its path keeps its own chat template
        base = {k: base_record.get(k) for k in ("kind", "source", "revision", "sha256", "name")}
    device = param.device.type
    if device == "cuda":
        import torch

        device = f"cuda:{torch.cuda.get_device_name(param.device)}"  # any rank of a job
    identity = {
        "base": base,
        "device": device,
        "dtype": str(param.dtype),
        "lorafit": ANSWERS_VERSION,
        "torch": version("torch"),
        "transformers": version("transformers"),
        "machine": [platform.machine(), cpu_isa()],
    }
    if precision != "fp32":
        identity["precision"] = precision
    if is_quantized(model):  # the embeddings (the first parameter) are never quantized
        quant = getattr(_causal_lm(model).config, "quantization_config", None)
        quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
        identity["quantization"] = json.dumps(quant, sort_keys=True, default=str)
    return identity


def write_shipped_identity(folder: str | Path) -> Path:
    """Write ``KEY.json`` (what the key stands for, and the compute threads, which are not in
    the key but can tip a near-tie) next to the answers ``make base-answers`` made in
    ``folder`` with the demo's model and precision on this machine, so that a test can tell, on
    any machine, that shipped answers are stale (another lorafit answer version, other
    libraries), and recompute some in the same conditions."""
    import torch

    from lorafit.rundir import write_json

    identity = _demo_identity()
    answers = Path(folder) / f"{key_of(identity)}.jsonl"
    if not answers.is_file():
        raise FileNotFoundError(f"{answers}: the demo's answers are not under this machine's key")
    write_json(
        answers.with_suffix(".json"), {"identity": identity, "threads": torch.get_num_threads()}
    )
    return answers.with_suffix(".json")


def drop_stale_shipped(folder: str | Path) -> list[Path]:
    """Before ``make base-answers`` makes this machine kind's answers again: delete them, and
    every shipped file made from another base model, by another lorafit answer version or
    other torch/transformers versions, or without its ``KEY.json`` (no machine can use those). The current files of other machine kinds stay: this
    machine cannot make them."""
    identity = _demo_identity()
    current = {k: identity[k] for k in ("base", "lorafit", "torch", "transformers")}
    dropped = []
    for answers in sorted(Path(folder).glob("*.jsonl")):
        made = answers.with_suffix(".json")  # none: answers nothing says the key of
        other = json.loads(made.read_text()).get("identity", {}) if made.is_file() else {}
        if other == identity or any(other.get(k) != v for k, v in current.items()):
            for path in (made, answers):
                if path.exists():
                    path.unlink()
                    dropped.append(path)
    return dropped


def _demo_identity() -> dict:
    """What keys the demo's base answers on this machine (its model, precision, libraries)."""
    from lorafit.config import load_config
    from lorafit.model import load_model, resolve_precision
    from lorafit.sources import resolve_base

    config = load_config("demo", [])
    base = resolve_base(config.model)
    model = load_model(config.model, base.dir, "cpu")
    return model_identity(base.record(), model, resolve_precision(config.eval.precision, "cpu"))


def _prompt_key(prompt: list[dict], max_new_tokens: int) -> str:
    return hashlib.sha256(json.dumps([prompt, max_new_tokens]).encode()).hexdigest()


def cached_answers(
    key: str | None,
    prompts: list,
    max_new_tokens: int,
    answer,
    progress=None,
    sources: Counter | None = None,
):
    """``answer(prompts)`` for the prompts not cached under ``key`` (None: no cache), the rest
    from the cache; [(text, stopped)] in prompt order. ``sources`` counts where the answers
    came from (shipped, cached, computed)."""
    sources = Counter() if sources is None else sources
    if key is None:
        sources["computed"] += len(prompts)
        return answer(prompts)
    path = lorafit_home() / FOLDER / f"{key}.jsonl"
    with exclusive_lock(path.with_suffix(".lock")):  # two evaluations never race on the file
        known = _read(path)
        ship = shipped_answers(key)
        keys = [_prompt_key(p, max_new_tokens) for p in prompts]
        todo = [i for i, k in enumerate(keys) if k not in known and k not in ship]
        sources["cached"] += sum(k in known for k in keys)
        sources["shipped"] += sum(k in ship and k not in known for k in keys)
        sources["computed"] += len(todo)
        if progress is not None and len(todo) < len(prompts):
            progress(len(prompts) - len(todo))
        if todo:
            for i, (text, stopped) in zip(todo, answer([prompts[i] for i in todo]), strict=True):
                known[keys[i]] = {"key": keys[i], "text": text, "stopped": stopped}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(path, list(known.values()))
        found = {**ship, **known}
        return [(found[k]["text"], found[k]["stopped"]) for k in keys]


def _read(path: Path) -> dict[str, dict]:
    """The cache file's answers by prompt key; an unreadable file counts as empty (its answers
    are computed again and the file rewritten) rather than stopping a training or evaluation."""
    if not path.is_file():
        return {}
    try:
        return {r["key"]: r for r in read_jsonl_lines(path) if {"text", "stopped"} <= r.keys()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s is unreadable (%s): its answers are computed again", path, e)
        return {}


def shipped_answers(key: str) -> dict[str, dict]:
    """The answers lorafit ships under ``key`` ({prompt key: record}; empty for most keys)."""
    from lorafit.shipped import available, shipped

    name = f"{key}.jsonl"
    if name not in available(FOLDER):
        return {}
    return {r["key"]: r for r in read_jsonl_lines(shipped(f"{FOLDER}/{name}"))}
