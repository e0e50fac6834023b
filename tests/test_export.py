"""GGUF export pieces that need no conversion: the Ollama Modelfile is verified against the
model's own chat template (the full round trip runs in test_e2e)."""

from lorafit.modelfile import CHAT_FORMATS, _render, chat_format_for, modelfile_text


def test_chat_template_is_recognised_and_its_default_system_prompt_kept(tokenizer):
    fmt, default_system = chat_format_for(tokenizer)
    assert fmt is not None and fmt.name == "chatml"
    assert default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    # the Go template's Python twin renders exactly what the Jinja template renders
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is ATP?"},
    ]
    assert _render(fmt, messages) == tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


def test_modelfile_carries_template_system_prompt_and_stop(tokenizer):
    text = modelfile_text("m.gguf", tokenizer, "You answer aviation questions.")
    assert text.splitlines()[2] == "FROM ./m.gguf"
    assert 'SYSTEM """You answer aviation questions."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text
    assert CHAT_FORMATS[0].go_template in text


def test_unknown_template_falls_back_to_the_gguf_template(tokenizer):
    class Odd:
        bos_token = None
        eos_token = "</end>"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return "|".join(m["content"] for m in messages)

    text = modelfile_text("m.gguf", Odd(), None)
    assert 'TEMPLATE """' not in text
    assert "tokenizer.chat_template" in text and 'PARAMETER stop "</end>"' in text
