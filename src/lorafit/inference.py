"""Load a model for answering (run dir, merged dir, or any model source) and generate.

lorafit ask runs/demo "What is ATP?"
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lorafit.config import ModelSection
from lorafit.data.formats import Example
from lorafit.data.tokenize import with_system
from lorafit.model import best_device, load_model, load_tokenizer
from lorafit.rundir import RunDir, read_json
from lorafit.sources import BaseModel, base_of_run

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: object
    tokenizer: object
    system_prompt: str | None = None
    has_adapter: bool = False


def run_base(run: RunDir) -> tuple[BaseModel, str | None]:
    """(the exact base model, the system prompt) a run was trained with."""
    return base_of_run(run.info()["base_model"]), run.config().data.system_prompt


def load_for_inference(target: str | Path, device: str | None = None) -> Loaded:
    """A run dir (base + adapter), a merged/HF dir, a .gguf, embedded: or Hub id."""
    from peft import PeftModel

    from lorafit.rundir import MERGE_INFO
    from lorafit.sources import resolve_model_dir

    device = device or best_device()
    path = Path(target)
    if RunDir.holds_run(path):
        run = RunDir.existing(path)
        base, system_prompt = run_base(run)
        model = PeftModel.from_pretrained(
            load_model(base.section(), base.dir, device), run.adapter_dir
        )
        model.eval()
        tokenizer = load_tokenizer(run.adapter_dir)
        return Loaded(model, tokenizer, system_prompt, has_adapter=True)
    model_dir = resolve_model_dir(str(target))
    model = load_model(ModelSection(name=str(model_dir)), model_dir, device)
    model.eval()
    merge_info = model_dir / MERGE_INFO  # a lorafit-merged model: same system turn
    system_prompt = read_json(merge_info).get("system_prompt") if merge_info.is_file() else None
    return Loaded(model, load_tokenizer(model_dir), system_prompt)


def _prompt_text(tokenizer, prompt: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def generate(
    model,
    tokenizer,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int = 64,
    batch_size: int = 48,
    progress=None,
    with_ids: bool = False,
    precision: str = "fp32",
) -> list[tuple]:
    """Greedy answers for chat prompts: [(text, stopped_by_itself)], in input order
    (``with_ids``: [(text, stopped, generated token ids up to and with the end token)]).

    Prompts are batched by length (left padding) so little compute goes to padding, and
    answers that have ended leave their batch (:func:`greedy_ids`).
    ``precision`` bf16/fp16 autocasts a float32 model (see :func:`autocast_for`).
    """
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))
    results: list[tuple[str, bool]] = [("", False)] * len(prompts)
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    end_ids = {tokenizer.eos_token_id}
    device = next(model.parameters()).device
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            texts = [_prompt_text(tokenizer, prompts[i]) for i in idx]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.no_grad(), autocast_for(model, precision):
                new = greedy_ids(model, tokenizer, enc, max_new_tokens)
            for row, i in zip(new, idx, strict=True):
                stopped = any(t in end_ids for t in row)
                ids = row
                if stopped:
                    end = next(k for k, t in enumerate(row) if t in end_ids)
                    row, ids = row[:end], row[: end + 1]
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                results[i] = (text, stopped, ids) if with_ids else (text, stopped)
            if progress is not None:
                progress(len(idx))
    finally:
        tokenizer.padding_side = pad_side
    return results


# generation settings a model may ship that change greedy answers: ``greedy_ids`` leaves a
# model that sets any of them to transformers' own generate, which applies them
_SHAPING = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "min_length",
    "min_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "encoder_repetition_penalty",
)
_NEUTRAL = (None, 0, 1.0, [], {})


def greedy_ids(model, tokenizer, enc: dict, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of a left-padded batch: each row's new token ids, through its
    end token when it stops.

    transformers' generate keeps an ended answer in the batch until the longest one ends, so
    on a CPU a batch of short answers pays for its longest: 58% of the slots went to ended
    rows in the demo's tuned eval. Here an ended row leaves the batch and its KV cache
    (``Cache.batch_select_indices``): the same tokens as generate's, 1.36x faster on the
    demo's 444 held-out questions (bench/generation.py --compare loop). Models whose
    generation config shapes greedy answers (a repetition penalty, ...) and encoder-decoder
    models go to generate itself.
    """
    import inspect

    import torch
    from transformers import DynamicCache

    end = tokenizer.eos_token_id
    settings = getattr(model, "generation_config", None)
    config = model.config
    shaped = any(getattr(settings, name, None) not in _NEUTRAL for name in _SHAPING)
    if shaped or getattr(config, "is_encoder_decoder", False):
        return transformers_greedy_ids(model, tokenizer, enc, max_new_tokens)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows = torch.arange(ids.shape[0])
    new: list[list[int]] = [[] for _ in range(ids.shape[0])]
    if max_new_tokens <= 0:
        return new
    cache = DynamicCache(config=config)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    keep_last = {}
    if "logits_to_keep" in inspect.signature(_forward_of(model)).parameters:
        keep_last = {"logits_to_keep": 1}  # a prompt's logits over 49k tokens are not needed
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        **keep_last,
    ).logits[:, -1]
    position = positions[:, -1:]
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        for row, t in zip(rows.tolist(), token.tolist(), strict=True):
            new[row].append(t)
        going = (token != end).nonzero().squeeze(1)
        if step == max_new_tokens - 1 or going.numel() == 0:
            break
        if going.numel() < token.numel():
            cache.batch_select_indices(going)
            rows, mask, token, position = rows[going], mask[going], token[going], position[going]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position + 1
        logits = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position,
            cache=cache,
            use_cache=True,
        ).logits[:, -1]
    return new


def transformers_greedy_ids(model, tokenizer, enc: dict, max_new_tokens: int) -> list[list[int]]:
    """``greedy_ids`` through transformers' generate: every row stays to the longest's end."""
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return out[:, enc["input_ids"].shape[1] :].tolist()


def _forward_of(model):
    """The forward whose signature says what the model accepts (PEFT's wrapper takes **kwargs)."""
    from lorafit.loss import _causal_lm

    return _causal_lm(model).forward


def is_quantized(model) -> bool:
    """Whether the (possibly PEFT-wrapped) model holds quantized weights (any transformers
    quantizer; lorafit loads bitsandbytes 4/8-bit): adapters cannot be merged into them, and
    autocast does not apply."""
    from lorafit.loss import _causal_lm

    lm = _causal_lm(model)
    return getattr(lm, "hf_quantizer", None) is not None or any(
        getattr(lm, f"is_loaded_in_{bits}bit", False) for bits in (4, 8)
    )


def applied_precision(model, precision: str) -> str:
    """The precision answers are really computed in when ``precision`` (fp32/bf16/fp16) is
    asked: bf16/fp16 autocast applies to float32 weights only; weights held in half precision
    or quantized compute in their own dtype ("fp32" is returned for them: no autocast)."""
    import torch

    from lorafit.loss import _causal_lm

    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision {precision!r}: expected fp32, bf16 or fp16 (resolve 'auto')")
    full = any(p.dtype == torch.float32 for p in _causal_lm(model).parameters())
    return precision if full and not is_quantized(model) else "fp32"


def autocast_for(model, precision: str):
    """Autocast to ``precision`` (bf16/fp16) where :func:`applied_precision` says it applies;
    a no-op otherwise."""
    import contextlib

    import torch

    applied = applied_precision(model, precision)
    if applied == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if applied == "bf16" else torch.float16
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def chat_prompt(question: str, system_prompt: str | None, history=None) -> list[dict[str, str]]:
    example = Example(prompt=(*(history or ()), {"role": "user", "content": question}), answer="")
    return with_system(example, system_prompt)


def stream_answer(loaded: Loaded, messages: list[dict[str, str]], max_new_tokens: int = 256) -> str:
    """Generate one answer, printing tokens as they come; return the full text."""
    import torch
    from transformers import TextStreamer

    tok = loaded.tokenizer
    text = _prompt_text(tok, messages)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    enc = {k: v.to(next(loaded.model.parameters()).device) for k, v in enc.items()}
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = loaded.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
