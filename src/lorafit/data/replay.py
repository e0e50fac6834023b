"""Self-generated replay: keep the base model's general abilities while it learns a domain.

Before training, the *base* model answers a shipped set of general prompts
(``lorafit:replay/general.jsonl``: arithmetic, geography, units, science, language, everyday
questions; disjoint from the probe set that measures forgetting). Those prompt/answer pairs are
mixed into the training data so that the adapter also learns "answer general questions the way
you already did". No dataset download, and the answers are in the model's own voice.

``data.replay`` is the share of replay examples in the final mix (0 turns it off). Only answers
that ended by themselves within ``data.replay_max_tokens`` are used (no run-on text is taught,
and short answers keep replay cheap). The base model's answers are
cached with its evaluation answers (lorafit.answer_cache), per prompt.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from lorafit.config import REPLAY_MAX_NEW_TOKENS
from lorafit.data.formats import Example, read_jsonl_lines
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


def base_answers(
    model,
    tokenizer,
    key: str | None,
    prompts_file: Path,
    system_prompt: str | None,
    needed: int | None = None,
    seed: int = 0,
    max_new_tokens: int = REPLAY_MAX_NEW_TOKENS,
    precision: str = "fp32",
    sources=None,
) -> list[dict]:
    """The base model's greedy answers to replay prompts, in a seeded order, computed in
    ``precision`` and cached under ``key`` (lorafit.answer_cache.model_key; None: no cache;
    ``sources``: a Counter of where the answers came from).

    Prompts are answered in batches until ``needed`` answers ended by themselves (all of them
    when ``needed`` is None); a later run that needs more extends the same cache. One process
    answers a batch at a time: the ranks of a torchrun job (or two runs on one machine) share
    the cache, and the ones that waited find the answers there instead of regenerating.
    """
    from lorafit.answer_cache import cached_answers
    from lorafit.inference import chat_prompt, generate

    order = read_prompts(prompts_file)
    random.Random(f"replay:{seed}").shuffle(order)

    def answer(todo):
        if not logged:
            log.info("replay: the base model answers general prompts (cached for next time)")
            logged.append(True)
        return generate(
            model,
            tokenizer,
            todo,
            max_new_tokens=max_new_tokens,
            batch_size=BATCH,
            precision=precision,
        )

    logged: list[bool] = []
    rows: list[dict] = []
    for start in range(0, len(order), BATCH):
        if needed is not None and sum(r["stopped"] for r in rows) >= needed:
            break
        batch = order[start : start + BATCH]
        prompts = [chat_prompt(p, system_prompt) for p in batch]
        answers = cached_answers(key, prompts, max_new_tokens, answer, sources=sources)
        rows += [
            {"prompt": p, "response": text, "stopped": stopped}
            for p, (text, stopped) in zip(batch, answers, strict=True)
        ]
    return rows


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
