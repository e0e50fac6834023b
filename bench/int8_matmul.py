"""Would an int8 path for the frozen base weights speed up fp32 training? fbgemm's dynamic
int8 linear (weights per-channel int8, activations quantized per call) against fp32
``F.linear`` at the demo step's shapes, alternating in one process.

    .venv/bin/python bench/int8_matmul.py [--tokens 1000] [--repeats 30]

Measured 2026-12-08 on a 2-core AMD EPYC (Zen 3, AVX2, no native bf16), 1000 tokens: 1.54-1.64x
faster, 1.5-1.8% relative error in the output. Matmuls are ~60% of an fp32 step, so at most
~1.25x a step; not built (README, "Fewer tokens for the same answers").
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

# (out, in) of SmolLM2-135M's linear layers: q/o, k/v, gate/up, down
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))


def seconds(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1000, help="rows x tokens of one step")
    parser.add_argument("--repeats", type=int, default=30)
    a = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*quantize_per")  # the API torch deprecates
    total_fp32 = total_int8 = 0.0
    for out_features, in_features in SHAPES:
        w = torch.randn(out_features, in_features) * 0.02
        x = torch.randn(a.tokens, in_features)
        scales = w.abs().amax(1) / 127
        zeros = torch.zeros(out_features, dtype=torch.long)
        qw = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        fp32 = seconds(lambda: F.linear(x, w), a.repeats)  # noqa: B023 (called at once)
        int8 = seconds(lambda: torch.ops.quantized.linear_dynamic(x, packed), a.repeats)  # noqa: B023
        exact, approx = F.linear(x, w), torch.ops.quantized.linear_dynamic(x, packed)
        error = ((exact - approx).norm() / exact.norm()).item()
        print(
            f"{out_features}x{in_features}: fp32 {fp32 * 1e3:.2f} ms, int8 {int8 * 1e3:.2f} ms, "
            f"{fp32 / int8:.2f}x, relative error {error:.4f}"
        )
        total_fp32, total_int8 = total_fp32 + fp32, total_int8 + int8
    print(f"all shapes: {total_fp32 / total_int8:.2f}x (threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
