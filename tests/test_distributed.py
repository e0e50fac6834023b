"""Data-parallel training through torchrun (2 CPU processes, gloo), started by
`lorafit train --nproc 2`: it trains, the ranks agree, only rank 0 writes, and the result
matches a 1-process run with the same effective batch."""

import hashlib
import json

import pytest
from conftest import run_cli, write_jsonl

from lorafit.launch import strip_launcher_options, torchrun_command
from lorafit.rundir import read_json

# two-digit numbers: every row has the same number of tokens (see the ordered test)
ROWS = [
    {"prompt": f"What is term {i}?", "response": f"Term {i} is the answer number {i}."}
    for i in range(10, 26)
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
    [cache] = (two / "home" / "answers").glob("*.jsonl")  # answered once, into one file
    assert cache.read_text().count("\n") > 0 and info["data"]["replay"] is not None
    losses = _losses(two)
    assert len(losses) == 12  # one metrics line per step: only rank 0 wrote

    assert losses[-1] < losses[0] * 0.8


@pytest.mark.slow
def test_two_processes_take_the_same_steps_as_one(tmp_path, tiny_model_dir):
    """In file order (no shuffling), step s of 2 processes x 2 rows trains on the same 4 rows
    as step s of 1 process x 4 rows; the two paths compute the loss differently (DDP keeps
    TRL's loss, one process lorafit's answer-only loss, the same quantity), so every step's
    loss must agree to float rounding. (transformers averages the loss over the answer tokens
    of all ranks, average_tokens_across_devices; rows of one length keep even a per-rank
    average equal, so only the loss paths and the all-reduce are compared.)"""
    ordered = ("--set", "train.shuffle=false", "--set", "train.shared_prefix=false")
    ordered += ("--set", "train.precision=fp32")  # bf16 rounding differs with the batch shape
    two, _ = _train(tmp_path, tiny_model_dir, "two-ordered", 2, "--nproc", "2", *ordered)
    one, _ = _train(tmp_path, tiny_model_dir, "one-ordered", 4, *ordered)
    two_losses, one_losses = _losses(two), _losses(one)
    assert len(two_losses) == len(one_losses) == 12
    # fp32 sums in another order (the all-reduce) differ in the last bits, and this test's high
    # learning rate amplifies that late in training (measured: steps 1-9 within 0.1%, then
    # 0.2-4%); the first two epochs must agree to 0.1%
    assert two_losses[:8] == pytest.approx(one_losses[:8], rel=1e-3, abs=1e-4)
    assert two_losses[-1] < two_losses[0] * 0.8
