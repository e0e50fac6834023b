"""Chat-template formatting and answer-only labels, on the real tokenizer."""

from lorafit.data.formats import Example
from lorafit.data.tokenize import IGNORE, tokenize_all, tokenize_example


def _ex(q="What is ATP?", a="ATP stands for Available to Promise."):
    return Example(prompt=({"role": "user", "content": q},), answer=a)


def test_labels_cover_exactly_the_answer_and_end_token(tokenizer):
    tok, truncated = tokenize_example(tokenizer, _ex(), max_length=256)
    assert not truncated
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is ATP?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    n = len(prompt_ids)
    assert tok.input_ids[:n] == list(prompt_ids)
    assert tok.labels[:n] == [IGNORE] * n
    assert tok.labels[n:] == tok.input_ids[n:]
    assert tok.input_ids[-1] == tokenizer.eos_token_id  # the model learns to stop
    assert tokenizer.decode(tok.input_ids[n:]) == "ATP stands for Available to Promise.<|im_end|>"
    # the template's default system prompt is what chat uses too
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(tok.input_ids)


def test_custom_system_prompt(tokenizer):
    tok, _ = tokenize_example(tokenizer, _ex(), 256, system_prompt="You are an aviation expert.")
    text = tokenizer.decode(tok.input_ids)
    assert "aviation expert" in text and "SmolLM" not in text


def test_truncation_is_counted_and_fully_masked_rows_dropped(tokenizer):
    long = _ex(a="word " * 300)
    rows, report = tokenize_all(tokenizer, [_ex(), long], max_length=64)
    assert report.truncated == 1 and report.fully_masked == 0 and len(rows) == 2
    rows, report = tokenize_all(tokenizer, [_ex(), _ex(q="q " * 100)], max_length=40)
    assert report.fully_masked == 1 and len(rows) == 1
