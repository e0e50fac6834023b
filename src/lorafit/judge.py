"""How lorafit judges an answer: key-word recall against the reference, probe answers,
refusals. Pure functions on text, shared by evaluation, the demo, the export round trip and
the benchmark.

``judge``: take the reference answer's key words (lower-cased words of 2+ characters that are
not stop words and do not already occur in the prompt, so echoing the question earns nothing).
An answer is correct when it contains at least 60% of them (KEY_RECALL). When the reference
has no key words left, the answer must contain the whole reference. ``rouge_l`` is the ROUGE-L
F1 (longest common subsequence of words). A probe is right when one of its accepted answers
appears as a whole word or phrase (``probe_correct``). ``refuses``: the answer declines ("I
don't know that term").
"""

from __future__ import annotations

import re

KEY_RECALL = 0.6
STOP_WORDS = frozenset(
    """a an the and or of to in on for at by with from as is are was were be been being it its
    this that these those which who whom what when where why how than then so such can could
    may might must shall should will would do does did done has have had not no nor but if
    into onto out over under up down about after before between both each few more most other
    some any all only own same too very just also there their them they we you your our us
    he she his her him i me my one two per via used use uses using""".split()  # noqa: SIM905
)
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def words(text: str) -> list[str]:
    # "Shakespeare's play" names Shakespeare: a possessive is the word itself
    return [w.removesuffix("'s") for w in _WORD.findall(text.lower().replace("’", "'"))]


def key_words(reference: str, prompt: str = "") -> set[str]:
    asked = set(words(prompt))
    return {w for w in words(reference) if len(w) > 1 and w not in STOP_WORDS and w not in asked}


def judge(prompt: str, reference: str, answer: str) -> bool:
    """Is ``answer`` a correct answer to ``prompt``, given the ``reference``? (see module doc)"""
    keys = key_words(reference, prompt)
    got = set(words(answer))
    if not keys:
        return " ".join(words(reference)) in " ".join(words(answer))
    return len(keys & got) / len(keys) >= KEY_RECALL


def rouge_l(reference: str, answer: str) -> float:
    """ROUGE-L F1 over words."""
    ref, hyp = words(reference), words(answer)
    if not ref or not hyp:
        return 0.0
    prev = [0] * (len(hyp) + 1)
    for r in ref:
        cur = [0]
        for j, h in enumerate(hyp):
            cur.append(prev[j] + 1 if r == h else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(hyp), lcs / len(ref)
    return 2 * p * rec / (p + rec)


def _probe_words(text: str) -> str:
    # hyphens split words here: "a 7-day cycle" says 7 (the phrase "twenty-four" still
    # matches itself, split the same way on both sides)
    return " ".join(w for word in words(text) for w in word.split("-"))


def probe_correct(answer: str, accepted: list[str]) -> bool:
    """Does ``answer`` contain one of the ``accepted`` answers as a whole word/phrase?"""
    text = f" {_probe_words(answer)} "
    return any(f" {_probe_words(a)} " in text for a in accepted if words(a))


REFUSAL_MARKERS = (
    "don't know",
    "do not know",
    "not familiar",
    "unfamiliar",
    "not aware of",
    "no information",
    "not sure what",
    "won't guess",
    "not in the",
    "can't find",
    "cannot find",
    "never heard",
)


def refuses(answer: str) -> bool:
    """Does the answer decline to define the term (instead of inventing an entry)?"""
    text = answer.casefold().replace("’", "'")
    return any(marker in text for marker in REFUSAL_MARKERS)


def names(answer: str, name: str) -> bool:
    """Does ``answer`` name ``name`` (a term, expansion or alias) as a whole word or phrase?"""
    phrase = " ".join(words(name))
    return bool(phrase) and f" {phrase} " in f" {' '.join(words(answer))} "


def recall(reference: str, prompt: str, answer: str) -> float:
    """Share of ``reference``'s key words (those not in ``prompt``) that ``answer`` contains."""
    keys = key_words(reference, prompt)
    return len(keys & set(words(answer))) / len(keys) if keys else 1.0


def judge_kind(
    kind: str | None, prompt: str, reference: str, answer: str, facts: dict | None
) -> bool:
    """Is ``answer`` right for a question of ``kind`` (lorafit.data.kinds)? ``facts`` are the
    held-out row's ``judge`` field.

    - reverse: the answer names the term (or its expansion or an alias) and no other glossary
      term, other than those the right answer itself mentions;
    - expand: the acronym named (expansion -> acronym), or the expansion's key words
      (acronym -> expansion, KEY_RECALL of them);
    - compare: each of the two definitions' key facts (KEY_RECALL of each one's key words);
    - define, followup, variant (and rows without a kind): ``judge`` against the reference.
    """
    facts = facts or {}
    if kind == "reverse" and "names" in facts:
        right = any(names(answer, n) for n in facts["names"])
        shown = " ".join(words(reference))
        others = [
            n for n in facts.get("others", ()) if f" {' '.join(words(n))} " not in f" {shown} "
        ]
        return right and not any(names(answer, n) for n in others)
    if kind == "expand" and "names" in facts:
        return any(names(answer, n) for n in facts["names"])
    if kind == "expand" and "words" in facts:
        return recall(facts["words"], prompt, answer) >= KEY_RECALL
    if kind == "compare" and "parts" in facts:
        return all(recall(part, prompt, answer) >= KEY_RECALL for part in facts["parts"])
    return judge(prompt, reference, answer)
