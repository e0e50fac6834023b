"""Attention of the shared-prefix pass in isolation: row by row vs one dense mask.

    .venv/bin/python bench/attention.py

SmolLM2-135M's shapes (9 query heads, 3 key/value heads, head dim 64), a 24-token shared
prefix and rows of 30-49 tokens, as in the demo. Both ways run one layer's attention forward
and backward, alternating in one process; the outputs must agree. The baseline is what
lorafit did before ``rows_attention``: SDPA over the whole sequence (the prefix once, then the
packed rows) with one mask that lets each token see the prefix and its own row.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from lorafit.loss import RowLayout, rows_attention

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


def compare(rows: int, repeats: int = 30) -> dict:
    lengths = torch.randint(30, 50, (rows,))
    total = int(lengths.sum())
    spans, start = [], 0
    for n in lengths.tolist():
        spans.append((start, start + PREFIX + n))
        start += PREFIX + n
    layout = RowLayout.of(spans, PREFIX, "cpu")
    mask = dense_mask(lengths)
    q = torch.randn(1, HEADS, PREFIX + total, DIM, requires_grad=True)
    k = torch.randn(1, KV_HEADS, PREFIX + total, DIM, requires_grad=True)
    v = torch.randn(1, KV_HEADS, PREFIX + total, DIM, requires_grad=True)
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


if __name__ == "__main__":
    torch.manual_seed(0)
    for rows in (8, 16):
        r = compare(rows)
        print(
            f"{r['rows']} rows ({r['tokens']} suffix tokens): dense mask {r['dense_mask_ms']:.1f} ms, "
            f"row by row {r['rows_ms']:.1f} ms per forward+backward ({r['speedup']:.2f}x)"
        )
