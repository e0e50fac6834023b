"""Question kinds: each generated from the glossary text, held out from training by template
(and, for reverse, by the wording of the description), carried on every row, and judged by
its own rule, checked here on hand-written right and wrong answers."""

import pytest
from conftest import write_jsonl

from lorafit.data.formats import read_dataset
from lorafit.data.generate import generate_pairs
from lorafit.data.glossary import load_glossary
from lorafit.data.kinds import KINDS, Generator, which_question
from lorafit.judge import judge_kind

GLOSSARY = load_glossary("lorafit:glossaries/aviation.yaml")
ALL = {kind: 2 for kind in KINDS}


@pytest.fixture(scope="module")
def pairs():
    return generate_pairs(GLOSSARY, seed=0, kinds=ALL, eval_kinds=ALL)


def test_every_kind_is_generated_and_labelled(pairs):
    train, evals = pairs
    for rows in (train, evals):
        assert {p.kind for p in rows} == set(KINDS)
    acronyms = sum(1 for t in GLOSSARY.terms if t.expansion)
    assert sum(p.kind == "expand" for p in evals) == 2 * acronyms
    assert all(p.as_row()["kind"] == p.kind for p in train)


def test_held_out_questions_never_repeat_a_training_question():
    """generate_pairs drops a held-out question that repeats a training one, so check the
    generator itself: none is dropped, the held-out set is what its templates make."""
    generator = Generator(GLOSSARY, 0)
    train = generator.questions(ALL, held_out=False)
    evals = generator.questions(ALL, held_out=True)

    seen = {p.key for p in train}
    assert evals and not any(p.key in seen for p in evals)


def test_no_held_out_question_fits_a_training_template_of_its_kind(pairs):
    import re

    from lorafit.data import kinds as k

    train_templates = {
        "define": k.DEFINE_TRAIN,
        "expand": k.EXPAND_TRAIN + k.EXPAND_REVERSE_TRAIN,
        "reverse": k.REVERSE_TRAIN,
        "compare": k.COMPARE_TRAIN,
        "followup": tuple(t for wordings in k.FOLLOWUP_TRAIN.values() for t in wordings),
        "variant": k.VARIANT_TRAIN,
    }

    def pattern(template: str, slot: str = ".+") -> re.Pattern:
        parts = re.split(r"\{[a-z]\}", template)
        return re.compile("^" + slot.join(re.escape(p) for p in parts) + "$", re.I)

    def typed(term: str) -> str:
        """The term as a variant types it: lower case, a word maybe with two letters swapped
        (a bare "{t}" template with a free slot would swallow every held-out variant)."""
        return " ".join(f"[{re.escape(''.join(set(w)))}]{{{len(w)}}}" for w in term.lower().split())

    _, evals = pairs
    for kind, templates in train_templates.items():
        for pair in (p for p in evals if p.kind == kind):
            slot = typed(pair.term) if kind == "variant" else ".+"
            patterns = [pattern(t, slot) for t in templates]
            assert not any(rx.match(pair.prompt) for rx in patterns), (kind, pair.prompt)
    # the typed slot still catches a training variant, slip or not
    train, _ = pairs
    for pair in (p for p in train if p.kind == "variant"):
        assert any(pattern(t, typed(pair.term)).match(pair.prompt) for t in k.VARIANT_TRAIN)


def test_training_asks_every_expand_wording_and_the_bare_term():
    """Four expand questions a term are both "stands for" wordings and both "acronym for" ones
    (one forward question a term left held-out "What do the letters LRU stand for?" declined);
    the variants include the bare term as typed into a search box, a slip in every other."""
    from lorafit.data import kinds as k

    generator = Generator(GLOSSARY, 0)
    lru = next(t for t in GLOSSARY.terms if t.term == "LRU")
    asked = sorted(p.prompt for p in generator.expand(lru, 4, held_out=False))
    wordings = [w.format(t="LRU", e=lru.expansion) for w in k.EXPAND_TRAIN + k.EXPAND_REVERSE_TRAIN]
    assert asked == sorted(wordings)
    held_out = generator.expand(lru, 1, held_out=True)[0].prompt
    assert held_out in [w.format(t="LRU") for w in k.EXPAND_HELD_OUT]
    variants = [p.prompt for p in generator.variant(lru, 4, held_out=False)]
    assert len(set(variants)) == 4 and "lru" in variants  # too short for a slip: bare
    rotable = next(t for t in GLOSSARY.terms if t.term.lower() == "rotable")
    typed = [p.prompt for p in generator.variant(rotable, 4, held_out=False)]
    assert sum("rotable" not in v for v in typed) == 2  # slips at 0 and 2, never held-out ones
    assert not set(typed) & {p.prompt for p in generator.variant(rotable, 1, held_out=True)}


def test_reverse_asks_the_description_back_in_another_form():
    atp = next(t for t in GLOSSARY.terms if t.term == "ATP")
    assert which_question(atp.definition) == "Which quantity can still be committed to customers?"
    generator = Generator(GLOSSARY, 0)
    held_out = generator.reverse(atp, 1, held_out=True)[0]
    training = [p.prompt for p in generator.reverse(atp, 3, held_out=False)]
    assert held_out.prompt == "Which quantity can still be committed to customers?"
    assert not any(held_out.prompt.rstrip("?") in p for p in training)
    assert held_out.response == "That is ATP (Available to Promise)."


def test_training_asks_which_questions_the_held_out_set_never_asks(pairs):
    """The held-out "Which SAP transaction creates a purchase order to a supplier?" is a shape
    training must teach ("Which <noun> <verb> ...?" answered literally was most reverse
    misses), with a shorter cut of the clause, one no other term's definition shares."""
    train, evals = pairs
    reverse_train = {p.prompt: p.term for p in train if p.kind == "reverse"}
    held_out = {p.prompt for p in evals if p.kind == "reverse"}
    assert reverse_train["Which SAP transaction creates a purchase order?"] == "ME21N"
    assert reverse_train["Which SAP transaction creates a sales order?"] == "VA01"
    # MMBE's and MD04's first cut is the same "shows a material's stock": each goes further
    assert reverse_train["Which SAP transaction shows a material's stock across plants?"] == "MMBE"
    assert "Which SAP transaction shows a material's stock?" not in reverse_train
    which = [q for q in reverse_train if q.startswith("Which ") and not q.startswith("Which term")]
    assert len(which) >= 25 and not held_out & set(which)
    # no training question holds a held-out one (the held-out one is the longer clause)
    assert not any(h.rstrip("?").lower() in q.lower() for q in reverse_train for h in held_out)
    assert "Which SAP transaction shows a material's stock, demand?" not in reverse_train
    # no break after two words or more: the one-word cut ("Which shops and services keep?" or
    # a cut that keeps only an article would say nothing)
    assert reverse_train["Which shops and services keep aircraft?"] == "MRO"


def test_a_which_clause_of_one_word_after_its_verb_generates():
    """ "A company that builds aircraft." leaves one word after the verb: nothing to cut (the
    one-word cut once indexed past it and stopped `data generate`)."""
    from lorafit.data.phrasing import which_questions_to_train

    assert which_questions_to_train("A company that builds aircraft.", []) == []
    assert which_question("A company that builds aircraft.") == "Which company builds aircraft?"


def test_reverse_training_reaches_its_count():
    """A one-clause definition has two descriptions (whole, opening) for the templates: cycled
    together with four templates they repeated after four questions, which held reverse at 4
    rows a term whatever data.kinds asked (307 instead of 408 on the demo). Every pairing of a
    description with a template is now a question of its own."""
    generator = Generator(GLOSSARY, 0)
    counts = []
    for term in GLOSSARY.terms:
        prompts = [p.prompt for p in generator.reverse(term, 8, held_out=False)]
        assert len(prompts) == len(set(prompts)), (term.term, prompts)
        counts.append(len(prompts))
    # the four short of eight have one description (no clause break, no opening): six
    # templates, six questions, and a seventh where a "Which" question trains too
    assert counts.count(8) == len(GLOSSARY.terms) - 4 and min(counts) == 6
    lead_time = next(t for t in GLOSSARY.terms if t.term == "Lead time")
    assert len(generator.reverse(lead_time, 8, held_out=False)) == 6


def test_followups_carry_the_first_turn(pairs):
    train, _ = pairs
    followup = next(p for p in train if p.kind == "followup")
    assert [t["role"] for t in followup.history] == ["user", "assistant"]
    row = followup.as_row()
    assert row["history"][1]["content"].startswith(followup.term)


def test_generated_files_read_back_with_kinds_history_and_judge(tmp_path, pairs):
    train, evals = pairs
    write_jsonl(tmp_path / "e.jsonl", [p.as_row(held_out=True) for p in evals])
    dataset = read_dataset(tmp_path / "e.jsonl")
    assert not dataset.warnings  # kind, judge and history are known fields
    followup = next(e for e in dataset.examples if e.kind == "followup")
    assert [t["role"] for t in followup.prompt] == ["user", "assistant", "user"]
    reverse = next(e for e in dataset.examples if e.kind == "reverse")
    assert "ATP" in [n for e in dataset.examples if e.kind == "reverse" for n in e.judge["names"]]
    assert reverse.judge["others"]


def test_history_must_alternate_and_end_with_an_answer(tmp_path):
    from lorafit.errors import LorafitError

    bad = {"prompt": "And?", "response": "x", "history": [{"role": "assistant", "content": "a"}]}
    write_jsonl(tmp_path / "bad.jsonl", [bad])
    with pytest.raises(LorafitError, match=r"bad\.jsonl:1: history\[0\]: expected a user turn"):
        read_dataset(tmp_path / "bad.jsonl")


REVERSE = {"names": ["ATP", "Available to Promise"], "others": ["OTD", "On-Time Delivery", "MRP"]}
Q = "Which quantity can still be committed to customers?"
REF = "That is ATP (Available to Promise)."


@pytest.mark.parametrize(
    ("answer", "right"),
    [
        ("That is ATP (Available to Promise).", True),
        ("ATP.", True),
        ("That would be Available to Promise.", True),
        ("atp", True),
        ("That is OTD (On-Time Delivery).", False),
        ("ATP or OTD, depending on the plant.", False),  # names another glossary term too
        ("I don't know the term.", False),
        ("The quantity that can still be committed to customers.", False),  # echoes, no name
        ("That is ATPX.", False),
    ],
)
def test_reverse_judge(answer, right):
    assert judge_kind("reverse", Q, REF, answer, REVERSE) is right


def test_reverse_judge_allows_terms_the_right_answer_itself_names():
    facts = {"names": ["PMA"], "others": ["OEM", "FAA 8130-3"]}
    ref = "That is PMA (an FAA approval that lets a company other than the OEM produce parts)."
    assert judge_kind(
        "reverse", "q", ref, "PMA: lets a company other than the OEM make parts.", facts
    )
    assert not judge_kind("reverse", "q", ref, "PMA, or FAA 8130-3.", facts)


@pytest.mark.parametrize(
    ("prompt", "facts", "answer", "right"),
    [
        (
            "Spell out OEM.",
            {"words": "Original Equipment Manufacturer"},
            "OEM stands for Original Equipment Manufacturer.",
            True,
        ),
        (
            "Spell out OEM.",
            {"words": "Original Equipment Manufacturer"},
            "Original Engine Maker.",
            False,
        ),
        ("What is On-Time Delivery abbreviated as?", {"names": ["OTD"]}, "It is OTD.", True),
        ("What is On-Time Delivery abbreviated as?", {"names": ["OTD"]}, "It is OTIF.", False),
    ],
)
def test_expand_judge(prompt, facts, answer, right):
    assert judge_kind("expand", prompt, "", answer, facts) is right


def test_compare_judge_needs_both_terms_key_facts():
    parts = [
        "Stock on hand minus overdue orders; the quantity that can still be committed to customers.",
        "The share of orders delivered on or before the date promised to the customer.",
    ]
    facts = {"parts": parts}
    both = (
        "ATP: stock on hand minus overdue orders, what can still be committed to customers. "
        "OTD: the share of orders delivered on or before the promised date."
    )
    assert judge_kind("compare", "Compare ATP and OTD.", "", both, facts)
    assert not judge_kind("compare", "Compare ATP and OTD.", "", both.split(" OTD:")[0], facts)


def test_define_followup_and_variant_judge_against_the_reference():
    ref = "MRO stands for Maintenance, Repair and Overhaul. The shops and services that keep aircraft airworthy."
    for kind in ("define", "followup", "variant", None):
        assert judge_kind(kind, "whats mro", ref, ref, None)
        assert not judge_kind(kind, "whats mro", ref, "I don't know the term mro.", None)


def test_a_held_out_question_seen_in_training_is_left_out_and_said(monkeypatch, caplog):
    """generate_pairs keeps a held-out set free of training questions; a collision (a user's
    glossary can make one) is logged, not silent."""
    from lorafit.data import kinds as k

    monkeypatch.setattr(k, "VARIANT_HELD_OUT", ("what is {t}",))  # a training wording
    with caplog.at_level("WARNING", logger="lorafit.data.generate"):
        train, evals = generate_pairs(GLOSSARY, seed=0, kinds=ALL, eval_kinds=ALL)
    trained = {p.key for p in train}
    assert not any(p.key in trained for p in evals)
    assert "held-out question(s) repeat a training question" in caplog.text
