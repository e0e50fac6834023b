"""Self-generated replay: keep the base model's general abilities while it learns a domain.

Before training, the *base* model answers a shipped set of general prompts
(``lorafit:replay/general.jsonl``: arithmetic, geography, units, science, language, everyday
questions; disjoint from the probe set that measures forgetting). Those prompt/answer pairs are
mixed into the training data so that the adapter also learns "answer general questions the way
you already did". No dataset download, and the answers are in the model's own voice.

``data.replay`` is the share of replay examples in the final mix (0 turns it off). Only answers
that ended by themselves within ``data.replay_max_tokens`` are used (no run-on text is taught,
and short answers keep replay cheap). The base model's answers are
cached under ``$LORAFIT_HOME/replay`` per model, prompt set and system prompt.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

from lorafit.config import REPLAY_MAX_NEW_TOKENS
from lorafit.data.formats import Example, read_jsonl_lines, write_jsonl
from lorafit.paths import exclusive_lock, lorafit_home
from lorafit.shipped import REPLAY_PROMPTS, resolve

log = logging.getLogger(__name__)

DEFAULT_REPLAY_PROMPTS = REPLAY_PROMPTS
BATCH = 48


def replay_count(domain_rows: int, share: float) -> int:
    """How many replay examples make them ``share`` of the final mix."""
    if share <= 0:
        return 0
    return round(domain_rows * share / (1 - share))


def read_prompts(path: str | Path) -> list[str]:
    return [row["prompt"] for row in read_jsonl_lines(resolve(path))]


def _cache_file(
    model_dir: Path, prompts_file: Path, system_prompt: str | None, max_new_tokens: int
) -> Path:
    key = hashlib.sha256()
    weights = sorted(model_dir.glob("*.safetensors"))
    key.update(str(model_dir.resolve()).encode())
    for w in weights:  # a changed model under the same path gets new answers
        key.update(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}".encode())
    key.update(resolve(prompts_file).read_bytes())
    key.update((system_prompt or "").encode())
    key.update(str(max_new_tokens).encode())
    return lorafit_home() / "replay" / f"{key.hexdigest()[:16]}.jsonl"


def base_answers(
    model,
    tokenizer,
    model_dir: Path,
    prompts_file: Path,
    system_prompt: str | None,
    needed: int | None = None,
    seed: int = 0,
    max_new_tokens: int = REPLAY_MAX_NEW_TOKENS,
) -> list[dict]:
    """The base model's greedy answers to replay prompts, in a seeded order, cached.

    Prompts are answered in batches until ``needed`` answers ended by themselves (all of them
    when ``needed`` is None); a later run that needs more extends the same cache.
    """
    cache = _cache_file(model_dir, prompts_file, system_prompt, max_new_tokens)
    # One process answers at a time: the ranks of a torchrun job (or two runs on one machine)
    # share this cache, and the ones that waited find the answers there instead of regenerating.
    with exclusive_lock(cache.with_suffix(".lock")):
        return _answer_and_cache(
            model, tokenizer, cache, prompts_file, system_prompt, needed, seed, max_new_tokens
        )


def _answer_and_cache(
    model, tokenizer, cache, prompts_file, system_prompt, needed, seed, max_new_tokens
) -> list[dict]:
    from lorafit.inference import chat_prompt, generate

    known = {}
    if cache.is_file():
        known = {r["prompt"]: r for r in read_jsonl_lines(cache)}
    order = read_prompts(prompts_file)
    random.Random(f"replay:{seed}").shuffle(order)

    def usable() -> int:
        return sum(known[p]["stopped"] for p in order if p in known)

    todo = [p for p in order if p not in known]
    if todo and (needed is None or usable() < needed):
        log.info("replay: the base model answers general prompts (cached for next time)")
    for start in range(0, len(todo), BATCH):
        if needed is not None and usable() >= needed:
            break
        batch = todo[start : start + BATCH]
        answers = generate(
            model,
            tokenizer,
            [chat_prompt(p, system_prompt) for p in batch],
            max_new_tokens=max_new_tokens,
            batch_size=BATCH,
        )
        for p, (text, stopped) in zip(batch, answers, strict=True):
            known[p] = {"prompt": p, "response": text, "stopped": stopped}
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(cache, list(known.values()))
    return [known[p] for p in order if p in known]


def replay_examples(rows: list[dict], count: int, seed: int) -> list[Example]:
    """``count`` replay examples from answers that stopped by themselves (cycled if needed)."""
    usable = [r for r in rows if r["stopped"] and r["response"].strip()]
    if not usable or count <= 0:
        return []
    rng = random.Random(seed)
    picked = []
    while len(picked) < count:  # more than the prompt set: repeat it, each pass shuffled
        batch = usable[:]
        rng.shuffle(batch)
        picked += batch[: count - len(picked)]
    return [
        Example(prompt=({"role": "user", "content": r["prompt"]},), answer=r["response"])
        for r in picked
    ]
