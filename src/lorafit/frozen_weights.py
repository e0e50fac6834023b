"""Frozen linear weights cast to bf16 once per generation call, not once per token.

Under CPU bf16 autocast every ``F.linear`` casts its fp32 weight to bf16, and autocast keeps
the cast (for the rest of its block) only for weights that require grad. A model whose base
weights are frozen, as the tuned model in evaluation is (peft freezes them; a plain
``from_pretrained`` model's weights require grad and are autocast's to keep), has the whole
model read in fp32 and written in bf16 at every generated token. Inside
``weights_cast_once(model)`` each frozen fp32 ``nn.Linear`` keeps its bf16 cast and recasts
only if its weight is replaced or updated in place through the parameter. Autocast
rounds the same way (``Tensor.to``) and runs the same kernel on the same bf16 operands: outputs
and gradients are bit-identical. The copies (2 bytes per frozen weight) are dropped on exit.
Outside CPU bf16 autocast, or for a weight that trains, the layer's own forward runs (hooks run
either way: they wrap ``forward``).

The base model's answers in evaluation (the same frozen weights, adapter disabled) take this
path too, so cached and shipped base answers rest on it being bit-identical
(tests/test_frozen_weights.py). Measured with ``.venv/bin/python bench/cast_once.py --model
RUN`` on a 2-core Intel Xeon with AMX: a tuned demo run answering 96 held-out questions,
16.3 s -> 11.7 s (1.40x), identical answers (not yet measured on an AVX512-BF16 CPU).
Training gains nothing (an earlier revision of that script, 20 demo steps: 45.1 s with
autocast's casts, 47.4 s cast once, identical losses; one cast per step is ~1% of it), so
training does not use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

_CAST = "_lorafit_bf16_cast"


@contextlib.contextmanager
def weights_cast_once(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, each frozen fp32 linear layer of ``model`` casts its weight once.

    Weights must not change inside the block other than through the parameter itself: an
    update through ``.data`` (peft's merge_adapter and unmerge_adapter) keeps its version count
    and would keep the old cast; evaluation merges between ``generate`` calls, never inside
    one. One thread at a time per model: a second block on the same model patches nothing and
    runs autocast's way once the first ends.
    """
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
    # the tensors themselves (an address alone may be reused by a new tensor) and their
    # versions, which in-place updates through the parameter bump
    state = (weight, weight._version, bias, None if bias is None else bias._version)
    cached = layer.__dict__.get(_CAST)
    if cached is not None and _same(cached[0], state):
        return cached[1]
    with torch.no_grad():
        cast = (weight.to(torch.bfloat16), None if bias is None else bias.to(torch.bfloat16))
    if "forward" in layer.__dict__:  # the block has not ended meanwhile (another thread)
        layer.__dict__[_CAST] = (state, cast)
    return cast


def _same(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] == b[1] and a[2] is b[2] and a[3] == b[3]
