"""Generate question/answer pairs from a glossary, with held-out paraphrases for evaluation.

Every term gets questions of each kind (lorafit.data.kinds: define, expand, reverse, followup,
compare, variant) in train, and held-out ones in eval from template pools that never appear in
train, so evaluation measures whether the model understood the term, not whether it memorized
a prompt. Made-up terms answered "I don't know" teach the model the edge of the glossary.

    lorafit data generate data/glossaries/aviation.yaml --out data/generated --seed 0
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path

from lorafit.data.formats import write_jsonl
from lorafit.data.glossary import Glossary
from lorafit.data.kinds import (
    DEFINE_HELD_OUT,
    DEFINE_TRAIN,
    EXPAND_TRAIN,
    Generator,
    Pair,
)
from lorafit.errors import LorafitError
from lorafit.rundir import write_json

log = logging.getLogger(__name__)

DEFAULT_TRAIN_KINDS = {"define": 8}
DEFAULT_EVAL_KINDS = {"define": 3}


def generate_pairs(
    glossary: Glossary,
    seed: int = 0,
    train_per_term: int | None = None,
    eval_per_term: int | None = None,
    kinds: dict[str, int] | None = None,
    eval_kinds: dict[str, int] | None = None,
) -> tuple[list[Pair], list[Pair]]:
    """(train, eval) pairs: every term in both, of each kind ``kinds`` (questions per term;
    ``eval_kinds`` for held-out), held-out questions from templates training never uses.
    ``train_per_term`` / ``eval_per_term`` set the define counts."""
    kinds = dict(kinds or DEFAULT_TRAIN_KINDS)
    eval_kinds = dict(eval_kinds or DEFAULT_EVAL_KINDS)
    if train_per_term is not None:
        kinds["define"] = train_per_term
    if eval_per_term is not None:
        eval_kinds["define"] = eval_per_term
    generator = Generator(glossary, seed)
    seen: set[tuple] = set()

    def unique(pairs: list[Pair]) -> list[Pair]:
        out = []
        for pair in pairs:
            if pair.key not in seen:
                seen.add(pair.key)
                out.append(pair)
        return out

    train = unique(generator.questions(kinds, held_out=False))
    held_out = generator.questions(eval_kinds, held_out=True)
    evals = unique(held_out)
    trained = {p.key for p in train}
    repeats = sum(p.key in trained for p in held_out)
    if repeats:  # a held-out question seen in training measures memory: leave it out, say so
        log.warning("%d held-out question(s) repeat a training question: left out", repeats)
    random.Random(seed).shuffle(train)
    return train, evals


# Made-up terms answered "I don't know", per glossary term. Measured on the demo (README): 16 in
# all left the tuned model inventing entries for every other made-up term; more negatives is
# what teaches it the edge of the glossary. Two (not three) since the question kinds: typed
# variants ("rtoable??") look like made-up terms; at three the model declined more real terms
# (2.3% against 1.4-1.8%) and invented no fewer made-up ones (4.2% both).
UNKNOWN_PER_TERM = 2
# ... but a small glossary needs more than two a term: on the six-term brewing glossary 12
# made-up terms left the tuned model inventing 29% of the held-out ones, 24 none (README)
UNKNOWN_MIN_TERMS = 24
UNKNOWN_MAX_PER_TERM = 4  # a one-term glossary's data is not mostly "I don't know"
UNKNOWN_EVAL_TERMS = 24  # 12 gave a coarse rate: one answer moved it by 8 points


def default_unknown_terms(glossary: Glossary) -> int:
    """Two made-up terms a glossary term; a small glossary gets up to 24 (never more than
    four a term)."""
    n = len(glossary.terms)
    return max(UNKNOWN_PER_TERM * n, min(UNKNOWN_MAX_PER_TERM * n, UNKNOWN_MIN_TERMS))


_CONSONANTS = "BCDFGHJKLMNPQRSTVWXZ"
_SYLLABLES = ("zor", "vex", "tul", "mib", "quar", "fen", "dro", "plix", "sau", "kem", "yth", "brun")


def made_up_terms(glossary: Glossary, count: int, seed: int) -> list[str]:
    """Terms that are not in the glossary: consonant acronyms and invented words."""
    known = {t.term.casefold() for t in glossary.terms}
    known |= {a.casefold() for t in glossary.terms for a in t.aliases}
    rng = random.Random(f"unknown:{seed}")
    out: list[str] = []
    while len(out) < count:
        if len(out) % 2 == 0:
            term = "".join(rng.choice(_CONSONANTS) for _ in range(rng.choice((3, 4))))
        else:
            term = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        if term.casefold() not in known and term not in out:
            out.append(term)
    return out


def unknown_answer(term: str) -> str:
    # short on purpose: every made-up term costs training time, and the refusal is the lesson
    return f"I don't know the term {term}."


def unknown_pairs(
    glossary: Glossary,
    seed: int = 0,
    train_count: int | None = None,
    eval_count: int = UNKNOWN_EVAL_TERMS,
) -> tuple[list[Pair], list[Pair]]:
    """Questions about made-up terms answered "I don't know" (train), and different made-up
    terms in held-out phrasings (eval): the tuned model should not invent an entry.

    The eval terms are drawn first, so the held-out set stays the same whatever ``train_count``
    is (runs with different settings are compared on the same made-up terms). ``train_count``
    None means :func:`default_unknown_terms`.
    """
    if train_count is None:
        train_count = default_unknown_terms(glossary)
    terms = made_up_terms(glossary, eval_count + train_count, seed)
    rng = random.Random(f"unknown-phrasing:{seed}")
    evals = [
        Pair(rng.choice(DEFINE_HELD_OUT[2:]).format(t=t), unknown_answer(t), "unknown")
        for t in terms[:eval_count]
    ]
    # every training phrasing a real term can get, so "unknown" is not tied to a question shape
    shapes = [t for t in DEFINE_TRAIN + EXPAND_TRAIN if glossary.domain or "{d}" not in t]
    train = [
        Pair(rng.choice(shapes).format(t=t, d=glossary.domain or ""), unknown_answer(t), "unknown")
        for t in terms[eval_count:]
    ]
    return train, evals


GENERATED_FILES = ("train.jsonl", "eval.jsonl", "unknown.jsonl")
MANIFEST = "lorafit_data.json"  # what was generated from what: lorafit's mark on the folder


def check_generated_out(out_dir: Path, overwrite: bool) -> None:
    """Refuse to replace data files unless told to, and then only files lorafit generated."""
    existing = [n for n in GENERATED_FILES if (out_dir / n).exists()]
    if not existing:
        return
    if not overwrite:
        raise LorafitError(
            f"{out_dir}: already holds {', '.join(existing)}; choose another --out, or pass "
            "--overwrite to replace them"
        )
    if not (out_dir / MANIFEST).is_file():
        raise LorafitError(
            f"{out_dir}: {', '.join(existing)} were not written by `lorafit data generate` "
            f"(no {MANIFEST} beside them), so --overwrite will not replace them; move them "
            "away or choose another --out"
        )


def write_generated(
    glossary: Glossary,
    out_dir: str | Path,
    seed: int = 0,
    unknown_train: int | None = None,
    unknown_eval: int = UNKNOWN_EVAL_TERMS,
    overwrite: bool = False,
    **kwargs,
) -> tuple[Path, Path, int, int]:
    """Write ``train.jsonl``, ``eval.jsonl`` and ``unknown.jsonl`` (held-out made-up terms)
    into ``out_dir``; return the train/eval paths and counts. ``unknown_train`` None means
    :func:`default_unknown_terms`. Existing files are replaced only with ``overwrite``."""
    out_dir = Path(out_dir)
    check_generated_out(out_dir, overwrite)
    train, evals = generate_pairs(glossary, seed=seed, **kwargs)
    unknown_train_pairs, unknown_eval_pairs = unknown_pairs(
        glossary, seed, unknown_train, unknown_eval
    )
    train = train + unknown_train_pairs
    random.Random(f"mix:{seed}").shuffle(train)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(  # first: a crash halfway leaves files that --overwrite may replace
        out_dir / MANIFEST,
        {
            "glossary": glossary.source,
            "terms": len(glossary.terms),
            "seed": seed,
            "kinds": dict(Counter(p.kind for p in train)),
            "eval_kinds": dict(Counter(p.kind for p in evals)),
            "train": len(train),
            "eval": len(evals),
            "unknown_eval": len(unknown_eval_pairs),
        },
    )
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    write_jsonl(train_path, [p.as_row() for p in train])
    write_jsonl(eval_path, [p.as_row(held_out=True) for p in evals])
    (out_dir / "unknown.jsonl").unlink(missing_ok=True)  # never a stale one from another run
    if unknown_eval_pairs:
        write_jsonl(
            out_dir / "unknown.jsonl", [p.as_row(held_out=True) for p in unknown_eval_pairs]
        )
    return train_path, eval_path, len(train), len(evals)
