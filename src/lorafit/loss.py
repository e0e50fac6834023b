"""The training loss, computed only where it counts.

A causal LM's head projects every position onto the vocabulary (49k entries for SmolLM2),
but only answer positions have labels. ``answer_only_loss`` runs the backbone, then the LM
head on the labelled positions alone: the same loss as the model's own, for fewer FLOPs and
far smaller logits. Measured on a 2-core CPU it beat both the model's own loss and TRL's
tiled fused head (bench/ has the numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


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


def answer_only_loss(model, inputs: dict, num_items_in_batch=None) -> tuple[torch.Tensor, int]:
    """(loss, number of labelled tokens). Sum over answer tokens / ``num_items_in_batch``."""
    labels = inputs["labels"]
    lm = _causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    kwargs = {
        k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")
    }
    hidden = backbone(**kwargs, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    mask = targets != IGNORE
    picked = hidden[:, :-1][mask]
    logits = lm.get_output_embeddings()(picked).float()
    total = F.cross_entropy(logits, targets[mask], reduction="sum")
    count = int(mask.sum())
    denom = num_items_in_batch if num_items_in_batch is not None else max(count, 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device).clamp(min=1)
    return total / denom, count
