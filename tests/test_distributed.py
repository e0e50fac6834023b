"""Data-parallel training through torchrun (2 CPU processes, gloo), started by
`lorafit train --nproc 2`: it trains, the ranks agree, only rank 0 writes, and the result
matches a 1-process run with the same effective batch."""

import hashlib
import json

import pytest
from conftest import run_cli, write_jsonl

from lorafit.launch import strip_launcher_options, torchrun_command
from lorafit.rundir import read_json

ROWS = [
    {"prompt": f"What is term {i}?", "response": f"Term {i} is the answer number {i}."}
    for i in range(16)
]


def test_launcher_options_are_not_passed_to_the_workers():
    argv = ["train", "c.yaml", "--nproc", "2", "--nnodes=1", "--set", "train.lr=1e-3"]
    assert strip_launcher_options(argv) == ["train", "c.yaml", "--set", "train.lr=1e-3"]
    cmd = torchrun_command(argv, 2)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node=2"]
    assert "--standalone" in cmd and cmd[-5:-3] == ["lorafit", "train"]
    multi = torchrun_command(argv, 4, nnodes=2, rdzv_endpoint="head:29500")
    assert "--nnodes=2" in multi and "--rdzv-endpoint=head:29500" in multi


def _train(tmp_path, tiny_model_dir, out, batch, *extra):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    r = run_cli(
        "train",
        "--data",
        str(data),
        "--output",
        str(tmp_path / out),
        "--set",
        f"model.name={tiny_model_dir}",
        "--set",
        "train.max_steps=12",
        "--set",
        f"train.batch_size={batch}",
        "--set",
        "train.grad_accumulation=1",
        "--set",
        "train.lr=5e-2",
        "--set",
        "lora.r=4",
        *extra,
        # an empty cache, as on CI: both ranks need the replay answers at once (they once
        # raced on its temp file); one answers, the other waits and reuses them
        env={"LORAFIT_HOME": str(tmp_path / out / "home")},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp_path / out, r


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, tiny_model_dir):
    two, r = _train(tmp_path, tiny_model_dir, "two", 2, "--nproc", "2")
    assert r.stdout.count("done:") == 1  # rank 0 reports, once
    info = read_json(two / "run.json")
    assert info["status"] == "completed"
    assert info["world_size"] == 2 and info["effective_batch_size"] == 4
    dist = info["distributed"]
    assert dist["adapters_identical"] and len(dist["ranks"]) == 2
    assert dist["ranks"][0]["final_loss"] == dist["ranks"][1]["final_loss"]
    # the adapter rank 0 saved is the one every rank ended with
    from safetensors.torch import load_file

    saved = load_file(two / "adapter" / "adapter_model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(saved):
        digest.update(name.encode())
        digest.update(saved[name].float().numpy().tobytes())
    assert digest.hexdigest() == dist["ranks"][0]["adapter_sha256"]
    [cache] = (two / "home" / "replay").glob("*.jsonl")  # answered once, into one file
    assert cache.read_text().count("\n") > 0 and info["data"]["replay"] is not None
    losses = _losses(two)
    assert len(losses) == 12  # one metrics line per step: only rank 0 wrote

    one, _ = _train(tmp_path, tiny_model_dir, "one", 4)  # same effective batch, 1 process
    one_losses = _losses(one)
    assert losses[-1] < losses[0] * 0.8 and one_losses[-1] < one_losses[0] * 0.8
    # same data, same effective batch: the curves end close (sample order differs)
    assert abs(sum(losses[-3:]) - sum(one_losses[-3:])) / sum(one_losses[-3:]) < 0.25
