"""lorafit works installed, not only in its checkout: the wheel carries every file a command
reads, and the commands run from an empty directory after `pip install lorafit-*.whl`.

The wheel goes into a fresh virtual environment; the heavy dependencies (torch, transformers,
...) come from the project venv's site-packages through a .pth line, which puts that folder on
sys.path without running its own .pth files (so the editable checkout install is not seen)."""

import hashlib
import json
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

SHIPPED = (
    "lorafit/resources/presets/demo.yaml",
    "lorafit/resources/presets/tinyllama-qlora-4gb.yaml",
    "lorafit/resources/glossaries/aviation.yaml",
    "lorafit/resources/replay/general.jsonl",
    "lorafit/resources/probes/general.jsonl",
    "lorafit/resources/gguf-converter.txt",
    "lorafit/resources/model_configs/TinyLlama--TinyLlama-1.1B-Chat-v1.0.json",
    "lorafit/resources/llama_cpp/answer.mjs",
    "lorafit/resources/llama_cpp/package-lock.json",
    "lorafit/resources/ui/templates/knowledge.html",
    "lorafit/resources/ui/static/app.js",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """lorafit's wheel, built offline from a copy of the sources (the checkout stays clean)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp / "dist"), str(source)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("lorafit-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its bin folder."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (purelib,) = venv.glob("lib/python3*/site-packages")
    (purelib / "project-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"]
        + ["--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return venv / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str, timeout: int = 600):
    return subprocess.run(
        [str(bin_dir / "lorafit"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_the_wheel_carries_what_commands_read(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in SHIPPED if name not in names]
    assert not missing, f"not in the wheel: {missing}"
    answers = ROOT / "src" / "lorafit" / "resources" / "answers"
    shipped_answers = [f"lorafit/resources/answers/{f.name}" for f in answers.glob("*.jsonl")]
    assert shipped_answers and set(shipped_answers) <= names  # the base model's, for the demo


def test_the_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    where = subprocess.run(
        [str(installed / "python"), "-c", "import lorafit; print(lorafit.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr
    assert str(installed.parent) in where.stdout and str(ROOT) not in where.stdout


def test_commands_run_from_an_empty_directory(installed, tmp_path, tiny_model_dir):
    work = tmp_path / "empty"
    work.mkdir()
    r = _run(installed, work, "doctor")
    assert r.returncode == 0, r.stdout + r.stderr

    r = _run(installed, work, "init", "project")
    assert r.returncode == 0, r.stderr
    assert (work / "project" / "lorafit.yaml").is_file()
    assert "terms:" in (work / "project" / "glossary.yaml").read_text()

    r = _run(installed, work, "data", "generate", "lorafit:glossaries/aviation.yaml", "--out", "d")
    assert r.returncode == 0, r.stderr
    assert len((work / "d" / "train.jsonl").read_text().splitlines()) > 500

    tiny = ["--set", f"model.name={tiny_model_dir}", "--set", "tracking.enabled=false"]
    r = _run(
        installed,
        work,
        "train",
        "--data",
        "d/train.jsonl",
        "--output",
        "run",
        *tiny,
        *("--set", "train.max_steps=2", "--set", "data.replay=0.2"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    replay = json.loads((work / "run" / "run.json").read_text())["data"]["replay"]
    assert replay["prompts"] == "lorafit:replay/general.jsonl"  # read from the package:
    shipped = ROOT / "src" / "lorafit" / "resources" / "replay" / "general.jsonl"
    assert replay["prompts_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()

    r = _run(installed, work, "eval", "run", "--data", "d/eval.jsonl", "--limit", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((work / "run" / "eval" / "metrics.json").read_text())
    assert "general_accuracy" in metrics["tuned"]  # the shipped probes were found
    assert len((work / "run" / "eval" / "probe_predictions.jsonl").read_text().splitlines()) > 50


def test_the_demo_runs_from_an_empty_directory(installed, tmp_path, tiny_model_dir):
    """The whole demo (its preset and glossary from the package) on the tiny model."""
    work = tmp_path / "empty"
    work.mkdir()
    sets = {
        "model.name": tiny_model_dir,
        "tracking.enabled": "false",
        "train.max_steps": 2,
        "eval.limit": 4,
        "eval.max_new_tokens": 4,
    }
    args = [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]
    r = _run(installed, work, "demo", "--output", "demo", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "demo" / "merged" / "lorafit_merge.json").is_file()
    timings = json.loads((work / "demo" / "timings.json").read_text())
    assert {"data", "train", "eval", "merge"} <= set(timings)
