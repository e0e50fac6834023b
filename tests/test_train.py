"""Training, evaluation and merge on a tiny random Llama (seconds, real tokenizer/template)."""

import json

import pytest
from conftest import write_jsonl

from lorafit.config import load_config
from lorafit.errors import LorafitError
from lorafit.rundir import read_json
from lorafit.train import train

ROWS = [
    {"prompt": f"What is term {i}?", "response": f"Term {i} is the answer number {i}."}
    for i in range(8)
]


def _cfg(tmp_path, tiny_model_dir, out="run", **sets):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    evals = write_jsonl(tmp_path / "eval.jsonl", ROWS[:4])
    base = {
        "model.name": str(tiny_model_dir),
        "data.train": str(data),
        "data.eval": str(evals),
        "output_dir": str(tmp_path / out),
        "train.max_steps": 20,
        "train.lr": 5e-2,
        "train.batch_size": 4,
        "train.grad_accumulation": 1,
        "train.eval_steps": 10,
        "train.save_steps": 10,
        "lora.r": 4,
        "lora.alpha": 8,
    }
    base.update(sets)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("train")
    return train(_cfg(tmp, tiny_model_dir), show_progress=False)


def test_loss_goes_down_and_run_dir_describes_itself(tiny_run):
    losses = _losses(tiny_run)
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.8
    info = read_json(tiny_run / "run.json")
    assert info["status"] == "completed"
    assert info["base_model"]["kind"] == "local"
    assert len(info["data"]["train"]["sha256"]) == 64 and info["data"]["train"]["rows"] == 8
    assert info["versions"]["torch"].startswith("2.13")
    assert info["results"]["final_eval_loss"] is not None
    for name in (
        "config.yaml",
        "loss.png",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/tokenizer_config.json",
    ):
        assert (tiny_run / name).is_file(), name
    assert not list((tiny_run / "adapter").glob("*.bin"))  # weights as safetensors only
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in m for m in metrics)
    assert any(m.get("tokens_per_s", 0) > 0 for m in metrics)


def test_lora_weights_changed_and_base_frozen(tiny_run, tiny_model_dir):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    original = load_file(next(tiny_model_dir.glob("*.safetensors")))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, tiny_run / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero
    targets = {n.split(".lora_B")[0] for n, _ in model.named_parameters() if "lora_B" in n}
    assert any("mlp.down_proj" in t for t in targets) and any(
        "self_attn.o_proj" in t for t in targets
    )
    # what training saved is LoRA only: the base it applies to stays the file on disk
    saved = load_file(tiny_run / "adapter" / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), list(saved)[:5]
    assert len(saved) == 2 * len(targets)
    compared = 0
    for name, param in model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        if key in original:
            assert torch.equal(param, original[key]), f"{key} changed"
            compared += 1
    assert compared >= 2 * 7  # every adapted linear layer of both decoder layers was checked


def test_same_seed_same_loss_curve(tmp_path, tiny_model_dir, tiny_run):
    again = train(_cfg(tmp_path, tiny_model_dir, out="again"), show_progress=False)
    assert _losses(again) == _losses(tiny_run)


def test_refuses_to_overwrite_a_run(tmp_path, tiny_model_dir, tiny_run):
    cfg = _cfg(tmp_path, tiny_model_dir)
    cfg.output_dir = str(tiny_run)
    with pytest.raises(LorafitError, match="already exists"):
        train(cfg, show_progress=False)


def test_all_rows_truncated_away_fails(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, out="short", **{"data.max_length": 20})
    with pytest.raises(LorafitError, match="lost its answer to truncation"):
        train(cfg, show_progress=False)


def test_eval_writes_predictions_metrics_report(tiny_run, tmp_path):
    from lorafit.config import EvalSection
    from lorafit.evaluate import evaluate

    data = write_jsonl(tmp_path / "e.jsonl", ROWS[:3])
    calls = []
    m = evaluate(
        tiny_run,
        data,
        tmp_path / "ev",
        EvalSection(max_new_tokens=8),
        progress=lambda *a: calls.append(a),
    )
    assert calls[-1][0] == calls[-1][1] > 6  # base + tuned over prompts and probes
    assert (
        m["n"] == 3
        and set(m["base"]) >= {"accuracy", "rouge_l"}
        and set(m["tuned"]) >= {"accuracy", "rouge_l"}
    )
    preds = [
        json.loads(line)
        for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    ]
    assert set(preds[0]) >= {"prompt", "reference", "base", "tuned"}
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 3
    for model in ("base", "tuned"):  # the metrics are the predictions' own verdicts
        right = [p[f"{model}_correct"] for p in preds]
        assert m[model]["accuracy"] == pytest.approx(sum(right) / 3)
    assert "| base |" in (tmp_path / "ev" / "report.md").read_text()
    # the general-ability probes run on both models by default
    probes = [
        json.loads(line)
        for line in (tmp_path / "ev" / "probe_predictions.jsonl").read_text().splitlines()
    ]
    assert len(probes) > 50
    for model in ("base", "tuned"):
        right = sum(p[f"{model}_correct"] for p in probes)
        assert m[model]["general_accuracy"] == pytest.approx(right / len(probes))
    assert m["general_regressions"] == [
        p["prompt"] for p in probes if p["base_correct"] and not p["tuned_correct"]
    ]


def test_tuned_answers_with_the_adapter_merged_in_memory_match_unmerged(tiny_run):
    from lorafit.evaluate import answer_sets
    from lorafit.inference import chat_prompt, generate, load_for_inference

    loaded = load_for_inference(tiny_run)
    prompts = [chat_prompt(r["prompt"], None) for r in ROWS]
    unmerged = generate(loaded.model, loaded.tokenizer, prompts, 12)
    with loaded.model.disable_adapter():
        base = generate(loaded.model, loaded.tokenizer, prompts, 12)
    [(base_again, merged)] = answer_sets(loaded, [(prompts, 12)], batch_size=4)
    assert merged == unmerged and base_again == base
    assert merged != base  # the adapter changes the answers, so the comparison means something
    layers = [m for m in loaded.model.modules() if hasattr(m, "merged_adapters")]
    assert layers and not any(m.merged_adapters for m in layers)  # unmerged afterwards


def test_merge_is_standalone_and_matches(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorafit.merge import merge

    r = merge(tiny_run, tmp_path / "merged")
    assert r["parity_ok"] and r["max_abs_logit_diff"] <= r["tolerance"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert merged.generation_config.eos_token_id is not None
    with pytest.raises(LorafitError, match="already exists"):
        merge(tiny_run, tmp_path / "merged")


def test_custom_system_prompt_travels_to_the_merged_model(tmp_path, tiny_model_dir):
    from lorafit.inference import load_for_inference
    from lorafit.merge import merge

    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        out="sys",
        **{"train.max_steps": 2, "data.system_prompt": "'You answer brewing questions.'"},
    )
    run = train(cfg, show_progress=False)
    assert load_for_inference(run, "cpu").system_prompt == "You answer brewing questions."
    merge(run, tmp_path / "sys-merged")
    loaded = load_for_inference(tmp_path / "sys-merged", "cpu")
    assert loaded.system_prompt == "You answer brewing questions."


def test_top_layers_run_trains_saves_and_merges(tmp_path, tiny_model_dir):
    """An adapter on the top layer only goes through the whole train -> merge path."""
    from lorafit.merge import merge

    sets = {"lora.top_layers": 1, "train.max_steps": 10, "tracking.enabled": False}
    run = train(_cfg(tmp_path, tiny_model_dir, **sets), show_progress=False)
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [1]
    losses = _losses(run)
    assert sum(losses[-3:]) < sum(losses[:3])
    r = merge(run, tmp_path / "merged")
    assert r["parity_ok"]


def test_a_small_dataset_is_repeated_up_to_min_steps():
    from lorafit.config import TrainSection
    from lorafit.data.prepare import data_repeats, optimizer_steps

    t = TrainSection()  # 2 epochs, effective batch 16, min_steps 60
    assert optimizer_steps(88, t) == 12  # 8 glossary terms: 6 steps per epoch
    assert data_repeats(88, t) == 6 and optimizer_steps(88 * 6, t) >= 60
    assert optimizer_steps(88 * 5, t) < 60  # the fewest repeats that get there
    assert data_repeats(748, t) == 1  # the demo's 68 terms already take 94 steps
    assert data_repeats(88, t, world_size=2) == 11  # steps count effective batches
    assert data_repeats(88, TrainSection(min_steps=0)) == 1
    assert data_repeats(88, TrainSection(max_steps=20)) == 1  # an explicit budget rules
    assert data_repeats(0, t) == 1


def test_a_second_run_into_the_same_directory_refuses_to_start(tmp_path):
    from lorafit.rundir import RunLock

    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().isdigit()  # the holder's pid
        with pytest.raises(LorafitError, match="another lorafit process"), RunLock(tmp_path):
            pass
        assert (tmp_path / ".lock").is_file()  # the refused one left the holder's lock alone
    # the lock file stays (deleting a lock file another process may be opening is a race);
    # the lock itself is free again once released
    with RunLock(tmp_path):
        pass


def test_base_answers_come_from_the_cache_the_second_time(tiny_run, tmp_path, monkeypatch):
    import lorafit.evaluate as evaluate_module
    from lorafit.config import EvalSection

    data = write_jsonl(tmp_path / "e.jsonl", ROWS[:3])
    settings = EvalSection(max_new_tokens=8)
    first = evaluate_module.evaluate(tiny_run, data, tmp_path / "a", settings, probes=None)
    real, calls = evaluate_module.generate, []

    def counting(model, tok, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tok, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate", counting)
    second = evaluate_module.evaluate(tiny_run, data, tmp_path / "b", settings, probes=None)
    assert calls == [3]  # the tuned answers only: the base answers came from the cache
    assert sum(first["base_answers"].values()) == 3
    assert second["base_answers"] == {"shipped": 0, "cached": 3, "computed": 0}
    report = (tmp_path / "b" / "report.md").read_text()
    assert "0 shipped with lorafit for this kind of machine, 3 from this machine's cache" in report
    rows = [
        [json.loads(x) for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]
        for d in ("a", "b")
    ]
    assert [r["base"] for r in rows[0]] == [r["base"] for r in rows[1]]
    assert first["base"]["accuracy"] == second["base"]["accuracy"]
    calls.clear()
    no_cache = EvalSection(max_new_tokens=8, cache_base_answers=False)
    third = evaluate_module.evaluate(tiny_run, data, tmp_path / "c", no_cache, probes=None)
    assert calls == [3, 3] and third["base_answers"]["computed"] == 3
    # answers computed in another precision are other answers: never taken from the other's
    # cache (the runs above were "auto": fp32 or bf16 by machine, so this one starts afresh)
    calls.clear()
    fresh = str(tmp_path / "fresh-home")
    monkeypatch.setenv("LORAFIT_HOME", fresh)
    for precision in ("fp32", "bf16", "bf16"):
        settings = EvalSection(max_new_tokens=8, precision=precision)
        out = evaluate_module.evaluate(tiny_run, data, tmp_path / precision, settings, probes=None)
        assert out["precision"] == precision
    assert calls == [3, 3, 3, 3, 3]  # fp32 base + tuned; bf16 base + tuned; bf16 tuned


def test_generate_computes_in_the_precision_asked(tiny_model_dir, tokenizer):
    """eval.precision bf16 autocasts a float32 model (about 2x faster on a CPU with native
    bf16); fp32 leaves it in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorafit.inference import chat_prompt, generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    prompts = [chat_prompt("What is EEC?", None)]
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        seen.clear()
        generate(model, tokenizer, prompts, 3, precision=precision)
        assert seen and set(seen) == {dtype}


def test_quantized_weights_are_seen_through_the_adapter_and_never_autocast(tiny_model_dir):
    """Evaluation merges the adapter only into full weights, and records the precision it
    really computed in: both ask is_quantized, through PEFT's wrapper."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafit.inference import applied_precision, is_quantized

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert not is_quantized(wrapped) and applied_precision(wrapped, "bf16") == "bf16"
    model.hf_quantizer = object()  # what transformers sets on a 4/8-bit model
    assert is_quantized(wrapped) and applied_precision(wrapped, "bf16") == "fp32"


def test_merge_refuses_to_write_when_parity_fails(tiny_run, tmp_path, monkeypatch):
    import lorafit.merge as merge_module

    monkeypatch.setattr(merge_module, "TOLERANCE", 0.0)  # no merge reproduces logits exactly
    out = tmp_path / "merged"
    with pytest.raises(LorafitError, match="parity check failed.*not written"):
        merge_module.merge(tiny_run, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_gradient_checkpointing_trains_with_the_shared_prefix_off(tmp_path, tiny_model_dir):
    """The 4 GB preset turns checkpointing on; its recompute cannot take the row mask, so
    sharing must be off, and the run must still learn."""
    run = train(
        _cfg(tmp_path, tiny_model_dir, out="ckpt", **{"train.gradient_checkpointing": True}),
        show_progress=False,
    )
    info = read_json(run / "run.json")
    assert info["status"] == "completed" and info["results"]["shared_prefix"] == 0
    losses = _losses(run)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.8


def test_loraplus_gives_b_matrices_their_own_learning_rate(tmp_path, tiny_model_dir):
    """train.loraplus_lr_ratio: every B matrix in a group at that multiple of train.lr, every
    other trainable parameter at train.lr, through the schedule; 1 keeps TRL's optimizer."""
    from transformers import TrainerCallback

    seen = []

    class Rates(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, model=None, **kw):
            seen.append([g["lr"] for g in optimizer.param_groups])
            if state.global_step == 1:
                names = {id(p): n for n, p in model.named_parameters()}
                groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
                seen.append(groups)

    sets = {"train.max_steps": 6, "train.loraplus_lr_ratio": 8, "tracking.enabled": False}
    run = train(_cfg(tmp_path, tiny_model_dir, **sets), show_progress=False, callbacks=[Rates()])
    first, groups, *rest = seen
    # peft's LoRA+ optimizer: A, embedding, B and B without decay (empty groups included)
    b = [i for i, g in enumerate(groups) if g and all(".lora_B." in n for n in g)]
    a = [i for i, g in enumerate(groups) if g and all(".lora_B." not in n for n in g)]
    assert len(b) == 1 and len(a) == 1 and sum(map(len, groups)) == len(groups[a[0]]) * 2
    b, a = b[0], a[0]
    assert first[b] == pytest.approx(8 * first[a]) and first[a] > 0
    assert all(r[b] == pytest.approx(8 * r[a]) for r in rest)  # the schedule keeps the ratio
    assert groups[b] and all(".lora_B." in n for n in groups[b])
    assert groups[a] and all(".lora_B." not in n for n in groups[a])
    assert _losses(run)[-1] < _losses(run)[0]

    seen.clear()
    sets["train.loraplus_lr_ratio"] = 1
    train(
        _cfg(tmp_path, tiny_model_dir, out="plain", **sets),
        show_progress=False,
        callbacks=[Rates()],
    )
    assert len({lr for lr in seen[0]}) == 1  # plain LoRA: one rate for every group


def test_resuming_with_another_loraplus_ratio_says_what_to_do(tmp_path, tiny_model_dir):
    """LoRA+ groups the optimizer's parameters differently: a checkpoint trained with ratio 1
    cannot continue with 8; the user is told which key, not torch's ValueError."""
    sets = {"train.max_steps": 10, "tracking.enabled": False}
    train(_cfg(tmp_path, tiny_model_dir, **sets), show_progress=False)
    sets.update({"train.max_steps": 20, "train.loraplus_lr_ratio": 8})
    with pytest.raises(LorafitError, match="train.loraplus_lr_ratio is 8 now"):
        train(_cfg(tmp_path, tiny_model_dir, **sets), show_progress=False, resume=True)
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-10").is_dir()  # nothing lost
