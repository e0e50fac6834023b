"""The base model's answers cache (lorafit.answer_cache): what keys it, and the answers lorafit
ships for its embedded model (read, never written; used only where this machine would compute
the very same answers)."""

import json
import re
from collections import Counter

import pytest

import lorafit.answer_cache as answer_cache
from lorafit.answer_cache import FOLDER, _prompt_key, cached_answers, model_key
from lorafit.inference import chat_prompt

SHIPPED = {"kind": "embedded", "name": "embedded:x", "source": "/a/model.gguf", "sha256": "ab12"}


class _Model:
    """Enough of a model for model_key: its first parameter's device and dtype."""

    def parameters(self):
        import torch

        yield torch.zeros(1)


def test_a_model_is_keyed_by_its_content_not_where_it_lies(monkeypatch):
    """The embedded model lies inside each checkout's virtualenv: a key with that path could
    never match answers made on another checkout."""
    model = _Model()
    moved = {**SHIPPED, "source": "/elsewhere/model.gguf", "name": "/elsewhere/model.gguf"}
    assert model_key(SHIPPED, model) == model_key(moved, model)
    assert model_key(SHIPPED, model) != model_key({**SHIPPED, "sha256": "cd34"}, model)
    assert model_key(SHIPPED, model) != model_key(SHIPPED, model, "bf16")
    hub = {"kind": "hub", "name": "org/m", "source": "org/m", "revision": "1"}  # no content hash
    assert model_key(hub, model) != model_key({**hub, "revision": "2"}, model)
    # another instruction set runs other matmul kernels, which can flip a near-tie
    here = model_key(SHIPPED, model)
    monkeypatch.setattr(answer_cache, "cpu_isa", lambda: ["no-such-flag"])
    assert model_key(SHIPPED, model) != here
    # a folder's hash covers its weights, not its chat template: its path stays in the key
    folder = {"kind": "local", "name": "/m", "source": "/m", "sha256": "ab12"}
    assert model_key(folder, model) != model_key({**folder, "source": "/n"}, model)


def test_quantized_weights_are_other_answers(monkeypatch):
    """A 4-bit base answers otherwise than the same weights in full precision; its first
    parameter (the embeddings) is never quantized, so the key must say it."""
    import lorafit.inference

    class _Config:
        quantization_config = {"load_in_4bit": True}

    model = _Model()
    full = model_key(SHIPPED, model)
    model.config = _Config()
    monkeypatch.setattr(lorafit.inference, "is_quantized", lambda m: True)
    assert model_key(SHIPPED, model) != full


def test_shipped_answers_are_used_and_never_written(tmp_path, monkeypatch):
    import lorafit.shipped

    root = tmp_path / "resources"
    (root / FOLDER).mkdir(parents=True)
    shipped_file = root / FOLDER / "k.jsonl"
    known = chat_prompt("Shipped?", None)
    line = {"key": _prompt_key(known, 8), "text": "From the package.", "stopped": True}
    shipped_file.write_text(json.dumps(line) + "\n")
    monkeypatch.setattr(lorafit.shipped, "_root", lambda: root)
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))
    asked = []

    def answer(prompts):
        asked.extend(prompts)
        return [("Computed.", False) for _ in prompts]

    new = chat_prompt("New?", None)
    sources = Counter()
    assert cached_answers("k", [known, new], 8, answer, sources=sources) == [
        ("From the package.", True),
        ("Computed.", False),
    ]
    assert asked == [new]  # only the prompt the package has no answer to
    assert sources == {"shipped": 1, "computed": 1, "cached": 0}
    assert shipped_file.read_text() == json.dumps(line) + "\n"
    user = (tmp_path / "home" / FOLDER / "k.jsonl").read_text().splitlines()
    assert [json.loads(x)["text"] for x in user] == ["Computed."]
    # another key (another machine kind), another answer length: the package is not used
    asked.clear()
    cached_answers("other", [known], 8, answer)
    cached_answers("k", [known], 9, answer)
    assert asked == [known, known]
    sources.clear()
    cached_answers("k", [known, new], 8, answer, sources=sources)
    assert sources == {"shipped": 1, "cached": 1, "computed": 0}


def test_an_unreadable_cache_file_is_answered_again(tmp_path, monkeypatch, caplog):
    """A cache file cut short (a full disk) must not stop a training or an evaluation."""
    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path))
    (tmp_path / FOLDER).mkdir()
    (tmp_path / FOLDER / "k.jsonl").write_text('{"key": "abc", "text": "cut sh')
    prompt = chat_prompt("Hi", None)
    assert cached_answers("k", [prompt], 8, lambda ps: [("Hello.", True)]) == [("Hello.", True)]
    assert "unreadable" in caplog.text
    assert cached_answers("k", [prompt], 8, lambda ps: pytest.fail("cached")) == [("Hello.", True)]


def test_base_answers_keeps_the_other_machine_kinds_current_files(tmp_path, monkeypatch):
    """make base-answers drops this machine's own file (it makes it again) and every stale one,
    and keeps the current answers of other machine kinds, which it cannot make."""
    here = {"base": {"sha256": "ab"}, "lorafit": 3, "torch": "2.0", "transformers": "5.0"}
    here["machine"] = ["x86_64", ["avx2"]]
    monkeypatch.setattr(answer_cache, "_demo_identity", lambda: here)
    files = {
        "mine": here,
        "other_kind": {**here, "machine": ["x86_64", ["avx2", "amx_bf16"]]},
        "old_code": {**here, "machine": ["aarch64", []], "lorafit": 2},
        "old_torch": {**here, "torch": "1.9"},
        "old_model": {**here, "machine": ["aarch64", []], "base": {"sha256": "cd"}},
    }
    for name, identity in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"identity": identity, "threads": 2}))
        (tmp_path / f"{name}.jsonl").write_text("")
    (tmp_path / "orphan.jsonl").write_text("")  # no KEY.json says what it is
    dropped = answer_cache.drop_stale_shipped(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other_kind.json", "other_kind.jsonl"]
    assert len(dropped) == 9


def test_shipped_answer_files_cover_the_replay_prompts():
    """Each shipped file is one machine kind's answers to the demo's questions and to every
    replay prompt (`make base-answers` writes them)."""
    from importlib.metadata import version

    from lorafit.config import REPLAY_MAX_NEW_TOKENS
    from lorafit.data.replay import DEFAULT_REPLAY_PROMPTS, read_prompts
    from lorafit.shipped import available, shipped

    files = [f for f in available(FOLDER) if f.endswith(".jsonl")]
    assert files, "make base-answers ships the embedded model's answers"
    for name in files:  # what each key stands for: stale answers fail here on any machine
        made = json.loads(shipped(f"{FOLDER}/{name[:-1]}").read_text())
        identity = made["identity"]
        assert isinstance(made["threads"], int) and made["threads"] > 0
        assert answer_cache.key_of(identity) == name.removesuffix(".jsonl")
        assert identity["lorafit"] == answer_cache.ANSWERS_VERSION, "run make base-answers"
        assert identity["torch"] == version("torch"), "run make base-answers"
        assert identity["transformers"] == version("transformers"), "run make base-answers"
    replay = {
        _prompt_key(chat_prompt(p, None), REPLAY_MAX_NEW_TOKENS)
        for p in read_prompts(DEFAULT_REPLAY_PROMPTS)
    }
    for name in files:
        assert re.fullmatch(r"[0-9a-f]{20}\.jsonl", name)
        rows = [json.loads(x) for x in shipped(f"{FOLDER}/{name}").read_text().splitlines()]
        assert all(
            re.fullmatch(r"[0-9a-f]{64}", r["key"])
            and isinstance(r["text"], str)
            and isinstance(r["stopped"], bool)
            for r in rows
        )
        keys = {r["key"] for r in rows}
        assert replay <= keys and len(keys) >= len(replay) + 444  # + the demo's held-out


@pytest.mark.slow
def test_shipped_answers_are_the_embedded_models_own(embedded_dir, tmp_path, monkeypatch):
    """Recompute, as the demo does, the first batch of replay answers and the first batch of
    held-out answers, and compare them with the shipped ones on a machine whose key has a
    shipped file; on any other machine the shipped answers must not be used at all."""
    import torch

    from lorafit.config import ModelSection, TrainSection
    from lorafit.data.replay import DEFAULT_REPLAY_PROMPTS, read_prompts
    from lorafit.model import load_model, load_tokenizer, resolve_precision
    from lorafit.shipped import available, shipped
    from lorafit.sources import resolve_base

    monkeypatch.setenv("LORAFIT_HOME", str(tmp_path / "home"))  # nothing cached: all computed
    base = resolve_base(ModelSection())
    model = load_model(ModelSection(), base.dir, "cpu")
    tokenizer = load_tokenizer(base.dir)
    precision = resolve_precision(TrainSection().precision, "cpu")
    key = model_key(base.record(), model, precision)
    replay = [chat_prompt(p, None) for p in read_prompts(DEFAULT_REPLAY_PROMPTS)]
    if f"{key}.jsonl" not in available(FOLDER):  # the real path computes every answer
        computed = []
        cached_answers(key, replay[:2], 32, lambda ps: computed.extend(ps) or [("", 1)] * 2)
        assert computed == replay[:2]
        return
    ship = answer_cache.shipped_answers(key)
    # the threads they were made with: another count can tip a near-tie (make test runs one
    # thread a worker; 1 of these 48 held-out answers differs so)
    made = json.loads(shipped(f"{FOLDER}/{key}.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(made["threads"])
    try:
        _compare_first_batches(ship, model, tokenizer, precision, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _compare_first_batches(ship, model, tokenizer, precision, tmp_path):
    from lorafit.config import DataSection, EvalSection
    from lorafit.data.formats import read_dataset
    from lorafit.data.generate import write_generated
    from lorafit.data.glossary import load_glossary
    from lorafit.data.replay import DEFAULT_REPLAY_PROMPTS, base_answers
    from lorafit.data.tokenize import with_system
    from lorafit.inference import generate
    from lorafit.shipped import EXAMPLE_GLOSSARY

    args = (model, tokenizer, None, DEFAULT_REPLAY_PROMPTS, None)
    live = base_answers(*args, needed=1, seed=DataSection().seed, precision=precision)
    assert len(live) == 48
    for row in live:
        record = ship[_prompt_key(chat_prompt(row["prompt"], None), 32)]
        assert (record["text"], record["stopped"]) == (row["response"], row["stopped"])
    # the demo's held-out questions: generate() sorts by length, so the shortest 48 are
    # the demo's first batch
    data = DataSection()  # the demo's data, as `lorafit demo` generates it
    write_generated(
        load_glossary(EXAMPLE_GLOSSARY),
        tmp_path / "d",
        seed=data.seed,
        unknown_train=data.unknown_terms,
        kinds=data.kinds,
        eval_kinds=data.eval_kinds,
    )
    held_out = [with_system(e, None) for e in read_dataset(tmp_path / "d" / "eval.jsonl").examples]
    first = sorted(held_out, key=lambda p: len(str(p)))[:48]
    n = EvalSection().max_new_tokens
    answers = generate(model, tokenizer, first, n, 48, precision=precision)
    for prompt, (text, stopped) in zip(first, answers, strict=True):
        record = ship[_prompt_key(prompt, n)]
        assert (record["text"], record["stopped"]) == (text, stopped)
