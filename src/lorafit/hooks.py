"""Every place lorafit relies on a library's internals, in one module.

Each hook names the version it was written against (pinned in pyproject.toml), why it is
needed, and the test that fails if an upgrade changes what it relies on
(tests/test_hooks.py). Everything else in lorafit uses the libraries' public APIs.
"""

from __future__ import annotations

from contextlib import contextmanager


# huggingface_hub 2.4.0 / trl 1.16.0 ---------------------------------------------------------
# TRL's trainers send a usage ping to the Hub (trainer name, model id) from a background thread
# every time one is built. lorafit does not phone home (a model id can name a private repo or
# path), and on a machine without a network that thread's name lookup once crashed the process
# (SIGSEGV in getaddrinfo, in CI). huggingface_hub reads HF_HUB_DISABLE_TELEMETRY when it is
# imported, so the variable alone is too late once it is: its constant is set too. A user who
# sets HF_HUB_DISABLE_TELEMETRY=0 keeps the ping. Test: test_hooks.py::test_training_sends_no_
# telemetry.
def no_telemetry() -> None:
    import os

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if os.environ["HF_HUB_DISABLE_TELEMETRY"].strip().lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import constants

        constants.HF_HUB_DISABLE_TELEMETRY = True


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


@contextmanager
def quiet_gguf_loading():
    """Load GGUF files without transformers' per-file "Converting and de-quantizing GGUF
    tensors" bar (a plain tqdm in transformers 5.24's modeling_gguf_pytorch_utils, which no
    verbosity setting reaches); lorafit logs one line instead. Test: test_hooks.py."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    before = gguf_utils.tqdm
    gguf_utils.tqdm = lambda items, **_: items
    try:
        yield
    finally:
        gguf_utils.tqdm = before


# transformers 5.24.0: `transformers serve`'s OpenAI chat handler ------------------------
def openai_chat_handler(model_dir, device: str = "auto"):
    """transformers' chat-completions handler for one pinned model, and a function that gives
    the messages exactly as the handler hands them to the chat template (for counting tokens).

    transformers.cli.serving is the code behind `transformers serve`, not a documented
    library API; lorafit.serve uses ``handle_request`` and the message conversion only.
    Tests: test_serve.py (every live-server test goes through it), test_hooks.py.
    """
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.utils import GenerationState, Modality

    manager = ModelManager(device=device, dtype="auto", force_model=str(model_dir))
    state = GenerationState(continuous_batching=False, compile=False)
    handler = ChatCompletionHandler(
        model_manager=manager, generation_state=state, chat_template_kwargs={}
    )

    def template_messages(messages: list[dict]) -> list[dict]:
        return handler.get_processor_inputs_from_messages(messages, Modality.LLM)

    return handler, template_messages
