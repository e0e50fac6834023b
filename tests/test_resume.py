"""A real training subprocess killed with SIGKILL resumes from its last checkpoint and ends
with the loss curve of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, write_jsonl

from lorafit.rundir import read_json

pytestmark = pytest.mark.slow

ROWS = [{"prompt": f"What is item {i}?", "response": f"Item {i} is thing {i}."} for i in range(16)]


def _args(tiny_model_dir, data, out):
    sets = {
        "model.name": tiny_model_dir,
        "train.max_steps": 60,
        "train.save_steps": 10,
        "train.lr": 5e-2,
        "train.batch_size": 4,
        "train.grad_accumulation": 1,
        "lora.r": 4,
        "lora.alpha": 8,
    }
    cmd = [sys.executable, "-m", "lorafit", "train", "--data", str(data), "--output", str(out)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def _loss_by_step(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]  # a resumed run re-logs steps after its checkpoint
    return out


def test_kill_9_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    full = tmp_path / "full"
    subprocess.run(_args(tiny_model_dir, data, full), cwd=ROOT, check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _args(tiny_model_dir, data, killed),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "checkpoint-20").is_dir():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_json(killed / "run.json")["status"] == "running"
    assert not (killed / "adapter").exists()

    # without --resume the directory is protected
    again = subprocess.run(
        _args(tiny_model_dir, data, killed), cwd=ROOT, capture_output=True, text=True
    )
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = subprocess.run(
        _args(tiny_model_dir, data, killed) + ["--resume"], cwd=ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_json(killed / "run.json")["status"] == "completed"
    a, b = _loss_by_step(full), _loss_by_step(killed)
    assert sorted(a) == sorted(b) == list(range(1, 61))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-4), step


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    run = tmp_path / "interrupted"
    cmd = _args(tiny_model_dir, data, run)
    cmd[cmd.index("train.save_steps=10")] = "train.save_steps=1000"  # no periodic checkpoint
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while (
        not (run / "metrics.jsonl").is_file()
        or len((run / "metrics.jsonl").read_text().splitlines()) < 5
    ):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    assert list((run / "checkpoints").glob("checkpoint-*"))
    assert read_json(run / "run.json")["status"] == "interrupted"
