"""--overwrite never deletes what lorafit did not write, and replacing an output never leaves
neither the old nor the new one: each case a careless user hit (merge into `.`, into the home
directory, into the run's own parent, train into a project folder with a config.yaml, a second
train --overwrite on a directory still training) is refused and loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, write_jsonl

from lorafit.errors import LorafitError
from lorafit.paths import check_replaceable, recover_replaced, replace_dir

ROWS = [{"prompt": f"What is item {i}?", "response": f"Item {i} is thing {i}."} for i in range(8)]


def _tiny(tiny_model_dir, *extra):
    sets = {
        "model.name": tiny_model_dir,
        "train.max_steps": 2,
        "train.batch_size": 4,
        "lora.r": 4,
        "data.replay": 0,
        "tracking.enabled": "false",
    }
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")] + list(extra)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("outputs")
    data = write_jsonl(tmp / "train.jsonl", ROWS)
    r = run_cli(
        "train", "--data", str(data), "--output", str(tmp / "runs" / "run"), *_tiny(tiny_model_dir)
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "runs" / "run"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_merge_refuses_folders_it_did_not_write(finished_run, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    before = _files(project)
    home = tmp_path / "home"
    (home / "documents").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cases = [
        (str(project), elsewhere, "not written by lorafit"),  # an unrelated folder
        (".", project, "working directory"),
        (str(home), elsewhere, "home directory"),
        (str(finished_run.parent), elsewhere, "holds"),  # the run's own parent
        (str(finished_run), elsewhere, "holds"),
        ("/", elsewhere, "root directory"),
    ]
    for output, cwd, why in cases:
        r = run_cli(
            "merge",
            str(finished_run),
            "--output",
            output,
            "--overwrite",
            cwd=cwd,
            env={"HOME": str(home)},
        )
        assert r.returncode == 2 and why in r.stderr, (output, r.stderr[-1500:])
        assert "Traceback" not in r.stderr
    assert _files(project) == before and (home / "documents").is_dir()
    assert (finished_run / "adapter").is_dir()


def test_merge_replaces_its_own_output_whole(finished_run, tmp_path):
    out = tmp_path / "merged"
    r = run_cli("merge", str(finished_run), "--output", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    (out / "stale-from-an-old-merge.txt").write_text("old")
    r = run_cli("merge", str(finished_run), "--output", str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = run_cli("merge", str(finished_run), "--output", str(out), "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "lorafit_merge.json").is_file() and not (
        out / "stale-from-an-old-merge.txt"
    ).exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".merged")]


def test_train_overwrite_refuses_what_is_not_a_run(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("my: project\n")
    for output, cwd, why in (
        (str(project), tmp_path, "not written by lorafit"),
        (".", project, "working directory"),
    ):
        r = run_cli(
            "train",
            "--data",
            str(data),
            "--output",
            output,
            "--overwrite",
            *_tiny(tiny_model_dir),
            cwd=cwd,
        )
        assert r.returncode == 2 and why in r.stderr, r.stderr[-1500:]
    assert (project / "config.yaml").read_text() == "my: project\n"
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml"]


def test_a_second_overwrite_of_a_run_still_training_deletes_nothing(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS * 8)
    run = tmp_path / "run"
    slow = _tiny(tiny_model_dir, "--set", "train.max_steps=400", "--set", "train.save_steps=5")
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorafit",
            "train",
            "--data",
            str(data),
            "--output",
            str(run),
            *slow,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(run.glob("checkpoints/checkpoint-*")):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        second = run_cli(
            "train",
            "--data",
            str(data),
            "--output",
            str(run),
            "--overwrite",
            *_tiny(tiny_model_dir),
        )
        assert second.returncode == 2 and "another lorafit process" in second.stderr
        assert first.poll() is None  # still training, its directory untouched
        assert json.loads((run / "run.json").read_text())["status"] == "running"
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)


def test_train_overwrite_keeps_the_old_run_until_the_new_one_is_complete(tmp_path, tiny_model_dir):
    """Killed halfway, an --overwrite run leaves the old run as it was; completed, it replaces
    it whole."""
    data = write_jsonl(tmp_path / "train.jsonl", ROWS * 8)
    run = tmp_path / "run"
    r = run_cli("train", "--data", str(data), "--output", str(run), *_tiny(tiny_model_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    old = _files(run / "adapter")
    slow = _tiny(tiny_model_dir, "--set", "train.max_steps=400", "--set", "train.save_steps=5")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorafit",
            "train",
            "--data",
            str(data),
            "--output",
            str(run),
            "--overwrite",
            "--set",
            "train.seed=7",
            *slow,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staging = tmp_path / ".run.overwrite"
    deadline = time.monotonic() + 300
    while not list(staging.glob("checkpoints/checkpoint-*")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _files(run / "adapter") == old  # the crash left the old run whole
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    r = run_cli(
        "train",
        "--data",
        str(data),
        "--output",
        str(run),
        "--overwrite",
        "--set",
        "train.seed=7",
        *_tiny(tiny_model_dir),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert _files(run / "adapter") != old and not staging.exists()


def test_replacing_a_folder_leaves_the_old_or_the_new_one(tmp_path, monkeypatch):
    import lorafit.paths as paths

    target, new = tmp_path / "out", tmp_path / ".out.new"
    for folder, text in ((target, "old"), (new, "new")):
        folder.mkdir()
        (folder / "marker.json").write_text(text)
    replace_dir(new, target)  # the atomic exchange
    assert (target / "marker.json").read_text() == "new" and not new.exists()

    # where there is no atomic exchange: a crash between the two renames is put right
    monkeypatch.setattr(paths, "_exchange", lambda a, b: False)
    new.mkdir()
    (new / "marker.json").write_text("newer")
    real_rename = Path.rename

    def crash_on_second(self, dest):
        if self == new:
            raise KeyboardInterrupt  # the process dies here
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, target)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not target.exists()  # between the renames...
    recover_replaced(target)  # ...which the next check_replaceable does first
    assert (target / "marker.json").read_text() == "new"
    check_replaceable(target, "marker.json", "--output")


def test_data_generate_refuses_to_overwrite_without_being_told(tmp_path):
    glossary = "lorafit:glossaries/aviation.yaml"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.jsonl").write_text('{"prompt": "my own", "response": "data"}\n')
    for extra in ((), ("--overwrite",)):
        r = run_cli("data", "generate", glossary, "--out", str(mine), *extra)
        assert r.returncode == 2, r.stderr
    assert "my own" in (mine / "train.jsonl").read_text()
    out = tmp_path / "generated"
    assert run_cli("data", "generate", glossary, "--out", str(out)).returncode == 0
    r = run_cli("data", "generate", glossary, "--out", str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = run_cli("data", "generate", glossary, "--out", str(out), "--overwrite", "--seed", "3")
    assert r.returncode == 0, r.stderr


def test_export_never_replaces_a_file_it_did_not_write(tmp_path, tiny_model_dir):
    from lorafit.export import export_gguf

    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"my own model")
    with pytest.raises(LorafitError, match="not written by lorafit export"):
        export_gguf(tiny_model_dir, mine, overwrite=True)
    with pytest.raises(LorafitError, match="already exists"):
        export_gguf(tiny_model_dir, mine)
    with pytest.raises(LorafitError, match="holds|which this command reads"):
        export_gguf(mine, mine, overwrite=True)  # the source itself
    assert mine.read_bytes() == b"my own model"
