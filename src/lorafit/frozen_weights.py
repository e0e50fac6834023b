"""Frozen linear weights cast to bf16 once per generation call, not once per token.

Under CPU bf16 autocast every ``F.linear`` casts its fp32 weight to bf16, and autocast keeps
the cast (for the rest of its block) only for weights that require grad. A model whose base
weights are frozen, as the tuned model in evaluation is (peft freezes them; a plain
``from_pretrained`` model's weights require grad and are autocast's to keep), has the whole
model read in fp32 and written in bf16 at every generated token. Inside
``weights_cast_once(model)`` each frozen fp32 ``nn.Linear`` keeps its bf16 cast and recasts
only if its weight changes (a new tensor, or an in-place update through the parameter). Autocast
rounds the same way (``Tensor.to``) and runs the same kernel on the same bf16 operands: outputs
and gradients are bit-identical. The copies (2 bytes per frozen weight) are dropped on exit.
Outside CPU bf16 autocast, or for a weight that trains, the layer's own forward runs (hooks run
either way: they wrap ``forward``).

Measured (bench/cast_once.py, 2-core Intel Xeon with AMX): a tuned demo run answering 96
held-out questions, 16.3 s -> 11.7 s (1.40x), identical answers. Training gains nothing (one
cast per step is ~1% of a step: 45.1 s vs 47.4 s for 20 steps, noise), so training does not
use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_CAST = "_lorafit_bf16_cast"


@contextlib.contextmanager
def weights_cast_once(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, each frozen fp32 linear layer of ``model`` casts its weight once."""
    layers = [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear and "forward" not in m.__dict__ and _frozen_fp32(m)
    ]
    for layer in layers:
        layer.forward = _cast_once_forward(layer)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop(_CAST, None)


def _frozen_fp32(layer: torch.nn.Linear) -> bool:
    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    return all(p.dtype == torch.float32 and not p.requires_grad for p in params)


def _cast_once_forward(layer: torch.nn.Linear):
    plain = type(layer).forward.__get__(layer)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type != "cpu"
            or not torch.is_autocast_enabled("cpu")
            or torch.get_autocast_dtype("cpu") != torch.bfloat16
            or not _frozen_fp32(layer)
        ):
            return plain(x)
        weight, bias = _bf16(layer)
        return F.linear(x.to(torch.bfloat16), weight, bias)

    return forward


def _bf16(layer: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = layer.weight, layer.bias
    key = (weight.data_ptr(), weight._version)
    key += (None,) if bias is None else (bias.data_ptr(), bias._version)
    cached = layer.__dict__.get(_CAST)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cast = (weight.to(torch.bfloat16), None if bias is None else bias.to(torch.bfloat16))
        cached = layer.__dict__[_CAST] = (key, cast)
    return cached[1]
