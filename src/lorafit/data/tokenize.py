"""Turn examples into token ids with the model's own chat template, loss on the answer only.

The answer keeps the template's end-of-turn token (for SmolLM2 ``<|im_end|>``, which is also
its pad token): the model must learn to stop. Anything the template adds after that token
(a newline) is dropped: it is never generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafit.data.formats import Example

IGNORE = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def trainable(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass
class TokenizeReport:
    rows: int = 0
    truncated: int = 0  # rows cut to max_length (some answer tokens lost)
    fully_masked: int = 0  # rows with no answer token left: dropped
    lengths: list[int] = field(default_factory=list)


def with_system(example: Example, system_prompt: str | None) -> list[dict[str, str]]:
    """Prompt turns, with ``system_prompt`` added when the example has no system turn."""
    turns = list(example.prompt)
    if system_prompt and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def _ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


def tokenize_example(
    tokenizer, example: Example, max_length: int, system_prompt: str | None = None
) -> tuple[Tokenized, bool]:
    """(tokenized example, was it truncated). Labels are IGNORE on every prompt token."""
    prompt = with_system(example, system_prompt)
    prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
    full_ids = _ids(tokenizer, [*prompt, {"role": "assistant", "content": example.answer}], False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(
            "the chat template renders the prompt differently with and without the answer; "
            "answer-only masking would be wrong for this model"
        )
    end_id = tokenizer.eos_token_id
    # keep up to and including the last end-of-turn token
    for cut in range(len(full_ids) - 1, len(prompt_ids) - 1, -1):
        if full_ids[cut] == end_id:
            full_ids = full_ids[: cut + 1]
            break
    labels = [IGNORE] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    truncated = len(full_ids) > max_length
    return Tokenized(full_ids[:max_length], labels[:max_length]), truncated


def tokenize_all(
    tokenizer, examples: list[Example], max_length: int, system_prompt: str | None = None
) -> tuple[list[Tokenized], TokenizeReport]:
    """Tokenize every example; drop (and count) those with no answer token left."""
    report = TokenizeReport()
    kept: list[Tokenized] = []
    for example in examples:
        tok, truncated = tokenize_example(tokenizer, example, max_length, system_prompt)
        report.rows += 1
        report.lengths.append(len(tok.input_ids))
        report.truncated += truncated
        if tok.trainable == 0:
            report.fully_masked += 1
            continue
        kept.append(tok)
    return kept, report
