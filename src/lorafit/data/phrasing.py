"""How a glossary definition is re-worded into questions: its clauses, a natural break near
its middle, the definition asked back as "Which <noun> <verb> ...?", and a typo a person
would make. Plain text in, plain text out (lorafit.data.kinds builds the questions)."""

from __future__ import annotations

import random
import re


def lower_first(text: str) -> str:
    words = text.split(" ", 2)
    first = words[0]
    if (len(first) > 1 and first.isupper()) or any(c.isdigit() for c in first):
        return text  # an acronym or a code: keep it
    if len(words) > 1 and words[1][:1].isupper():
        return text  # a name: "Display Material", "European Union"
    return text[:1].lower() + text[1:]


_RELATIVE = re.compile(
    r"^(?:(?:the|a|an)\s+)?(.{3,60}?)\s+(?:that|which|who)\s+(\S+)\s+(.+)$", re.I
)
_NOT_A_VERB = frozenset(
    [
        "the",
        "a",
        "an",
        "this",
        "these",
        "those",
        "it",
        "its",
        "they",
        "their",
        "you",
        "we",
        "he",
        "she",
        "his",
        "her",
    ]
)


def clauses(definition: str) -> list[str]:
    """The definition's clauses: split at ';' and before an appositive ', the ...'."""
    text = definition.rstrip(".!? ")
    parts = re.split(r";\s*|,\s+(?=the\s)", text, flags=re.I)
    return [lower_first(p.strip()) for p in parts if len(p.split()) >= 3] or [lower_first(text)]


_BOUNDARY = frozenset(
    [
        "that",
        "which",
        "who",
        "where",
        "with",
        "for",
        "from",
        "to",
        "of",
        "in",
        "on",
        "by",
        "after",
        "before",
        "when",
    ]
)


def opening(description: str) -> str | None:
    """The description up to a natural break near its middle ("the share of customer order
    lines shipped complete | from stock ..."), or None when it is too short to split."""
    words = description.split()
    cuts = [
        i
        for i in range(3, len(words) - 2)
        if words[i].lower() in _BOUNDARY or words[i - 1].endswith(",")
    ]
    if len(words) < 8 or not cuts:
        return None
    cut = min(cuts, key=lambda i: abs(i - len(words) / 2))
    return " ".join(words[:cut]).rstrip(",")


def _relative(clause: str) -> tuple[str, str, str] | None:
    """``clause`` as (noun, verb, rest) when it reads "the <noun> that <verb> <rest>"."""
    match = _RELATIVE.match(clause)
    if match and match.group(2).lower() not in _NOT_A_VERB:
        return match.group(1), match.group(2), match.group(3)
    return None


def which_question(definition: str) -> str | None:
    """The definition asked back as a question, "the company that designs X" -> "Which company
    designs X?", from the last clause that has that shape (None when none has)."""
    for clause in reversed(clauses(definition)):
        if shape := _relative(clause):
            return "Which {} {} {}?".format(*shape)
    return None


# where a "Which ...?" question may stop short of its clause's end: before a phrase that only
# narrows it down (not "or", "that", "of": "certifies a new | or repaired part" reads wrong;
# not "into": "turns demand and stock | into planned orders" says another thing)
_CUT = (_BOUNDARY - {"that", "which", "who", "where", "of"}) | {
    "without",
    "across",
    "at",
    "until",
    "between",
    "and",
}


def which_questions_to_train(definition: str, others: list[str]) -> list[str]:
    """ "Which <noun> <verb> ...?" questions for training that the held-out one never is: the
    held-out clause cut at its first natural break that no other definition in ``others`` (in
    lower case)
    shares ("Which SAP transaction creates a purchase order?"; a cut two terms share would
    teach one question two answers), and any earlier clause of that shape whole, where no
    other definition has it. A cut inside a list ("stock, demand | and planned supply") is
    no break."""

    def unique(said: str) -> bool:
        said = said.lower()
        return not any(said in other for other in others)

    found = [shape for clause in clauses(definition) if (shape := _relative(clause))]
    if not found:
        return []
    out = [f"Which {n} {v} {r}?" for n, v, r in found[:-1] if unique(f"{v} {r}")]
    noun, verb, rest = found[-1]
    words = rest.split()
    # a cut keeps two words or more, one where there is no later break ("Which shops and
    # services keep aircraft?"), none that keeps only an article
    one_word = [1] if len(words) > 1 and words[0].lower() not in _NOT_A_VERB else []
    for i in [*range(2, len(words)), *one_word]:
        if words[i].lower() in _CUT or words[i - 1].endswith(","):
            short = " ".join(words[:i]).rstrip(",")
            if "," in short and words[i].lower() == "and":
                continue
            if unique(f"{verb} {short}"):
                out.append(f"Which {noun} {verb} {short}?")
                break
    return out


def typo(word: str, rng: random.Random) -> str:
    """A one-letter slip (two neighbours swapped) in a word long enough to stay unambiguous."""
    letters = [i for i in range(1, len(word) - 2) if word[i].isalpha() and word[i + 1].isalpha()]
    if len(word) < 7 or not letters:
        return word
    i = rng.choice(letters)
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
