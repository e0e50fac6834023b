"""Generate question/answer pairs from a glossary, with held-out paraphrases for evaluation.

Every term gets ``train_per_term`` phrasings in train and ``eval_per_term`` phrasings in eval.
The eval phrasings come from a separate template pool that never appears in train, so
evaluation measures whether the model understood the term, not whether it memorized a prompt.

    lorafit data generate data/glossaries/aviation.yaml --out data/generated --seed 0
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from lorafit.data.formats import write_jsonl
from lorafit.data.glossary import Glossary, Term

# {t} = the term, {d} = the domain. Templates with {d} are skipped when there is no domain.
TRAIN_TEMPLATES = (
    "What is {t}?",
    "What does {t} mean?",
    "Define {t}.",
    "Explain {t}.",
    "Explain what is {t}.",
    "Can you explain what {t} is?",
    "What is meant by {t}?",
    "Give me a short definition of {t}.",
    "Tell me about {t}.",
    "What is the meaning of {t}?",
    "{t}: what is that?",
    "What is {t} in the {d} context?",
    "I keep hearing about {t} in {d}. What is it?",
    "Why does {t} matter in {d}?",
)
ACRONYM_TRAIN_TEMPLATES = ("What does {t} stand for?", "What is {t} short for?")
ALIAS_TRAIN_TEMPLATES = ("What does {a} mean?",)
EVAL_TEMPLATES = (
    "Could you tell me what {t} refers to?",
    "In {d}, what do people mean by {t}?",
    "Briefly describe {t}.",
    "What's {t}?",
    "I'm new here. What is {t}?",
    "Help me understand the term {t}.",
    "What do we mean when we say {t}?",
)


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str

    def as_row(self) -> dict[str, str]:
        return {"prompt": self.prompt, "response": self.response}


def answer_for(term: Term) -> str:
    """One consistent, natural answer: the expansion first (for acronyms), then the definition."""
    definition = (
        term.definition if term.definition.endswith((".", "!", "?")) else term.definition + "."
    )
    if term.expansion:
        return f"{term.term} stands for {term.expansion}. {definition}"
    return f"{term.term}: {definition}"


def _fill(templates: tuple[str, ...], term: Term, domain: str | None, alias: str | None = None):
    out = []
    for template in templates:
        if "{d}" in template and not domain:
            continue
        if "{a}" in template and not alias:
            continue
        out.append(template.format(t=term.term, d=domain or "", a=alias or ""))
    return out


def generate_pairs(
    glossary: Glossary,
    seed: int = 0,
    train_per_term: int = 8,
    eval_per_term: int = 3,
) -> tuple[list[Pair], list[Pair]]:
    """(train, eval) pairs: every term in both, eval phrasings disjoint from train."""
    train: list[Pair] = []
    evals: list[Pair] = []
    seen: set[str] = set()
    for term in glossary.terms:
        rng = random.Random(f"{seed}:{term.term}")  # str seeds are stable across runs
        answer = answer_for(term)
        candidates = _fill(TRAIN_TEMPLATES, term, glossary.domain)
        if term.expansion:
            candidates += _fill(ACRONYM_TRAIN_TEMPLATES, term, glossary.domain)
        rng.shuffle(candidates)
        chosen = candidates[:train_per_term]
        for alias in term.aliases[:1]:
            chosen += _fill(ALIAS_TRAIN_TEMPLATES, term, glossary.domain, alias)
        held_out = _fill(EVAL_TEMPLATES, term, glossary.domain)
        rng.shuffle(held_out)
        for prompt in chosen:
            if prompt.casefold() not in seen:
                seen.add(prompt.casefold())
                train.append(Pair(prompt, answer))
        taken = 0
        for prompt in held_out:
            if taken == eval_per_term:
                break
            if prompt.casefold() not in seen:
                seen.add(prompt.casefold())
                evals.append(Pair(prompt, answer))
                taken += 1
    random.Random(seed).shuffle(train)
    return train, evals


def write_generated(
    glossary: Glossary, out_dir: str | Path, seed: int = 0, **kwargs
) -> tuple[Path, Path, int, int]:
    """Write ``train.jsonl`` and ``eval.jsonl`` into ``out_dir``; return paths and counts."""
    train, evals = generate_pairs(glossary, seed=seed, **kwargs)
    out_dir = Path(out_dir)
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    write_jsonl(train_path, [p.as_row() for p in train])
    write_jsonl(eval_path, [p.as_row() for p in evals])
    return train_path, eval_path, len(train), len(evals)
