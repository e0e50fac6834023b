"""Batched greedy generation on the embedded model, two configurations alternating in one run
(machines drift):

- ``--compare precision`` (default): float32 vs bf16 autocast (``eval.precision``). Measured on
  a 2-core AMD EPYC with AVX512-BF16, on a tuned demo run (``--model runs/demo-*/run --prompts
  444 --rounds 1``, when this script built 204 "what is X?" prompts; it now builds the demo's
  held-out questions of every kind): 52.9 s vs 31.5 s (1.68x), 204 of 204 answers identical. The same calls on the demo's whole held-out set (444
  questions of every kind, a scratch script): 127 s vs 63 s, 439 of 444 identical.
- ``--compare loop`` : transformers' generate, where an ended answer stays in its batch until
  the longest one ends, vs lorafit's ``greedy_ids``, where it leaves the batch and its KV cache.
  Measured on the same kind of machine, bf16, on a tuned demo run (``--compare loop --model
  runs/demo-*/run --prompts 444 --rounds 2``: the demo's 444 held-out questions of every kind):
  71.8 s vs 52.6 s (1.36x), 444 of 444 answers identical.
- ``--compare cache``: transformers' generate with its default growing KV cache (what lorafit
  used then) vs a preallocated (static) cache. Measured on the same kind of machine (96
  held-out prompts, 64 new tokens, best of 2): 29.6 s vs 29.7 s, identical answers. The profile's cache
  concatenations (19% of generation) are traded for attention over the whole preallocated
  length, so lorafit keeps the default.

    .venv/bin/python bench/generation.py [--compare precision|loop|cache] [--prompts 96]
        [--rounds 2] [--model RUN_OR_MODEL]

Prints seconds per configuration, the ratio, and how many answers are identical.
"""

from __future__ import annotations

import argparse
import time

from lorafit import inference
from lorafit.config import DEFAULT_MODEL, load_config
from lorafit.data.generate import generate_pairs
from lorafit.data.glossary import load_glossary
from lorafit.inference import chat_prompt, generate, load_for_inference
from lorafit.model import resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=("precision", "loop", "cache"), default="precision")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a run dir, merged model or id")
    args = parser.parse_args()

    loaded = load_for_inference(args.model, device="cpu")
    demo = load_config("demo")  # the demo's held-out questions, of every kind
    _, evals = generate_pairs(
        load_glossary(demo.data.glossary),
        seed=demo.data.seed,
        kinds=demo.data.kinds,
        eval_kinds=demo.data.eval_kinds,
    )
    prompts = [
        chat_prompt(p.prompt, loaded.system_prompt, p.history) for p in evals[: args.prompts]
    ]
    model, plain_generate = loaded.model, loaded.model.generate
    if loaded.has_adapter:
        model.merge_adapter()  # as evaluation generates the tuned answers
    ours, theirs = inference.greedy_ids, inference.transformers_greedy_ids

    def static_cache(**kwargs):  # preallocated cache, no automatic torch.compile
        return plain_generate(**kwargs, cache_implementation="static", disable_compile=True)

    # name: (precision, model.generate, the batch loop generate uses)
    if args.compare == "cache":
        names = {
            "dynamic": ("fp32", plain_generate, theirs),
            "static": ("fp32", static_cache, theirs),
        }
    elif args.compare == "loop":
        precision = resolve_precision("auto", "cpu")  # as evaluation on this machine
        names = {
            "transformers": (precision, plain_generate, theirs),
            "lorafit": (precision, plain_generate, ours),
        }
    else:
        names = {
            "fp32": ("fp32", plain_generate, ours),
            "bf16 autocast": ("bf16", plain_generate, ours),
        }
    seconds: dict[str, list[float]] = {name: [] for name in names}
    answers = {}
    for _ in range(args.rounds):
        for name, (precision, how, loop) in names.items():
            model.generate, inference.greedy_ids = how, loop
            start = time.perf_counter()
            answers[name] = generate(
                model, loaded.tokenizer, prompts, args.max_new_tokens, precision=precision
            )
            seconds[name].append(time.perf_counter() - start)
    model.generate, inference.greedy_ids = plain_generate, ours
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
