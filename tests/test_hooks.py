"""What lorafit relies on in its libraries' internals (lorafit.hooks), and transformers'
checkpoint order that resume relies on: each test fails if an upgrade changes the behaviour."""

import torch
from transformers import LlamaForCausalLM

from lorafit import hooks


def _tiny_llama(tiny_model_dir):
    return LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_extra_attention_kwarg_reaches_the_kernel_only_inside_the_switch(tiny_model_dir):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = _tiny_llama(tiny_model_dir)
    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append(kwargs.get(hooks.ROWS_KWARG))
        kwargs.pop(hooks.ROWS_KWARG, None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    hooks.register_attention("lorafit_test_recording", recording)
    ids = torch.tensor([[1, 2, 3, 4]])
    with hooks.attention_implementation(model.config, "lorafit_test_recording"):
        inside = model.model(input_ids=ids, **{hooks.ROWS_KWARG: "layout"}).last_hidden_state
    assert seen == ["layout"] * model.config.num_hidden_layers  # every layer got it
    seen.clear()
    outside = model.model(input_ids=ids).last_hidden_state
    assert seen == []  # the model's own kernel again
    torch.testing.assert_close(inside, outside)


def test_peft_builds_the_fused_layer(tiny_model_dir):
    from peft import get_peft_model

    from lorafit.config import LoraSection
    from lorafit.lora_layer import FusedLoraLinear
    from lorafit.model import lora_config

    model = _tiny_llama(tiny_model_dir)
    peft_model = get_peft_model(model, lora_config(LoraSection(r=4, alpha=8), model))
    fused = [m for m in peft_model.modules() if isinstance(m, FusedLoraLinear)]
    assert len(fused) == 7 * model.config.num_hidden_layers  # q k v o gate up down


def test_gguf_loading_bar_is_the_name_the_hook_replaces():
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    with hooks.quiet_gguf_loading():
        assert gguf_utils.tqdm is not original and list(gguf_utils.tqdm([1, 2], desc="x")) == [1, 2]
    assert gguf_utils.tqdm is original


def test_serve_handler_renders_messages_as_the_template_expects(tiny_model_dir):
    _, template_messages = hooks.openai_chat_handler(tiny_model_dir, device="cpu")
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    rendered = template_messages(parts)
    assert rendered[0]["role"] == "user" and "a" in str(rendered[0]["content"])


def test_the_trainer_writes_trainer_state_last_in_a_checkpoint(tmp_path, tiny_model_dir):
    """RunDir.latest_checkpoint takes a checkpoint without a readable trainer_state.json as
    cut off mid-save: that holds only while transformers writes that file last."""
    from conftest import write_jsonl

    from lorafit.config import load_config
    from lorafit.train import train

    rows = [{"prompt": f"What is {i}?", "response": f"{i} is {i}."} for i in range(8)]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    sets = {
        "model.name": tiny_model_dir,
        "data.train": data,
        "output_dir": tmp_path / "run",
        "train.max_steps": 4,
        "train.save_steps": 2,
        "train.batch_size": 4,
        "data.replay": 0,
        "tracking.enabled": False,
    }
    train(load_config(None, [f"{k}={v}" for k, v in sets.items()]), show_progress=False)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints
    for checkpoint in checkpoints:
        files = [p for p in checkpoint.rglob("*") if p.is_file()]
        last = max(files, key=lambda p: p.stat().st_mtime_ns)
        assert last.name == "trainer_state.json", (checkpoint, last)


def test_training_sends_no_telemetry(tmp_path, tiny_model_dir, monkeypatch):
    """TRL's trainer pings the Hub from a background thread when it is built; lorafit's never
    does (unless the user sets HF_HUB_DISABLE_TELEMETRY=0)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _telemetry
    from test_train import _cfg

    from lorafit.train import train

    pings = []
    monkeypatch.delenv("CI", raising=False)  # TRL stays quiet under CI by itself
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_telemetry, "_start_telemetry_thread", lambda: pings.append("thread"))
    monkeypatch.setattr(_telemetry, "_TELEMETRY_QUEUE", type("Q", (), {"put": pings.append})())
    train(_cfg(tmp_path, tiny_model_dir, **{"train.max_steps": 1}), show_progress=False)
    assert pings == []
    assert constants.HF_HUB_DISABLE_TELEMETRY is True
