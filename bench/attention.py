"""Attention of the shared-prefix pass in isolation: row by row vs one dense mask, and (on a
CPU with native bf16) SDPA vs multiplied out under bf16 autocast.

    .venv/bin/python bench/attention.py

SmolLM2-135M's shapes (9 query heads, 3 key/value heads, head dim 64), a 24-token shared
prefix and rows of 30-49 tokens, as in the demo. Both ways run one layer's attention forward
and backward, alternating in one process; the outputs must agree. The baseline is what
lorafit did before ``rows_attention``: SDPA over the whole sequence (the prefix once, then the
packed rows) with one mask that lets each token see the prefix and its own row.

Under bf16 autocast (training's precision on a CPU with AVX512-BF16 or AMX), torch's SDPA
kernel was the slowest part of a demo training step: its backward alone took 31% of the step
in a profile (more than all matmuls). ``attend_rows`` multiplies the rows grid's attention out
there instead. Measured on a 2-core AMD EPYC with AVX512-BF16, one layer forward+backward,
rows of 30-100 suffix tokens: 8 rows 13.0 ms vs 5.6 ms (2.32x), 16 rows 24.9 ms vs 10.0 ms
(2.48x); on a 2-core Intel Xeon with AMX, 8 rows 16.4 ms vs 8.9 ms (1.85x), 16 rows 31.4 ms
vs 16.5 ms (1.90x). Six profiled demo training steps: 14.1 s of CPU time with SDPA, 9.3 s multiplied out,
8.7 s once the grid was also built with index_select instead of advanced indexing (whose
backward, an accumulating index_put, had taken ~10% of a step). Short training runs alternating
the two (16 demo steps each, noisy on a shared machine): 363-491 tokens/s with SDPA, 455-709
multiplied out (5 of 6 pairs faster).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from lorafit import loss
from lorafit.loss import RowLayout, rows_attention
from lorafit.model import cpu_has_bf16

HEADS, KV_HEADS, DIM, PREFIX = 9, 3, 64, 24


def dense_mask(lengths: torch.Tensor) -> torch.Tensor:
    """(1, 1, prefix + packed, prefix + packed): the prefix is causal; rows see it and themselves."""
    row = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    idx = torch.arange(row.numel())
    own = (row[:, None] == row[None, :]) & (idx[None, :] <= idx[:, None])
    suffix = torch.cat([torch.ones(row.numel(), PREFIX, dtype=torch.bool), own], 1)
    causal = torch.ones(PREFIX, PREFIX, dtype=torch.bool).tril()
    prefix = torch.cat([causal, torch.zeros(PREFIX, row.numel(), dtype=torch.bool)], 1)
    return torch.cat([prefix, suffix], 0)[None, None]


def packed_layer(rows: int, shortest: int, longest: int):
    """Row lengths, their RowLayout and one layer's packed q, k, v (prefix + rows)."""
    lengths = torch.randint(shortest, longest, (rows,))
    total = int(lengths.sum())
    spans, start = [], 0
    for n in lengths.tolist():
        spans.append((start, start + PREFIX + n))
        start += PREFIX + n
    layout = RowLayout.of(spans, PREFIX, "cpu")
    q = torch.randn(1, HEADS, PREFIX + total, DIM, requires_grad=True)
    k = torch.randn(1, KV_HEADS, PREFIX + total, DIM, requires_grad=True)
    v = torch.randn(1, KV_HEADS, PREFIX + total, DIM, requires_grad=True)
    return lengths, layout, q, k, v


def compare(rows: int, repeats: int = 30) -> dict:
    lengths, layout, q, k, v = packed_layer(rows, 30, 50)
    total = int(lengths.sum())
    mask = dense_mask(lengths)
    module = SimpleNamespace()

    def dense():
        groups = HEADS // KV_HEADS  # what transformers' SDPA path does with a mask
        kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask).transpose(1, 2)

    def by_rows():
        return rows_attention(module, q, k, v, layout.mask, lorafit_rows=layout)[0]

    assert torch.allclose(dense(), by_rows(), atol=1e-5)
    times = {"dense_mask_ms": 0.0, "rows_ms": 0.0}
    for _ in range(repeats):
        for name, fn in (("dense_mask_ms", dense), ("rows_ms", by_rows)):
            start = time.perf_counter()
            fn().sum().backward()
            times[name] += (time.perf_counter() - start) * 1000 / repeats
    return {
        "rows": rows,
        "tokens": total,
        **times,
        "speedup": times["dense_mask_ms"] / times["rows_ms"],
    }


def compare_bf16(rows: int, repeats: int = 20) -> dict:
    """rows_attention under CPU bf16 autocast: SDPA vs attend_rows' matmuls (best of rounds)."""
    lengths, layout, q, k, v = packed_layer(rows, 30, 100)
    total = int(lengths.sum())
    budget = loss.MATMUL_ATTENTION_MAX_SCORES
    times = {"sdpa_ms": [], "matmul_ms": []}
    outs = {}
    for _ in range(repeats):
        for name, scores in (("sdpa_ms", 0), ("matmul_ms", budget)):
            loss.MATMUL_ATTENTION_MAX_SCORES = scores
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = rows_attention(None, q, k, v, layout.mask, lorafit_rows=layout)[0]
            out.float().sum().backward()
            times[name].append((time.perf_counter() - start) * 1000)
            outs[name] = out.detach().float()
    loss.MATMUL_ATTENTION_MAX_SCORES = budget
    assert torch.allclose(outs["sdpa_ms"], outs["matmul_ms"], atol=0.05)
    best = {name: min(t) for name, t in times.items()}
    return {"rows": rows, "tokens": total, **best, "speedup": best["sdpa_ms"] / best["matmul_ms"]}


if __name__ == "__main__":
    torch.manual_seed(0)
    for rows in (8, 16):
        r = compare(rows)
        print(
            f"{r['rows']} rows ({r['tokens']} suffix tokens): dense mask {r['dense_mask_ms']:.1f} ms, "
            f"row by row {r['rows_ms']:.1f} ms per forward+backward ({r['speedup']:.2f}x)"
        )
    if cpu_has_bf16():
        for rows in (8, 16):
            r = compare_bf16(rows)
            print(
                f"bf16, {r['rows']} rows ({r['tokens']} suffix tokens): SDPA {r['sdpa_ms']:.1f} ms, "
                f"multiplied out {r['matmul_ms']:.1f} ms per forward+backward ({r['speedup']:.2f}x)"
            )
    else:
        print("no native bf16 on this CPU: training runs fp32, where SDPA is kept")
