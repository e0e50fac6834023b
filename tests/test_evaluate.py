"""The accuracy judge, tested on hand-written right and wrong answers."""

import pytest

from lorafit.evaluate import judge, rouge_l

REF = (
    "ATP stands for Available to Promise. Stock on hand minus overdue orders; "
    "the quantity that can still be committed to customers."
)


@pytest.mark.parametrize(
    "answer",
    [
        REF,
        "ATP stands for Available to Promise: the stock on hand minus overdue orders, i.e. the "
        "quantity that can still be committed to customers.",
        "Available to Promise - stock on hand minus overdue orders, what can be committed to customers.",
    ],
)
def test_right_answers(answer):
    assert judge("What is ATP?", REF, answer)


@pytest.mark.parametrize(
    "answer",
    [
        "ATP is adenosine triphosphate, the energy currency of the cell.",
        "ATP stands for Association of Tennis Professionals.",
        "What is ATP? ATP is ATP.",  # echoing the question earns nothing
        "Available to Promise.",  # the expansion alone misses the definition
        "",
    ],
)
def test_wrong_answers(answer):
    assert not judge("What is ATP?", REF, answer)


def test_reference_without_key_words_needs_containment():
    assert judge("What is 2+2?", "4", "The answer is 4.")
    assert not judge("What is 2+2?", "4", "The answer is five.")


def test_rouge_l():
    assert rouge_l("a b c d", "a b c d") == pytest.approx(1.0)
    assert rouge_l("a b c d", "x y") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * 5 / 11)
