"""The accuracy judge, tested on hand-written right and wrong answers."""

import pytest

from lorafit.evaluate import score
from lorafit.judge import judge, rouge_l

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


def test_score_counts_refusals_of_real_terms():
    """Over-refusal: the tuned model saying "I don't know" about a term it was taught."""
    rows = [
        {
            "prompt": "What is ATP?",
            "reference": "Available to Promise.",
            "tuned": t,
            "tuned_stopped": True,
        }
        for t in ("ATP means Available to Promise.", "I don't know that term.", "No idea.")
    ]
    m = score(rows, "tuned")
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["refusal_rate"] == pytest.approx(1 / 3)  # "No idea." is wrong, not a refusal


def test_rouge_l():
    assert rouge_l("a b c d", "a b c d") == pytest.approx(1.0)
    assert rouge_l("a b c d", "x y") == 0.0
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * 5 / 11)


def test_probe_judge_matches_whole_words():
    from lorafit.judge import probe_correct

    assert probe_correct("2 + 2 equals 4.", ["4", "four"])
    assert probe_correct("The answer is Four", ["4", "four"])
    assert not probe_correct("It is 42.", ["4", "four"])  # no partial-number match
    assert probe_correct("Plants absorb carbon dioxide.", ["carbon dioxide", "CO2"])
    assert not probe_correct("Create a product or a service.", ["4", "four"])
    assert probe_correct("William Shakespeare’s play.", ["Shakespeare"])  # possessive
    assert probe_correct("It was Shakespeare's.", ["Shakespeare"])
    assert probe_correct("A week is a 7-day cycle.", ["7", "seven"])  # a number inside 7-day
    assert probe_correct("It is twenty-four hours.", ["24", "twenty-four"])
    assert not probe_correct("A 47-day trip.", ["7", "seven"])


def test_shipped_probe_set_is_valid_and_varied():
    from collections import Counter

    from lorafit.evaluate import DEFAULT_PROBES, read_probes

    probes = read_probes(DEFAULT_PROBES)
    assert 50 <= len(probes) <= 100
    assert len({p["prompt"] for p in probes}) == len(probes)
    assert len(Counter(p["category"] for p in probes)) >= 6
    assert all(p["answers"] for p in probes)


def test_batched_generation_gives_the_one_at_a_time_answers(tiny_model_dir):
    """lorafit's generate (length-sorted, left-padded batches) answers exactly as the model's
    own generate does for one prompt at a time: padding changes nothing."""
    import torch

    from lorafit.inference import chat_prompt, generate, load_for_inference

    loaded = load_for_inference(tiny_model_dir, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    questions = ["Hi", "What is 1+1?", "Name three colors of the rainbow, please."]
    ours = generate(model, tok, [chat_prompt(q, None) for q in questions], 12, batch_size=3)
    for q, (text, _) in zip(questions, ours, strict=True):
        ids = tok.apply_chat_template(
            chat_prompt(q, None), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id
            )
        row = out[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        assert text == tok.decode(row, skip_special_tokens=True).strip()


def _through_end(row: list[int], end: int) -> list[int]:
    return row[: row.index(end) + 1] if end in row else row


def _left_padded(tiny_model_dir, questions):
    """(model, tokenizer, a left-padded batch of the questions as chat prompts)."""
    from lorafit.inference import _prompt_text, chat_prompt, load_for_inference

    loaded = load_for_inference(tiny_model_dir, device="cpu")
    tok = loaded.tokenizer
    tok.padding_side = "left"
    texts = [_prompt_text(tok, chat_prompt(q, None)) for q in questions]
    enc = dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    return loaded.model, tok, enc


def test_ended_answers_leave_the_batch_and_the_others_answer_as_transformers_does(tiny_model_dir):
    """greedy_ids drops a row from the batch and its KV cache once it ends; the rows left keep
    transformers' tokens. The end token is picked so that rows end at different steps."""
    from types import SimpleNamespace

    import torch

    from lorafit.inference import greedy_ids, transformers_greedy_ids

    questions = ["Hi", "What is 1+1?", "Name three colors, please.", "Why?", "Say more about it."]
    model, tok, enc = _left_padded(tiny_model_dir, questions)
    with torch.no_grad():
        free = transformers_greedy_ids(
            model, SimpleNamespace(eos_token_id=-1, pad_token_id=0), enc, 16
        )
    end = free[0][2]  # the first row ends at its third token; the others where it turns up
    ends = SimpleNamespace(eos_token_id=end, pad_token_id=tok.pad_token_id)
    batch_sizes = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: batch_sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        ours = greedy_ids(model, ends, enc, 16)
        hook.remove()
        theirs = transformers_greedy_ids(model, ends, enc, 16)
    assert [len(r) for r in ours] != [16] * len(questions), "no row ended early: a void test"
    assert any(end not in r for r in ours), "every row ended: a void test"
    assert ours == [_through_end(r, end) for r in theirs]
    # the forward of step k runs only the rows that had not ended before it
    assert batch_sizes == [sum(len(r) > k for r in ours) for k in range(max(map(len, ours)))]
    assert batch_sizes[-1] < len(questions)


def test_a_model_that_shapes_greedy_answers_goes_to_transformers_generate(tiny_model_dir):
    """Suppressed tokens (or a repetition penalty, ...) in the model's generation config change
    greedy answers; lorafit's loop does not apply them, so such a model is answered by
    transformers' generate."""
    import torch

    from lorafit.inference import greedy_ids, transformers_greedy_ids

    model, tok, enc = _left_padded(tiny_model_dir, ["Hi", "What is 1+1?"])
    with torch.no_grad():
        plain = greedy_ids(model, tok, enc, 24)
        model.generation_config.suppress_tokens = [plain[0][0]]
        shaped = greedy_ids(model, tok, enc, 24)
        assert shaped == transformers_greedy_ids(model, tok, enc, 24)
    assert shaped[0][0] != plain[0][0]


def test_score_reports_accuracy_per_kind_from_the_rows_verdicts():
    rows = [
        {"prompt": "q", "reference": "r", "kind": kind, "tuned": "a", "tuned_stopped": True}
        | {"tuned_correct": ok}
        for kind, ok in [("define", True), ("define", False), ("reverse", True), ("variant", False)]
    ]
    m = score(rows, "tuned")
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["by_kind"] == {
        "define": {"accuracy": 0.5, "n": 2},
        "reverse": {"accuracy": 1.0, "n": 1},
        "variant": {"accuracy": 0.0, "n": 1},
    }
    assert list(m["by_kind"]) == ["define", "reverse", "variant"]  # in the kinds' own order
    plain = score([{k: v for k, v in r.items() if k != "kind"} for r in rows], "tuned")
    assert "by_kind" not in plain  # user data without kinds
