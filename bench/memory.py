"""Memory planner vs measurement: predicted and measured peak RSS of real training runs.

    .venv/bin/python bench/memory.py            # writes bench/memory.json and bench/memory.md

Each configuration trains the embedded model for 3 optimizer steps in its own `lorafit train`
process; its peak RSS (getrusage of the child) is compared with `lorafit estimate`'s
prediction for the same config and data. Rows are built to fill data.max_length so the worst
case the estimator plans for is what actually runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "memory-bench"
# (quantization, batch size, max_length)
CONFIGS = [
    ("none", 4, 96),
    ("none", 8, 256),
    ("4bit", 4, 128),
    ("8bit", 2, 256),
    ("none", 2, 512),
]


def rows(length: int) -> list[dict]:
    """Questions and answers of about length/2 tokens each (so rows fill max_length)."""
    words = max(4, length // 2)  # ~1 token per word: the prompt takes ~half, the answer the rest
    return [
        {
            "prompt": f"Question {i}: " + "alpha " * (words - 20),
            "response": f"Answer {i}: " + "beta " * words,
        }
        for i in range(24)
    ]


def measure(quant: str, batch: int, length: int) -> dict:
    from lorafit.config import load_config
    from lorafit.estimate import estimate, load_shape, longest_row

    name = f"{quant}-b{batch}-l{length}"
    data = WORK / f"{name}.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(length)))
    sets = {
        "data.train": str(data),
        "data.max_length": length,
        "data.replay": 0,
        "train.batch_size": batch,
        "train.grad_accumulation": 1,
        "train.max_steps": 3,
        "train.save_steps": 1000,
        "model.quantization": quant,
        "tracking.enabled": "false",
        "output_dir": str(WORK / name),
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    shape, dtype = load_shape(cfg)
    predicted = estimate(cfg, shape, "cpu", dtype, longest_row(cfg)).cpu_peak_bytes
    cmd = [sys.executable, "-m", "lorafit", "train", "--overwrite"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    # a fresh wrapper per run: its RUSAGE_CHILDREN peak is this training process alone
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    measured = int(done.stdout.strip()) * 1024
    return {
        "config": name,
        "predicted_bytes": predicted,
        "measured_bytes": measured,
        "error": predicted / measured - 1,
    }


def main() -> None:
    results = []
    for quant, batch, length in CONFIGS:
        r = measure(quant, batch, length)
        print(json.dumps(r), flush=True)
        results.append(r)
    (ROOT / "bench" / "memory.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["| config | predicted | measured | error |", "|---|---|---|---|"]
    lines += [
        f"| {r['config']} | {r['predicted_bytes'] / 2**30:.2f} GiB | "
        f"{r['measured_bytes'] / 2**30:.2f} GiB | {r['error']:+.0%} |"
        for r in results
    ]
    (ROOT / "bench" / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
