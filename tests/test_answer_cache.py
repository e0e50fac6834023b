"""The base model's answers cache (lorafit.answer_cache): what keys it, and the answers lorafit
ships for its embedded model (read, never written; used only where this machine would compute
the very same answers)."""

import json
import re

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
    monkeypatch.setattr(answer_cache, "cpu_isa", lambda: ["avx2"])
    assert model_key(SHIPPED, model) != here


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
    assert cached_answers("k", [known, new], 8, answer) == [
        ("From the package.", True),
        ("Computed.", False),
    ]
    assert asked == [new]  # only the prompt the package has no answer to
    assert shipped_file.read_text() == json.dumps(line) + "\n"
    user = (tmp_path / "home" / FOLDER / "k.jsonl").read_text().splitlines()
    assert [json.loads(x)["text"] for x in user] == ["Computed."]
    # another key (another machine kind), another answer length: the package is not used
    asked.clear()
    cached_answers("other", [known], 8, answer)
    cached_answers("k", [known], 9, answer)
    assert asked == [known, known]


def test_shipped_answer_files_cover_the_replay_prompts():
    """Each shipped file is one machine kind's answers to the demo's questions and to every
    replay prompt (`make base-answers` writes them)."""
    from lorafit.config import REPLAY_MAX_NEW_TOKENS
    from lorafit.data.replay import DEFAULT_REPLAY_PROMPTS, read_prompts
    from lorafit.shipped import available, shipped

    files = available(FOLDER)
    assert files, "make base-answers ships the embedded model's answers"
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
def test_shipped_answers_are_the_embedded_models_own(embedded_dir):
    """Recompute the first batch of replay answers as training does and compare them with the
    shipped ones, on a machine whose key has a shipped file; on any other machine the shipped
    answers must not be used at all."""
    from lorafit.config import DataSection, ModelSection, TrainSection
    from lorafit.data.replay import DEFAULT_REPLAY_PROMPTS, base_answers
    from lorafit.model import load_model, load_tokenizer, resolve_precision
    from lorafit.shipped import available
    from lorafit.sources import resolve_base

    base = resolve_base(ModelSection())
    model = load_model(ModelSection(), base.dir, "cpu")
    tokenizer = load_tokenizer(base.dir)
    precision = resolve_precision(TrainSection().precision, "cpu")
    key = model_key(base.record(), model, precision)
    if f"{key}.jsonl" not in available(FOLDER):
        assert answer_cache.shipped_answers(key) == {}
        return
    args = (model, tokenizer, None, DEFAULT_REPLAY_PROMPTS, None)
    live = base_answers(*args, needed=1, seed=DataSection().seed, precision=precision)
    ship = answer_cache.shipped_answers(key)
    assert len(live) == 48
    for row in live:
        record = ship[_prompt_key(chat_prompt(row["prompt"], None), 32)]
        assert (record["text"], record["stopped"]) == (row["response"], row["stopped"])
