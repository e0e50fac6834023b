"""Replay (the base model's own answers to general prompts mixed into training) and the
"I don't know" examples for made-up terms."""

import json

import pytest
from conftest import ROOT

from lorafit.data.generate import made_up_terms, unknown_pairs, write_generated
from lorafit.data.glossary import Glossary, Term
from lorafit.data.replay import (
    DEFAULT_REPLAY_PROMPTS,
    base_answers,
    read_prompts,
    replay_count,
    replay_examples,
)
from lorafit.judge import refuses

GLOSSARY = Glossary(
    terms=(
        Term("ATP", "Stock that can be promised.", "Available to Promise"),
        Term("MRO", "Repair."),
    ),
    domain="aviation",
)


def test_replay_share_is_the_share_of_the_final_mix():
    assert replay_count(800, 0.2) == 200  # 200 / (800 + 200) = 20%
    assert replay_count(547, 0.0) == 0
    assert replay_count(100, 0.5) == 100


def test_replay_uses_only_answers_that_stopped_and_cycles_when_short():
    rows = [
        {"prompt": "a", "response": "A.", "stopped": True},
        {"prompt": "b", "response": "B b b b", "stopped": False},
        {"prompt": "c", "response": "C.", "stopped": True},
    ]
    examples = replay_examples(rows, 5, seed=0)
    assert len(examples) == 5
    assert {e.answer for e in examples} == {"A.", "C."}
    assert replay_examples(rows, 0, seed=0) == []


def test_shipped_replay_prompts_are_disjoint_from_the_probes():
    replay = set(read_prompts(DEFAULT_REPLAY_PROMPTS))
    probes = {
        json.loads(line)["prompt"]
        for line in (ROOT / "data" / "probes" / "general.jsonl").read_text().splitlines()
    }
    assert len(replay) >= 150 and not replay & probes


def test_base_answers_are_generated_once_then_cached(tmp_path, monkeypatch, tiny_model_dir):
    import lorafit.inference
    from lorafit.answer_cache import model_key
    from lorafit.inference import load_for_inference

    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n{"prompt": "What is 1+1?"}\n')
    loaded = load_for_inference(tiny_model_dir, device="cpu")
    key = model_key({"sha256": "tiny"}, loaded.model)
    first = base_answers(loaded.model, loaded.tokenizer, key, prompts, None)
    assert sorted(r["prompt"] for r in first) == ["Hi", "What is 1+1?"]

    def no_generation(*a, **k):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(lorafit.inference, "generate", no_generation)
    assert base_answers(loaded.model, loaded.tokenizer, key, prompts, None) == first
    # another answer-length limit is another set of answers, not the cached one
    with pytest.raises(AssertionError, match="cache"):
        base_answers(loaded.model, loaded.tokenizer, key, prompts, None, max_new_tokens=7)
    # so is another system prompt, and another model (key)
    with pytest.raises(AssertionError, match="cache"):
        base_answers(loaded.model, loaded.tokenizer, key, prompts, "Be brief.")
    with pytest.raises(AssertionError, match="cache"):
        base_answers(loaded.model, loaded.tokenizer, "other-model", prompts, None)


def test_replay_answers_stop_once_enough_have_ended(tmp_path, monkeypatch):
    """Prompts are answered a batch at a time until ``needed`` answers ended by themselves."""
    import lorafit.data.replay as replay
    import lorafit.inference

    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(replay, "BATCH", 2)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "q{i}"}}\n' for i in range(10)))
    batches = []

    def answering(model, tok, batch, **kw):
        batches.append(len(batch))
        return [("A.", True) for _ in batch]

    monkeypatch.setattr(lorafit.inference, "generate", answering)
    assert len(base_answers(None, None, "k", prompts, None, needed=3)) == 4
    assert batches == [2, 2]
    assert len(base_answers(None, None, "k", prompts, None)) == 10  # extends the same cache
    assert batches == [2, 2, 2, 2, 2]


def test_a_process_that_waited_for_the_cache_lock_reuses_the_answers(tmp_path, monkeypatch):
    """The ranks of a torchrun job share the cache: one answers, the others wait and reuse."""
    import threading

    import lorafit.inference
    from lorafit.answer_cache import FOLDER, _prompt_key
    from lorafit.data.formats import write_jsonl
    from lorafit.inference import chat_prompt
    from lorafit.paths import exclusive_lock

    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    monkeypatch.setattr(lorafit.inference, "generate", lambda *a, **k: [("late", True)])
    cache = tmp_path / "home" / FOLDER / "k.jsonl"
    cache.parent.mkdir(parents=True)
    result = []
    with exclusive_lock(cache.with_suffix(".lock")):  # "rank 0" is answering
        waiter = threading.Thread(
            target=lambda: result.extend(
                base_answers(None, None, "k", prompts, None, max_new_tokens=32)
            )
        )
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not result  # it waits instead of answering too
        key = _prompt_key(chat_prompt("Hi", None), 32)
        write_jsonl(cache, [{"key": key, "text": "Hello!", "stopped": True}])
    waiter.join(timeout=30)
    assert result == [{"prompt": "Hi", "response": "Hello!", "stopped": True}]


def test_made_up_terms_are_not_in_the_glossary_and_are_stable():
    terms = made_up_terms(GLOSSARY, 30, seed=0)
    assert len(set(terms)) == 30 and not {"atp", "mro"} & {t.casefold() for t in terms}
    assert terms == made_up_terms(GLOSSARY, 30, seed=0)
    train, evals = unknown_pairs(GLOSSARY, 0, 4, 3)
    assert len(train) == 4 and len(evals) == 3
    assert not {p.prompt for p in train} & {p.prompt for p in evals}
    assert all(refuses(p.response) for p in train + evals)


def test_held_out_made_up_terms_do_not_depend_on_how_many_are_trained():
    few, held_out = unknown_pairs(GLOSSARY, 0, 2, 5)
    many, same_held_out = unknown_pairs(GLOSSARY, 0, 20, 5)
    assert held_out == same_held_out and len(many) == 20
    assert not {p.prompt for p in many} & {p.prompt for p in held_out}


def test_default_is_two_made_up_terms_per_glossary_term_and_at_least_24(tmp_path):
    """Two a term on the demo's 68 terms; a small glossary gets 24 (four a term at most):
    with 12 on a six-term glossary the tuned model invented 29% of the held-out ones."""
    from lorafit.data.generate import default_unknown_terms

    _, _, n_train, _ = write_generated(GLOSSARY, tmp_path, unknown_eval=1)
    train = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert sum(refuses(r["response"]) for r in train) == 4 * len(GLOSSARY.terms)  # two terms
    assert len(train) == n_train

    def sized(n: int) -> Glossary:
        return Glossary(terms=tuple(Term(f"T{i}", "A thing.") for i in range(n)))

    assert [default_unknown_terms(sized(n)) for n in (1, 6, 12, 13, 68)] == [4, 24, 24, 26, 136]
    write_generated(GLOSSARY, tmp_path, unknown_train=0, unknown_eval=1, overwrite=True)
    train = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert not any(refuses(r["response"]) for r in train)  # asked for none: none


def test_generated_data_has_unknown_terms_in_train_and_a_held_out_file(tmp_path):
    write_generated(GLOSSARY, tmp_path, unknown_train=3, unknown_eval=2)
    train = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    unknown = [json.loads(x) for x in (tmp_path / "unknown.jsonl").read_text().splitlines()]
    assert sum("don't know" in r["response"] for r in train) == 3 and len(unknown) == 2


@pytest.mark.parametrize(
    ("answer", "refused"),
    [
        ("I don't know the term QZX. It is not in the glossary.", True),
        ("I'm not familiar with that term.", True),
        ("I do not know what that is.", True),
        ("QZX stands for Quality Zone Exchange. A process for parts.", False),
        ("Flomex: a type of fuel pump used in aircraft.", False),
    ],
)
def test_refusal_judge(answer, refused):
    assert refuses(answer) is refused


def test_several_processes_skip_the_base_distributions(monkeypatch):
    """Under several processes TRL's own loss trains (no KL term): the base distributions,
    a forward pass per replay row, are not computed there, and run.json's replay says so."""

    from lorafit.config import load_config
    from lorafit.data import prepare

    config = load_config("demo", [])
    assert config.data.replay_kl > 0
    monkeypatch.setattr(prepare, "replay_rows", lambda *a: (["row"], {"rows": 1}))
    monkeypatch.setattr(prepare, "base_distributions", lambda model, rows, **_: {"row": "teacher"})
    one = prepare.TrainingData(train=[], eval=None, info={})
    one.add_replay(config, None, None, None, world_size=1)
    assert one.teachers == {"row": "teacher"} and one.info["replay"]["kl_rows"] == 1

    monkeypatch.setattr(prepare, "base_distributions", lambda *a: pytest.fail("computed"))
    two = prepare.TrainingData(train=[], eval=None, info={})
    two.add_replay(config, None, None, None, world_size=2)
    assert two.teachers == {} and two.train == ["row"]  # the replay rows still train
    assert two.info["replay"]["kl_rows"] == 0 and two.info["replay"]["kl_weight"] == 0
