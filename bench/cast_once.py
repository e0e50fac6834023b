"""Frozen weights cast to bf16 once per generation call (``lorafit.frozen_weights``) vs
autocast's cast at every generated token.

    .venv/bin/python bench/cast_once.py --model runs/demo-*/run [--prompts 96] [--rounds 2]

A tuned run (its adapter merged, as evaluation generates the tuned answers; peft froze the
base weights) answers ``--prompts`` of the demo's held-out questions under bf16 autocast, both
ways alternating ``--rounds`` times in one process; the answers must be identical. Only
meaningful on a CPU with native bf16 (AVX512-BF16 or AMX), where evaluation autocasts.

Measured on a 2-core Intel Xeon with AMX, a tuned demo run, 96 prompts, 2 rounds: 16.3 s vs
11.7 s (1.40x), identical answers. The base model as ``from_pretrained`` loads it gains nothing
(17.6 s vs 17.4 s): its weights require grad, and autocast keeps the casts of those itself.
Training gained nothing either (an earlier revision of this script: 20 demo steps, 45.1 s vs
47.4 s, identical losses: one cast per step is ~1% of it), so training does not use it.
"""

from __future__ import annotations

import argparse
import contextlib
import time

from lorafit import frozen_weights
from lorafit.config import load_config
from lorafit.data.generate import generate_pairs
from lorafit.data.glossary import load_glossary
from lorafit.inference import chat_prompt, generate, load_for_inference
from lorafit.model import cpu_has_bf16

CAST_ONCE = frozen_weights.weights_cast_once


def _autocast_casts(model):
    return contextlib.nullcontext()


WAYS = {"autocast casts": _autocast_casts, "cast once": CAST_ONCE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a tuned run directory")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not cpu_has_bf16():
        print("this CPU has no native bf16: evaluation runs fp32, nothing to compare")
        return
    loaded = load_for_inference(args.model, device="cpu")
    if loaded.has_adapter:
        loaded.model.merge_adapter()  # as evaluation generates the tuned answers
    demo = load_config("demo")
    _, evals = generate_pairs(
        load_glossary(demo.data.glossary),
        seed=demo.data.seed,
        kinds=demo.data.kinds,
        eval_kinds=demo.data.eval_kinds,
    )
    prompts = [
        chat_prompt(p.prompt, loaded.system_prompt, p.history) for p in evals[: args.prompts]
    ]
    seconds: dict[str, list[float]] = {name: [] for name in WAYS}
    answers = {}
    for _ in range(args.rounds):
        for name, way in WAYS.items():
            # generate() imports weights_cast_once from the module when it runs
            frozen_weights.weights_cast_once = way
            start = time.perf_counter()
            answers[name] = generate(loaded.model, loaded.tokenizer, prompts, precision="bf16")
            seconds[name].append(time.perf_counter() - start)
    frozen_weights.weights_cast_once = CAST_ONCE
    best = {name: min(s) for name, s in seconds.items()}
    for name, s in seconds.items():
        print(f"{name:15s} best {best[name]:6.1f} s  (all: {', '.join(f'{x:.1f}' for x in s)})")
    same = answers["autocast casts"] == answers["cast once"]
    ratio = best["autocast casts"] / best["cast once"]
    print(f"cast once: {ratio:.2f}x faster; identical answers: {same}")


if __name__ == "__main__":
    main()
