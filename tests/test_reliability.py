"""Reliability and safety: fuzzed data readers, a 10 MB line, disk-space checks, pickles only
with --allow-pickle, and secrets that never reach any output file."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.data.formats import read_dataset
from lorafit.errors import LorafitError
from lorafit.rundir import read_json

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_either_read_or_refused_cleanly(tmp_path_factory, blob):
    f = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    f.write_bytes(blob)
    try:
        dataset = read_dataset(f)
    except LorafitError as e:
        assert "data.jsonl" in str(e)  # every refusal names the file
    else:
        assert dataset.examples and all(e.answer.strip() for e in dataset.examples)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@FUZZ
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(
                ["prompt", "response", "completion", "messages", "instruction", "output", "x"]
            ),
            JSON_VALUES,
            max_size=4,
        ),
        min_size=1,
        max_size=5,
    )
)
def test_json_rows_with_any_shape_either_read_or_refused_cleanly(tmp_path_factory, rows):
    f = write_jsonl(tmp_path_factory.mktemp("fuzz") / "rows.jsonl", rows)
    try:
        read_dataset(f)
    except LorafitError as e:
        assert "rows.jsonl" in str(e)


@FUZZ
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=60), st.text(min_size=1, max_size=60)).filter(
            lambda pr: pr[0].strip() and pr[1].strip()
        ),
        min_size=1,
        max_size=6,
    )
)
def test_valid_rows_of_any_text_round_trip(tmp_path_factory, pairs):
    rows = [{"prompt": p, "response": r} for p, r in pairs]
    dataset = read_dataset(write_jsonl(tmp_path_factory.mktemp("ok") / "ok.jsonl", rows))
    assert [(e.prompt[-1]["content"], e.answer) for e in dataset.examples] == pairs


def test_a_10_mb_single_line_is_read_and_reported_over_length(tmp_path, embedded_dir):
    from lorafit.data.check import check_files

    big = {"prompt": "word " * 2_000_000, "response": "ok"}
    f = write_jsonl(tmp_path / "big.jsonl", [big, {"prompt": "a", "response": "b"}])
    assert f.stat().st_size > 10_000_000
    report = check_files([f], str(embedded_dir), 256)[0]
    assert report.rows == 2 and report.over_length == 1
    assert any("longer than" in w for w in report.warnings)


# --- runs ---------------------------------------------------------------------------------


def _tiny_cfg(tmp_path, tiny_model_dir, **sets):
    from lorafit.config import load_config

    data = write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": f"What is {i}?", "response": f"{i} is a number."} for i in range(8)],
    )
    base = {
        "model.name": str(tiny_model_dir),
        "data.train": str(data),
        "output_dir": str(tmp_path / "run"),
        "train.max_steps": 4,
        "train.save_steps": 2,
        "train.batch_size": 4,
        "train.grad_accumulation": 1,
        "data.replay": 0,
        "tracking.enabled": False,
    }
    base.update(sets)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_too_little_free_space_is_refused_before_training(tmp_path, tiny_model_dir, monkeypatch):
    from lorafit.train import train

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    with pytest.raises(LorafitError, match="MiB free, but this run needs about"):
        train(_tiny_cfg(tmp_path, tiny_model_dir), show_progress=False)
    assert not list((tmp_path / "run").glob("checkpoints/checkpoint-*"))  # nothing trained
    info = read_json(tmp_path / "run" / "run.json")
    assert info["status"] == "failed" and "MiB free" in info["error"]


def test_disk_full_mid_run_keeps_the_last_checkpoint_and_says_resume(
    tmp_path, tiny_model_dir, monkeypatch
):
    from lorafit.train import train
    from lorafit.trainer import LorafitTrainer

    original = LorafitTrainer._save_checkpoint

    def fill_up(self, model, trial):
        if self.state.global_step >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, model, trial)

    monkeypatch.setattr(LorafitTrainer, "_save_checkpoint", fill_up)
    with pytest.raises(LorafitError, match="disk filled up at step 4.*--resume"):
        train(_tiny_cfg(tmp_path, tiny_model_dir), show_progress=False)
    run = tmp_path / "run"
    assert read_json(run / "run.json")["status"] == "failed"
    assert [p.name for p in (run / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]


def test_pickle_only_models_need_allow_pickle(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    data = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b"}] * 4)
    args = [
        "train",
        "--data",
        str(data),
        "--set",
        f"model.name={pickled}",
        "--set",
        "train.max_steps=1",
    ]
    r = run_cli(*args, "--output", str(tmp_path / "refused"))
    assert r.returncode == 2 and "--allow-pickle" in r.stderr and "pickle" in r.stderr
    r = run_cli(
        *args, "--output", str(tmp_path / "allowed"), "--allow-pickle", "--set", "data.replay=0"
    )
    assert r.returncode == 0, r.stderr[-2000:]


SECRET_ENV, SECRET_DOTENV, SECRET_URI = (
    "hf_FAKEenvSECRET1234567890",
    "sk-FAKEdotenvSECRET0987654321",
    "PwFAKEuriSECRET5555",
)


def test_dotenv_is_read_from_the_working_directory(tmp_path):
    """README: tokens may sit in a .env of the working directory; the CLI loads it there
    (python-dotenv's default search starts from the package's folder, not the user's)."""
    (tmp_path / ".env").write_text(f"HF_TOKEN={SECRET_DOTENV}\n")
    probe = (
        "import hashlib, os; from lorafit.cli import _setup; _setup(); "
        "print(hashlib.sha256(os.environ.get('HF_TOKEN', '').encode()).hexdigest())"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    got = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert got.stdout.strip() == hashlib.sha256(SECRET_DOTENV.encode()).hexdigest(), got.stderr


@pytest.mark.slow
def test_secrets_never_reach_any_output(tmp_path):
    """Tokens in the environment and in the working directory's .env, and a tracking URI with
    a password: train, eval, merge and export never write or print them: not in the run's
    files, the tracking store, the GGUF folder, or any command's output."""
    (tmp_path / ".env").write_text(f"HF_TOKEN={SECRET_DOTENV}\nOPENAI_API_KEY={SECRET_DOTENV}\n")
    data = write_jsonl(
        tmp_path / "t.jsonl", [{"prompt": f"What is {i}?", "response": f"{i}."} for i in range(8)]
    )
    env = {"HF_TOKEN": SECRET_ENV, "MLFLOW_TRACKING_URI": ""}  # default store under tmp/runs
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | env
    # the real model: a random tiny one's greedy answers do not survive f16 (export refuses it)
    tiny = ["--set", "train.max_steps=1", "--set", "data.replay=0", "--set", "train.batch_size=4"]
    outputs = []

    def cli(*args):
        r = run_cli(*args, cwd=tmp_path, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        outputs.append(r.stdout + r.stderr)

    cli("train", "--data", str(data), "--eval-data", str(data), "--output", "runs/secret", *tiny)
    cli("eval", "runs/secret", "--data", str(data), "--limit", "2", "--max-new-tokens", "4")
    cli("merge", "runs/secret", "--output", "runs/merged")
    cli("export", "gguf", "runs/secret", "--output", "gguf/secret-f16.gguf")
    # a store whose URI carries a password (unreachable: tracking goes quiet, training goes on)
    uri = f"http://alice:{SECRET_URI}@127.0.0.1:9/?token={SECRET_URI}"
    cli("train", "--data", str(data), "--output", "runs/uri", *tiny, "--set", f"tracking.uri={uri}")
    r = run_cli("runs", "--store", uri, cwd=tmp_path, env=env)
    assert r.returncode == 2 and "***" in r.stderr  # a clear error, the URI redacted
    outputs.append(r.stdout + r.stderr)

    files = [
        p for folder in ("runs", "gguf") for p in (tmp_path / folder).rglob("*") if p.is_file()
    ]
    assert any(p.name == "mlflow.db" for p in files) and any(p.suffix == ".gguf" for p in files)
    assert any("mlartifacts" in p.parts for p in files) and len(files) > 30
    for p in files:
        blob = p.read_bytes()
        for secret in (SECRET_ENV, SECRET_DOTENV, SECRET_URI):
            assert secret.encode() not in blob, f"{secret} leaked into {p}"
    for text in outputs:
        for secret in (SECRET_ENV, SECRET_DOTENV, SECRET_URI):
            assert secret not in text
    assert "***@127.0.0.1" in (tmp_path / "runs/uri/config.yaml").read_text()


def test_the_converter_gets_no_credentials(monkeypatch):
    from lorafit.converter import converter_env

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, SECRET_ENV)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ENV)
    env = converter_env("/tmp/cache")
    assert SECRET_ENV not in json.dumps(env)
    assert env["HF_HUB_OFFLINE"] == "1" and "PATH" in env


def test_non_finite_loss_stops_with_the_step_and_a_lower_lr_hint(tmp_path, tiny_model_dir):
    from lorafit.train import train

    cfg = _tiny_cfg(tmp_path, tiny_model_dir, **{"train.lr": 1e12, "train.max_steps": 12})
    with pytest.raises(LorafitError, match=r"at step \d+.*Lower train.lr"):
        train(cfg, show_progress=False)
    info = read_json(tmp_path / "run" / "run.json")
    assert info["status"] == "failed" and "at step" in info["error"]


@pytest.mark.parametrize(
    ("loss", "grad_norm", "stops"),
    [
        (10.8, 0.0, True),  # flat logits, no gradient left: AMX CPUs end a divergence so
        (10.8, float("nan"), True),  # where AVX512-BF16 ones give a NaN gradient
        (float("inf"), 1.0, True),
        (0.4, 1e-30, False),  # a tiny gradient is still a gradient
        (0.0, 0.0, False),  # nothing left to learn is not a collapse
    ],
)
def test_a_collapsed_or_non_finite_step_stops_training(loss, grad_norm, stops):
    from types import SimpleNamespace

    from lorafit.trainer import MetricsCallback

    callback = MetricsCallback(Path("unused"), None, show_progress=False, writer=False)
    control = SimpleNamespace(should_training_stop=False)
    state = SimpleNamespace(global_step=3, epoch=0.5)
    callback.on_log(None, state, control, logs={"loss": loss, "grad_norm": grad_norm})
    assert control.should_training_stop is stops
    assert (callback.nonfinite is not None) is stops
    if stops:
        assert "at step 3" in callback.nonfinite


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_training_on_cpu_learns_and_merges_with_parity(tmp_path, quantization):
    """bitsandbytes 4-bit NF4 / 8-bit base on CPU: the loss falls, the merge (into the
    full-precision base) passes its parity check."""
    from lorafit.config import load_config
    from lorafit.merge import merge
    from lorafit.train import train

    rows = [
        {"prompt": f"What is code Z{i}?", "response": f"Z{i} is part number {i}."} for i in range(8)
    ]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    sets = {
        "data.train": str(data),
        "data.replay": 0,
        "model.quantization": quantization,
        "train.max_steps": 8,
        "train.batch_size": 4,
        "train.grad_accumulation": 1,
        "train.lr": 2e-3,
        "tracking.enabled": False,
        "output_dir": str(tmp_path / "run"),
    }
    run = train(load_config(None, [f"{k}={v}" for k, v in sets.items()]), show_progress=False)
    losses = [
        json.loads(x)["loss"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(x)
    ]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 * 0.8, losses
    report = merge(run, tmp_path / "merged")
    assert report["parity_ok"]

    # the quantized base keeps peft's bitsandbytes LoRA layers, never FusedLoraLinear
    from peft import get_peft_model
    from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt

    from lorafit.config import LoraSection, ModelSection
    from lorafit.lora_layer import FusedLoraLinear
    from lorafit.model import load_model, lora_config

    model = load_model(ModelSection(quantization=quantization), device="cpu")
    peft_model = get_peft_model(model, lora_config(LoraSection(), model))
    layers = [m for m in peft_model.modules() if hasattr(m, "lora_A")]
    expected = Linear4bit if quantization == "4bit" else Linear8bitLt
    assert layers and all(isinstance(m, expected) for m in layers)
    assert not any(isinstance(m, FusedLoraLinear) for m in layers)
