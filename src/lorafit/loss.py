"""The training loss, computed only where it counts.

A causal LM's head projects every position onto the vocabulary (49k entries for SmolLM2),
but only answer positions have labels. ``answer_only_loss`` runs the backbone, then the LM
head on the labelled positions alone: the same loss as the model's own, for fewer FLOPs and
far smaller logits. Measured on a 2-core CPU it beat both the model's own loss and TRL's
tiled fused head (bench/ has the numbers).

Rows of one packed batch usually open with the same tokens: the chat template's system
prompt and the start of the user turn, about a third of a short glossary question. With
``shared_prefix`` that prefix is kept once per batch instead of once per row: the backbone
sees ``prefix + every row's suffix`` as one sequence, and each suffix attends to the prefix's
keys and values and to its own row. Loss and gradients are the same as without sharing (a test
compares them), for fewer FLOPs. One pass, not a separate prefix pass feeding a cache: a
24-token pass multiplies every weight matrix for a handful of rows, at a fraction of the
matmul rate (measured: the single pass is ~10% faster). Not under gradient checkpointing: its
recompute runs outside the pass that switches attention to ``rows_attention`` (the trainer
turns sharing off there).

Attention is computed row by row (``rows_attention``): the prefix attends causally to itself;
the suffixes are gathered into a padded (rows, length) batch that attends to the prefix and
to its own row only. One dense mask over the whole packed sequence would spend its FLOPs on
row pairs that never see each other, and that cost grows with the square of the rows per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorafit.hooks import ROWS_KWARG, attention_implementation, register_attention

IGNORE = -100
MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a second backbone call
ROWS_ATTENTION = "lorafit_rows"


def _causal_lm(model):
    """The bare *ForCausalLM under PEFT / accelerate wrappers (LoRA layers are inside it)."""
    inner = model
    while True:
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif hasattr(inner, "module") and not hasattr(inner, "lm_head"):
            inner = inner.module
        else:
            return inner


@dataclass
class Teacher:
    """The base model's next-token distribution at some labelled positions of a packed batch
    (its top ``k`` tokens and their log-probabilities), to distil: each (1, length, ...)
    tensor is aligned with the batch's labels; ``mask`` marks the positions that have one."""

    ids: torch.Tensor  # (1, length, k) token ids
    logp: torch.Tensor  # (1, length, k) base log-probabilities
    mask: torch.Tensor  # (1, length) bool
    weight: float

    def take(self, index: torch.Tensor) -> Teacher:
        """The same positions as ``labels[index]`` (the shared-prefix pass keeps a subset)."""
        return Teacher(self.ids[:, index], self.logp[:, index], self.mask[:, index], self.weight)

    @classmethod
    def for_batch(cls, rows: dict, input_ids, position_ids, weight: float) -> Teacher | None:
        """The teacher of a packed batch (1, length) from ``rows`` ({row token ids:
        RowTeacher}); rows start where ``position_ids`` is 0. None when no row has one."""
        if not rows or position_ids is None or input_ids.shape[0] != 1:
            return None
        device = input_ids.device
        # the row keys are read on the host: one copy per step from a GPU, not one per row
        ids, positions = input_ids[0].tolist(), position_ids[0].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        found = [
            (start, rows[key])
            for start, end in zip(starts, starts[1:], strict=False)
            if (key := tuple(ids[start:end])) in rows
        ]
        if not found:
            return None
        k, length = found[0][1].ids.shape[1], len(ids)
        top = torch.zeros(1, length, k, dtype=torch.long)
        logp = torch.zeros(1, length, k)
        mask = torch.zeros(1, length, dtype=torch.bool)
        for start, row in found:
            at = row.positions + start
            top[0, at] = row.ids.long()
            logp[0, at] = row.logp.float()
            mask[0, at] = True
        return cls(top.to(device), logp.to(device), mask.to(device), weight)


@dataclass
class RowTeacher:
    """One row's base distributions: at each labelled position (index into the row's labels),
    the base model's top-k next tokens for that label and their log-probabilities."""

    positions: torch.Tensor  # (n,) long
    ids: torch.Tensor  # (n, k) int32
    logp: torch.Tensor  # (n, k) float16: small, and precise enough for a target


def _kl(teacher: Teacher, mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over the teacher's positions of KL(base || tuned) over the base's top-k tokens plus
    one bucket for the rest of the vocabulary: the forgetting a fine-tune causes, measured
    where it happens (0 while the adapter is still the identity)."""
    t_mask = teacher.mask[:, 1:][mask]
    if not bool(t_mask.any()):
        return logits.new_zeros(())
    ids = teacher.ids[:, 1:][mask][t_mask]
    base = teacher.logp[:, 1:][mask][t_mask].exp()
    tuned = torch.log_softmax(logits[t_mask], dim=-1).gather(1, ids)
    base = torch.cat([base, (1 - base.sum(-1, keepdim=True)).clamp_min(1e-8)], dim=-1)
    rest = torch.log((1 - tuned.exp().sum(-1, keepdim=True)).clamp_min(1e-8))
    tuned = torch.cat([tuned, rest], dim=-1)
    return (base * (torch.log(base) - tuned)).sum()


def _head_loss(lm, hidden, labels, num_items_in_batch, teacher=None) -> tuple[torch.Tensor, int]:
    targets = labels[:, 1:]
    mask = targets != IGNORE
    picked = hidden[:, :-1][mask]
    logits = lm.get_output_embeddings()(picked).float()
    total = F.cross_entropy(logits, targets[mask], reduction="sum")
    if teacher is not None and teacher.weight:
        total = total + teacher.weight * _kl(teacher, mask, logits)
    count = int(mask.sum())
    denom = num_items_in_batch if num_items_in_batch is not None else max(count, 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device).clamp(min=1)
    return total / denom, count


def shared_prefix_length(input_ids, labels, position_ids) -> tuple[int, list[tuple[int, int]]]:
    """(length of the prefix every packed row shares and may share, row spans).

    The prefix stops before the first labelled token of any row and leaves every row at least
    two tokens, so each row still predicts its own answer from its own positions.
    """
    if input_ids.shape[0] != 1 or position_ids is None:
        return 0, []
    pos = position_ids[0]
    starts = (pos == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return 0, []
    ends = starts[1:] + [pos.numel()]
    spans = list(zip(starts, ends, strict=True))
    ids, lab = input_ids[0], labels[0]
    limit = min(e - s for s, e in spans) - 2
    for s, e in spans:
        labelled = (lab[s:e] != IGNORE).nonzero()
        if labelled.numel():
            limit = min(limit, int(labelled[0]) - 1)
    if limit < MIN_SHARED_PREFIX:
        return 0, spans
    first = ids[: spans[0][1] - spans[0][0]][:limit]
    length = limit
    for s, _ in spans[1:]:
        differs = (ids[s : s + limit] != first).nonzero()
        if differs.numel():
            length = min(length, int(differs[0]))
    return (length if length >= MIN_SHARED_PREFIX else 0), spans


@dataclass
class RowLayout:
    """Where each row's suffix sits in the packed sequence, as a padded (rows, length) grid."""

    prefix: int  # shared tokens at the start of the sequence
    gather: torch.Tensor  # (rows, length): packed suffix index of each grid cell
    mask: torch.Tensor  # (rows, 1, length, prefix + length): what each cell may attend to
    cells: torch.Tensor  # (packed,): the grid cell (flat) of each packed suffix token

    @classmethod
    def of(cls, spans, prefix: int, device) -> RowLayout:
        lengths = torch.tensor([e - s - prefix for s, e in spans], device=device)
        width = int(lengths.max())
        starts = torch.cumsum(lengths, 0) - lengths
        cells = torch.arange(width, device=device)
        valid = cells[None, :] < lengths[:, None]
        gather = (starts[:, None] + cells[None, :]).clamp(max=int(lengths.sum()) - 1)
        causal = cells[None, :] <= cells[:, None]
        own = causal[None] & valid[:, None, :]
        seen = torch.ones(len(spans), width, prefix, dtype=torch.bool, device=device)
        mask = torch.cat([seen, own], dim=2)[:, None]
        return cls(prefix, gather, mask, valid.flatten().nonzero().squeeze(1))


# The grid is built and undone with index_select (backward: index_add) rather than advanced
# indexing (backward: index_put with accumulate), which took ~10% of a CPU training step.


def _to_grid(packed: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """(heads, packed, dim) -> (rows, heads, length, dim)."""
    rows, width = layout.gather.shape
    grid = packed.index_select(1, layout.gather.flatten())
    return grid.view(packed.shape[0], rows, width, packed.shape[-1]).transpose(0, 1)


def _from_grid(grid: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """(rows, heads, length, dim) -> (heads, packed, dim), packed order, padding dropped."""
    heads, dim = grid.shape[1], grid.shape[-1]
    return grid.transpose(0, 1).reshape(heads, -1, dim).index_select(1, layout.cells)


def _rows(states: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """(1, heads, prefix + packed, dim) -> (rows, heads, prefix + length, dim)."""
    rows, prefix = layout.gather.shape[0], layout.prefix
    shared = states[0, :, :prefix].unsqueeze(0).expand(rows, -1, -1, -1)
    return torch.cat([shared, _to_grid(states[0, :, prefix:], layout)], dim=2)


# scores of one layer's rows grid, (rows, heads, length, prefix + length) entries, up to which
# attend_rows multiplies them out under CPU bf16 autocast: ~6 bytes each are kept for backward
# (SDPA keeps none), so longer grids stay with SDPA
MATMUL_ATTENTION_MAX_SCORES = 4_000_000


def attend_rows(q, k, v, mask, dropout: float = 0.0, scaling: float | None = None):
    """Attention of the rows grid: (rows, heads, length, dim) queries, (rows, kv heads,
    prefix + length, dim) keys/values, a boolean mask (rows, 1, length, prefix + length).

    Under bf16 autocast on a CPU, torch's SDPA kernel is slow for these short rows: its
    backward took 31% of a demo training step, more than every matmul together. Two batched
    matmuls and a float32 softmax give the attention 2-2.5x faster there (bench/attention.py),
    as transformers' eager attention computes it in bf16: the scores are rounded to bf16
    before the softmax, where SDPA keeps them in float32. Scores kept in float32 cost a
    third of the gain and did not bring the gradients of a test model nearer to float32's
    (loss and answers of the demo were unchanged by the switch, see README). fp32 and GPUs
    keep SDPA, which is as fast or faster for them.
    """
    scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    if (
        q.device.type != "cpu"
        or not torch.is_autocast_enabled("cpu")
        or torch.get_autocast_dtype("cpu") != torch.bfloat16
        or dropout
        or scores > MATMUL_ATTENTION_MAX_SCORES
    ):
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=q.shape[1] != k.shape[1],
        )
    rows, heads, length, dim = q.shape
    groups = heads // k.shape[1]  # query heads per key/value head, as SDPA's enable_gqa
    scale = scaling if scaling is not None else dim**-0.5
    grouped = q.reshape(rows, k.shape[1], groups * length, dim)
    logits = (grouped @ k.transpose(-1, -2)).view(rows, k.shape[1], groups, length, -1) * scale
    logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
    return (weights.view(rows, k.shape[1], groups * length, -1) @ v).view(q.shape)


def rows_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA over the shared prefix, then over each packed row separately (module docstring).

    Registered with transformers' AttentionInterface and switched on only for the pass of
    ``_shared_prefix_loss``, which passes ``lorafit_rows`` (a RowLayout) down the backbone.
    """
    layout = kwargs[ROWS_KWARG]
    prefix = layout.prefix
    gqa = query.shape[1] != key.shape[1]
    opening = F.scaled_dot_product_attention(
        query[:, :, :prefix],
        key[:, :, :prefix],
        value[:, :, :prefix],
        dropout_p=dropout,
        is_causal=True,
        scale=scaling,
        enable_gqa=gqa,
    )
    q = _to_grid(query[0][:, prefix:], layout)  # (rows, heads, length, dim)
    out = attend_rows(q, _rows(key, layout), _rows(value, layout), layout.mask, dropout, scaling)
    packed = _from_grid(out, layout)  # (heads, packed, dim), packed order
    return torch.cat([opening[0], packed], dim=1).transpose(0, 1)[None].contiguous(), None


def answer_only_loss(
    model, inputs: dict, num_items_in_batch=None, shared_prefix: bool = False, teacher=None
) -> tuple[torch.Tensor, int]:
    """(loss, number of labelled tokens). Sum over answer tokens / ``num_items_in_batch``;
    with a ``teacher``, plus its weight times the KL term at the teacher's positions."""
    labels = inputs["labels"]
    lm = _causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    if shared_prefix and "attention_mask" not in inputs:
        prefix, spans = shared_prefix_length(
            inputs["input_ids"], labels, inputs.get("position_ids")
        )
        if prefix:
            return _shared_prefix_loss(
                lm, backbone, inputs, prefix, spans, num_items_in_batch, teacher
            )
    kwargs = {
        k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")
    }
    hidden = backbone(**kwargs, use_cache=False).last_hidden_state
    return _head_loss(lm, hidden, labels, num_items_in_batch, teacher)


def _shared_prefix_loss(lm, backbone, inputs, prefix, spans, num_items_in_batch, teacher=None):
    ids, labels, pos = inputs["input_ids"][0], inputs["labels"][0], inputs["position_ids"][0]
    # the prefix once (from the first row), then every row without it
    keep = torch.cat(
        [torch.arange(prefix, device=ids.device)]
        + [torch.arange(s + prefix, e, device=ids.device) for s, e in spans]
    )
    register_attention(ROWS_ATTENTION, rows_attention)
    layout = RowLayout.of(spans, prefix, ids.device)
    # Whatever kernel the model uses, this pass attends with rows_attention; the grid mask is
    # 4-D, so transformers passes it through untouched.
    with attention_implementation(lm.config, ROWS_ATTENTION):
        hidden = backbone(
            input_ids=ids[keep][None],
            position_ids=pos[keep][None],
            attention_mask=layout.mask,
            use_cache=False,
            **{ROWS_KWARG: layout},
        ).last_hidden_state
    suffixes = keep[prefix:]
    if teacher is not None:
        teacher = teacher.take(suffixes)
    return _head_loss(lm, hidden[:, prefix:], labels[suffixes][None], num_items_in_batch, teacher)
