"""The kinds of question people ask about a glossary term, each with its own training
templates and a disjoint pool of held-out ones. Answers always come from the glossary text.

- ``define``   "What is ATP?"                               -> expansion + definition
- ``expand``   "What does ATP stand for?" / "What is the acronym for Available to Promise?"
- ``reverse``  "What do we call <the definition, or part of it>?" -> "That is ATP (...)."
- ``followup`` a first question and its answer, then "And what does it stand for?",
               "What is it used for?" or "How is that different from OTD?"
- ``compare``  "What's the difference between ATP and OTD?" -> both definitions
- ``variant``  as people type: lower case, no question mark, a small typo in a long term

How held-out questions differ from training ones: every kind draws them from templates no
training question uses, and ``reverse`` also describes the term with a part of its definition
that training never uses alone (its last clause or, for one-clause definitions, its second
half; training uses the whole definition and its first clause or half). ``followup`` and
``compare`` pair a term with a different related term where the glossary has one.

Models trained on "A is B" do not learn "B is A" (the reversal curse, Berglund et al. 2023);
seeing the facts in several directions and phrasings is what makes them retrievable.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field
from functools import cached_property

from lorafit.config import KINDS
from lorafit.data.glossary import Glossary, Term
from lorafit.data.phrasing import (
    clauses,
    lower_first,
    opening,
    typo,
    which_question,
    which_questions_to_train,
)

__all__ = ["KINDS", "Generator", "Pair", "answer_for"]


@dataclass(frozen=True)
class Pair:
    """One generated question and its answer (``history``: earlier turns of a followup)."""

    prompt: str
    response: str
    kind: str = "define"
    term: str = ""
    history: tuple[dict[str, str], ...] = ()
    judge: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple:
        """What makes two questions the same: the conversation so far and the prompt, any case."""
        return tuple(t["content"].casefold() for t in self.history), self.prompt.casefold()

    def as_row(self, held_out: bool = False) -> dict:
        row: dict = {"prompt": self.prompt, "response": self.response, "kind": self.kind}
        if self.history:
            row["history"] = [dict(turn) for turn in self.history]
        if held_out and self.judge:
            row["judge"] = self.judge  # what lorafit.judge needs beyond the reference answer
        return row


# {t} = the term, {d} = the domain. Templates with {d} are skipped when there is no domain.
DEFINE_TRAIN = (
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
    "What is {t} used for?",
    "What can you tell me about {t}?",
)
DEFINE_HELD_OUT = (
    "Could you tell me what {t} refers to?",
    "In {d}, what do people mean by {t}?",
    "Briefly describe {t}.",
    "What's {t}?",
    "I'm new here. What is {t}?",
    "Help me understand the term {t}.",
    "What do we mean when we say {t}?",
)
ALIAS_TRAIN = ("What does {a} mean?",)
EXPAND_TRAIN = ("What does {t} stand for?", "What is {t} short for?")
EXPAND_REVERSE_TRAIN = ("What is the acronym for {e}?", "How do we abbreviate {e}?")
EXPAND_HELD_OUT = ("Spell out {t}.", "What do the letters {t} stand for?")
EXPAND_REVERSE_HELD_OUT = ("What is {e} abbreviated as?", "Which abbreviation stands for {e}?")
REVERSE_TRAIN = (
    "What do we call {f}?",
    "What is the term for {f}?",
    "Which term means {f}?",
    "What's the name for {f}?",
    "Tell me the name of {f}.",
    "Name the term for {f}.",
)
REVERSE_HELD_OUT = (
    "Is there a term for {f}?",
    "How do you call {f}?",
    "I'm looking for the word for {f}. What is it?",
)
COMPARE_TRAIN = (
    "What's the difference between {t} and {o}?",
    "How does {t} differ from {o}?",
)
COMPARE_HELD_OUT = ("Compare {t} and {o}.", "Can you explain how {t} and {o} are different?")
# several wordings of each follow-up: with one, "And compared with MIGO?" (held out) was
# answered as "what is MIGO?" a quarter of the time
FOLLOWUP_TRAIN = {
    "stand_for": ("And what does it stand for?", "What's the full name behind it?"),
    "used_for": ("And what is it used for?", "What does it do?", "Why would I need it?"),
    "differs": (
        "How is that different from {o}?",
        "Is that the same thing as {o}?",
        "What sets it apart from {o}?",
    ),
}
FOLLOWUP_HELD_OUT = {
    "stand_for": "What do those letters stand for?",
    "used_for": "So what is it for?",
    "differs": "And compared with {o}?",
}
# the bare term too, as typed into a search box; the held-out "{t}??" is the nearest to it
VARIANT_TRAIN = ("what is {t}", "{t} meaning", "explain {t} pls", "{t}")
VARIANT_HELD_OUT = ("whats {t}", "{t}??", "define {t} quickly")
_STOP = frozenset(
    [
        "the",
        "a",
        "an",
        "of",
        "and",
        "or",
        "to",
        "in",
        "on",
        "for",
        "with",
        "from",
        "by",
        "at",
        "its",
        "it",
        "is",
        "are",
    ]
)


def sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


def answer_for(term: Term) -> str:
    """One consistent, natural answer: the expansion first (for acronyms), then the definition."""
    if term.expansion:
        return f"{term.term} stands for {term.expansion}. {sentence(term.definition)}"
    return f"{term.term}: {sentence(term.definition)}"


def name_of(term: Term) -> str:
    return f"{term.term} ({term.expansion})" if term.expansion else term.term


def fill(template: str, term: Term, domain: str | None, **extra: str) -> str | None:
    if "{d}" in template and not domain:
        return None
    return template.format(t=term.term, d=domain or "", **extra)


def related(glossary: Glossary, term: Term) -> list[Term]:
    """Terms people confuse with ``term``: the same category, or a shared content word."""

    def content(t: Term) -> set[str]:
        words = re.findall(r"[a-z0-9]+", f"{t.term} {t.expansion or ''}".lower())
        return {w for w in words if len(w) > 3 and w not in _STOP}

    mine = content(term)
    return [
        t
        for t in glossary.terms
        if t is not term and ((term.category and t.category == term.category) or mine & content(t))
    ]


def compare_answer(a: Term, b: Term) -> str:
    return f"{a.term}: {sentence(a.definition)} {b.term}: {sentence(b.definition)}"


@dataclass
class Generator:
    """Questions of every kind about one glossary, seeded (str seeds are stable across runs)."""

    glossary: Glossary
    seed: int = 0

    @cached_property
    def _lowered(self) -> list[tuple[Term, str]]:
        """Each term's definition in lower case, once (every reverse question checks its cuts
        against all the others: lowering them per check was glossary-size squared work)."""
        return [(t, t.definition.lower()) for t in self.glossary.terms]

    def rng(self, *parts: object) -> random.Random:
        return random.Random(":".join(str(p) for p in (self.seed, *parts)))

    def define(self, term: Term, count: int, held_out: bool) -> list[Pair]:
        pool = DEFINE_HELD_OUT if held_out else DEFINE_TRAIN
        prompts = [p for t in pool if (p := fill(t, term, self.glossary.domain))]
        self.rng("define", held_out, term.term).shuffle(prompts)
        prompts = prompts[:count]
        if not held_out:
            prompts += [a.format(a=alias) for a in ALIAS_TRAIN for alias in term.aliases[:1]]
        return [Pair(p, answer_for(term), "define", term.term) for p in prompts]

    def expand(self, term: Term, count: int, held_out: bool) -> list[Pair]:
        if not term.expansion:
            return []
        forward = EXPAND_HELD_OUT if held_out else EXPAND_TRAIN
        backward = EXPAND_REVERSE_HELD_OUT if held_out else EXPAND_REVERSE_TRAIN
        rng = self.rng("expand", held_out, term.term)

        def wordings(pool):
            """Held out: drawn afresh (the held-out sets README's runs were scored on).
            Training: every wording in turn, so a term's four questions are all four; with
            one "stand for" question a term, held-out "What do the letters LRU stand for?"
            was declined like a made-up acronym (README). Past four, wordings repeat and
            generate_pairs drops the repeats."""
            if held_out:
                while True:
                    yield rng.choice(pool)
            pool = list(pool)
            rng.shuffle(pool)
            yield from itertools.cycle(pool)

        forward, backward = wordings(forward), wordings(backward)
        out = []
        for i in range(count):
            if i % 2 == 0:
                prompt = next(forward).format(t=term.term)
                answer = f"{term.term} stands for {term.expansion}."
                facts = {"words": term.expansion}
            else:
                prompt = next(backward).format(e=term.expansion)
                answer = f"The acronym for {term.expansion} is {term.term}."
                facts = {"names": [term.term]}
            out.append(Pair(prompt, answer, "expand", term.term, judge=facts))
        return out

    def reverse(self, term: Term, count: int, held_out: bool) -> list[Pair]:
        """A held-out question asks the definition back in question form ("Which company
        designs ...?") where it has that shape, else describes the term with its last clause
        (or, for a one-clause definition, the whole of it) with a held-out template. Training
        describes the term with its whole definition, its first clause, the halves of a
        one-clause definition, and the last clause only where held-out questions do not use
        it alone: never in the held-out wording."""
        parts = clauses(term.definition)
        whole = lower_first(term.definition.rstrip(".!? "))
        question = which_question(term.definition)
        rng = self.rng("reverse", held_out, term.term)
        templates = list(REVERSE_HELD_OUT if held_out else REVERSE_TRAIN)
        rng.shuffle(templates)
        if held_out:
            prompts = [question] if question else []
            prompts += [t.format(f=parts[-1]) for t in templates]
        else:
            others = [d for t, d in self._lowered if t is not term]
            prompts = which_questions_to_train(term.definition, others)
            descriptions = [whole]
            if len(parts) > 1:
                descriptions.append(parts[0])
                if question:  # held out asks it inverted, so the clause itself may train
                    descriptions.append(parts[-1])
            elif opening(whole):
                descriptions.append(opening(whole))
            pairs = [
                (d, t)
                for i, t in enumerate(templates * 3)
                for d in [descriptions[i % len(descriptions)]]
            ]
            # two descriptions cycle with four templates in a period of four: the rest of
            # their pairings follow, so `count` is reached wherever there are enough
            pairs += [(d, t) for t in templates for d in descriptions]
            prompts = list(dict.fromkeys(prompts + [t.format(f=d) for d, t in pairs]))
        answer = f"That is {name_of(term)}."
        facts = {"names": self.names(term), "others": self.other_names(term)}
        return [Pair(p, answer, "reverse", term.term, judge=facts) for p in prompts[:count]]

    def compare(self, term: Term, count: int, held_out: bool) -> list[Pair]:
        partners = related(self.glossary, term)
        if not partners:
            return []
        rng = self.rng("compare", term.term)
        rng.shuffle(partners)
        # held-out questions pair the term with another partner than training does
        chosen = partners[count:] if held_out and len(partners) > count else partners
        templates = COMPARE_HELD_OUT if held_out else COMPARE_TRAIN
        out = []
        for i, other in enumerate(chosen[:count]):
            prompt = templates[i % len(templates)].format(t=term.term, o=other.term)
            facts = {"parts": [sentence(term.definition), sentence(other.definition)]}
            out.append(Pair(prompt, compare_answer(term, other), "compare", term.term, judge=facts))
        return out

    def followup(self, term: Term, count: int, held_out: bool) -> list[Pair]:
        rng = self.rng("followup", held_out, term.term)
        kinds = ["used_for"] + (["stand_for"] if term.expansion else [])
        partners = related(self.glossary, term)
        if partners:
            kinds.append("differs")
        first_pool = DEFINE_HELD_OUT if held_out else DEFINE_TRAIN
        firsts = [p for t in first_pool if (p := fill(t, term, self.glossary.domain))]
        out = []
        for _ in range(count):
            kind = rng.choice(kinds)
            history = (
                {"role": "user", "content": rng.choice(firsts)},
                {"role": "assistant", "content": answer_for(term)},
            )
            template = FOLLOWUP_HELD_OUT[kind] if held_out else rng.choice(FOLLOWUP_TRAIN[kind])
            if kind == "stand_for":
                prompt, answer = template, f"{term.term} stands for {term.expansion}."
            elif kind == "used_for":
                prompt, answer = template, sentence(term.definition)
            else:
                other = rng.choice(partners)
                prompt, answer = template.format(o=other.term), compare_answer(term, other)
            out.append(Pair(prompt, answer, "followup", term.term, history))
        return out

    def variant(self, term: Term, count: int, held_out: bool) -> list[Pair]:
        rng = self.rng("variant", held_out, term.term)
        templates = list(VARIANT_HELD_OUT if held_out else VARIANT_TRAIN)
        rng.shuffle(templates)
        out = []
        for i in range(count):
            name = term.term.lower()
            if i % 2 == 0:  # every other one with a slip in its longest word
                longest = max(name.split(), key=len)
                name = name.replace(longest, typo(longest, rng), 1)
            prompt = templates[i % len(templates)].format(t=name)
            out.append(Pair(prompt, answer_for(term), "variant", term.term))
        return out

    def names(self, term: Term) -> list[str]:
        return [term.term, *([term.expansion] if term.expansion else []), *term.aliases]

    def other_names(self, term: Term) -> list[str]:
        return [n for t in self.glossary.terms if t is not term for n in self.names(t)]

    def questions(self, kinds: dict[str, int], held_out: bool) -> list[Pair]:
        """Every term's questions of each kind, ``kinds[kind]`` of them per term."""
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown question kind(s) {sorted(unknown)}; kinds: {KINDS}")
        out = []
        for term in self.glossary.terms:
            for kind, count in kinds.items():
                if count > 0:
                    out += getattr(self, kind)(term, count, held_out)
        return out
