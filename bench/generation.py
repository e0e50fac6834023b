"""Batched greedy generation on the embedded model, two configurations alternating in one run
(machines drift):

- ``--compare precision`` (default): float32 vs bf16 autocast (``eval.precision``). Measured on
  a 2-core AMD EPYC with AVX512-BF16, on a tuned demo run (``--model runs/demo-*/run --prompts
  444 --rounds 1``: the 204 held-out "what is X?" prompts this script builds): 52.9 s vs 31.5 s
  (1.68x), 204 of 204 answers identical. The same calls on the demo's whole held-out set (444
  questions of every kind, a scratch script): 127 s vs 63 s, 439 of 444 identical.
- ``--compare cache``: transformers' default growing KV cache (what lorafit uses) vs a
  preallocated (static) cache. Measured on the same kind of machine (96 held-out prompts, 64
  new tokens, best of 2): 29.6 s vs 29.7 s, identical answers. The profile's cache
  concatenations (19% of generation) are traded for attention over the whole preallocated
  length, so lorafit keeps the default.

    .venv/bin/python bench/generation.py [--compare precision|cache] [--prompts 96] [--rounds 2]
        [--model RUN_OR_MODEL]

Prints seconds per configuration, the ratio, and how many answers are identical.
"""

from __future__ import annotations

import argparse
import time

from lorafit.config import DEFAULT_MODEL
from lorafit.data.generate import generate_pairs
from lorafit.data.glossary import load_glossary
from lorafit.inference import chat_prompt, generate, load_for_inference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=("precision", "cache"), default="precision")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a run dir, merged model or id")
    args = parser.parse_args()

    loaded = load_for_inference(args.model, device="cpu")
    _, evals = generate_pairs(load_glossary("lorafit:glossaries/aviation.yaml"))
    prompts = [chat_prompt(p.prompt, loaded.system_prompt) for p in evals[: args.prompts]]
    model, plain_generate = loaded.model, loaded.model.generate
    if loaded.has_adapter:
        model.merge_adapter()  # as evaluation generates the tuned answers

    def static_cache(**kwargs):  # preallocated cache, no automatic torch.compile
        return plain_generate(**kwargs, cache_implementation="static", disable_compile=True)

    if args.compare == "cache":
        names = {"dynamic (lorafit)": ("fp32", plain_generate), "static": ("fp32", static_cache)}
    else:
        names = {"fp32": ("fp32", plain_generate), "bf16 autocast": ("bf16", plain_generate)}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    answers = {}
    for _ in range(args.rounds):
        for name, (precision, how) in names.items():
            model.generate = how
            start = time.perf_counter()
            answers[name] = generate(
                model, loaded.tokenizer, prompts, args.max_new_tokens, precision=precision
            )
            seconds[name].append(time.perf_counter() - start)
    model.generate = plain_generate
    best = {name: min(s) for name, s in seconds.items()}
    for name, s in seconds.items():
        print(f"{name:18s} best {best[name]:6.1f} s  (all: {', '.join(f'{x:.1f}' for x in s)})")
    (first, base), (second, other) = best.items()
    same = sum(a == b for a, b in zip(answers[first], answers[second], strict=True))
    print(
        f"{second}: {base / other:.2f}x faster than {first}; identical answers: {same}/{len(prompts)}"
    )


if __name__ == "__main__":
    main()
