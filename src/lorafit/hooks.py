"""Every place lorafit relies on a library's internals, in one module.

Each hook names the version it was written against (pinned in pyproject.toml), why it is
needed, and the test that fails if an upgrade changes what it relies on
(tests/test_hooks.py). Everything else in lorafit uses the libraries' public APIs.
"""

from __future__ import annotations

from contextlib import contextmanager

# transformers 5.24.0 --------------------------------------------------------------------
# The shared-prefix pass (lorafit.loss) swaps the attention kernel of one forward pass for
# ``rows_attention`` and hands it the row layout through an extra keyword argument, which
# transformers' Llama-style models pass down to the attention function untouched
# (``**kwargs`` through the decoder layers). Test: test_hooks.py::test_extra_attention_kwarg_
# reaches_the_kernel.
ROWS_KWARG = "lorafit_rows"


def register_attention(name: str, function) -> None:
    """Make ``function`` selectable as an attention implementation (public API, idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, function)


@contextmanager
def attention_implementation(config, name: str):
    """Use attention ``name`` for the forward passes inside the block.

    transformers 5.24: the public ``PreTrainedModel.set_attn_implementation`` re-validates the
    name and walks every submodule on each call (twice per training step here), so the
    private ``config._attn_implementation`` that it sets in the end is set directly; the
    attention layers read it at call time. Test: test_hooks.py::test_attention_switch_...
    """
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


# peft 0.21.2 ----------------------------------------------------------------------------
def register_lora_layer(lora_config, base_class, lora_class) -> None:
    """Have peft build ``lora_class`` (lorafit.lora_layer.FusedLoraLinear) for every
    ``base_class`` layer it adapts.

    peft 0.21: ``LoraConfig._register_custom_module`` is its documented-as-experimental way
    to plug a custom LoRA layer in; the saved adapter stays plain LoRA. Test:
    test_hooks.py::test_peft_builds_the_fused_layer.
    """
    lora_config._register_custom_module({base_class: lora_class})
