"""Batched greedy generation: transformers' default growing KV cache (what lorafit uses) vs a
preallocated (static) cache, on the embedded model, alternating in one run (machines drift).

Measured on a 2-core AMD EPYC (96 held-out prompts, 64 new tokens, best of 2): 29.6 s vs 29.7 s,
identical answers. The profile's cache concatenations (19% of generation) are traded for
attention over the whole preallocated length, so lorafit keeps the default.

    .venv/bin/python bench/generation.py [--prompts 96] [--rounds 2]

Prints seconds per configuration, the ratio, and whether the answers are identical.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lorafit.config import DEFAULT_MODEL
from lorafit.data.generate import generate_pairs
from lorafit.data.glossary import load_glossary
from lorafit.inference import chat_prompt, generate, load_for_inference

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    loaded = load_for_inference(DEFAULT_MODEL, device="cpu")
    _, evals = generate_pairs(load_glossary(ROOT / "data" / "glossaries" / "aviation.yaml"))
    prompts = [chat_prompt(p.prompt, loaded.system_prompt) for p in evals[: args.prompts]]
    model, plain_generate = loaded.model, loaded.model.generate

    def static_cache(**kwargs):  # preallocated cache, no automatic torch.compile
        return plain_generate(**kwargs, cache_implementation="static", disable_compile=True)

    seconds: dict[str, list[float]] = {"dynamic (lorafit)": [], "static": []}
    answers = {}
    for _ in range(args.rounds):
        for name in seconds:
            model.generate = static_cache if name == "static" else plain_generate
            start = time.perf_counter()
            answers[name] = generate(model, loaded.tokenizer, prompts, args.max_new_tokens)
            seconds[name].append(time.perf_counter() - start)
    model.generate = plain_generate
    best = {name: min(s) for name, s in seconds.items()}
    for name, s in seconds.items():
        print(f"{name:18s} best {best[name]:6.1f} s  (all: {', '.join(f'{x:.1f}' for x in s)})")
    dynamic, static = best.values()
    same = answers["static"] == answers["dynamic (lorafit)"]
    print(f"static cache: {dynamic / static:.2f}x faster; identical answers: {same}")


if __name__ == "__main__":
    main()
