import json
from collections import Counter, defaultdict
from pathlib import Path

from conftest import run_cli

from lorafit.data.generate import generate_pairs
from lorafit.data.glossary import load_glossary
from lorafit.data.kinds import answer_for

ROOT = Path(__file__).resolve().parents[1]
AVIATION = ROOT / "data" / "glossaries" / "aviation.yaml"


def _by_term(glossary, pairs):
    out = defaultdict(list)
    answers = {answer_for(t): t.term for t in glossary.terms}
    for p in pairs:
        out[answers[p.response]].append(p.prompt)
    return out


def test_every_term_has_8_train_and_3_held_out_phrasings():
    g = load_glossary(AVIATION)
    train, evals = generate_pairs(g, seed=0)
    tr, ev = _by_term(g, train), _by_term(g, evals)
    assert set(tr) == set(ev) == {t.term for t in g.terms}  # nothing dropped
    assert min(len(v) for v in tr.values()) >= 8
    assert min(len(v) for v in ev.values()) >= 3
    train_prompts = {p.prompt.casefold() for p in train}
    assert not any(p.prompt.casefold() in train_prompts for p in evals)  # held out
    everything = [p.prompt.casefold() for p in train + evals]
    assert len(everything) == len(set(everything))  # no duplicate prompts


def test_phrasings_are_varied_and_templates_held_out():
    g = load_glossary(AVIATION)
    train, evals = generate_pairs(g, seed=0)
    atp = [p.prompt for p in train if p.response.startswith("ATP stands for")]
    assert len({p.split()[0] for p in atp}) >= 3  # not one template with different words
    # eval phrasings come from templates never used in training, for any term
    shapes = lambda pairs: {p.prompt.replace(n, "{t}") for p in pairs for n in [_term(g, p)]}  # noqa: E731
    assert not shapes(train) & shapes(evals)


def _term(g, pair):
    return next(t.term for t in g.terms if answer_for(t) == pair.response)


def test_answers_state_expansion_and_definition():
    g = load_glossary(AVIATION)
    atp = next(t for t in g.terms if t.term == "ATP")
    assert answer_for(atp) == (
        "ATP stands for Available to Promise. Stock on hand minus overdue orders; "
        "the quantity that can still be committed to customers."
    )


def test_deterministic_for_a_seed_and_different_across_seeds():
    g = load_glossary(AVIATION)
    assert generate_pairs(g, seed=3) == generate_pairs(g, seed=3)
    assert generate_pairs(g, seed=3)[0] != generate_pairs(g, seed=4)[0]


def test_cli_writes_files_and_counts(tmp_path):
    r = run_cli("data", "generate", str(AVIATION), "--out", str(tmp_path), "--seed", "1")
    assert r.returncode == 0, r.stderr
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert {"prompt", "response", "kind"} <= set(train[0])
    assert f"{len(train)} train prompts" in r.stdout.replace("\n", " ")
    manifest = json.loads((tmp_path / "lorafit_data.json").read_text())
    assert len(evals) == manifest["eval"] == sum(manifest["eval_kinds"].values())
    kinds = Counter(r["kind"] for r in evals)
    assert kinds["define"] == 2 * 68 and kinds["reverse"] == 68  # the config's eval_kinds
    assert Counter(len(r["response"]) > 0 for r in train)[True] == len(train)
