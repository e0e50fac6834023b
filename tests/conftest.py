"""Shared fixtures: the real embedded model's tokenizer, and a tiny random Llama built from a
config (same tokenizer and chat template) for fast training tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


# `make test` installs the GGUF converter and llama.cpp here once (lorafit export setup), so
# that no test needs the network
SEEDED_TOOLS = ROOT / ".venv" / "lorafit-home" / "tools"


def pytest_configure(config):
    """Tests track into a throwaway MLflow store, never the checkout's runs/mlflow.db, and
    cache into a throwaway LORAFIT_HOME, never ~/.cache/lorafit: results do not depend on what
    an earlier run left there, and the embedded model is materialized once per session.

    Under pytest-xdist (`make test` runs two workers) the workers share the session's
    LORAFIT_HOME (lorafit's caches are safe for several processes at once, as a user's two
    terminals need) and each has its own tracking store."""
    import tempfile

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        # one compute thread per worker (and per command it starts): two processes of two
        # OpenMP threads each on two cores spin against each other; a training that takes
        # 90 s alone took over 10 min so
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = "1"
    if worker and os.environ.get("LORAFIT_TEST_TMP"):
        tmp = Path(os.environ["LORAFIT_TEST_TMP"])  # made by the controller, removed by it
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / f'mlflow-{worker}.db'}"
        return
    config._lorafit_tmp = tmp = Path(tempfile.mkdtemp(prefix="lorafit-tests-"))
    os.environ["LORAFIT_TEST_TMP"] = str(tmp)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    home = tmp / "home"
    home.mkdir()
    if SEEDED_TOOLS.is_dir():
        (home / "tools").symlink_to(SEEDED_TOOLS, target_is_directory=True)
    os.environ["LORAFIT_HOME"] = str(home)


def pytest_unconfigure(config):
    import shutil

    tmp = getattr(config, "_lorafit_tmp", None)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


# The longest files first: `make test` hands whole files to two workers (--dist loadfile, so a
# module's fixtures run once), and a long file started last would end the suite alone. xdist
# queues two files per worker at the start, the first and the third to one worker: a short
# third keeps the next long file off the worker that has the longest (e2e, ~14 min of 19).
LONGEST_FIRST = (
    "test_e2e.py",
    "test_ui.py",
    "test_structure.py",
    "test_reliability.py",
    "test_outputs.py",
    "test_distributed.py",
    "test_offline.py",
    "test_resume.py",
    "test_installed.py",
    "test_notebook.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2 materialized as safetensors (once per cache)."""
    from lorafit.sources import resolve_model_dir

    return resolve_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from lorafit.model import load_tokenizer

    return load_tokenizer(embedded_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer random Llama with the real tokenizer: trains in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(
    *args: str,
    cwd: Path | None = None,
    env: dict | None = None,
    timeout: int = 900,
    stdin: str = "",
):
    """Run the real `lorafit` entry point in a subprocess (``stdin`` is typed into it)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lorafit", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )
