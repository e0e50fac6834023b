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
    import contextlib

    import torch

    from lorafit.frozen_weights import weights_cast_once

    order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])))
    results: list[tuple[str, bool]] = [("", False)] * len(prompts)
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    end_ids = {tokenizer.eos_token_id}
    device = next(model.parameters()).device
    cast_once = contextlib.nullcontext()
    if device.type == "cpu" and applied_precision(model, precision) == "bf16":
        cast_once = weights_cast_once(model)  # frozen weights cast once, not once per token
    try:
        with cast_once:
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


# generation-config settings that change what generate(do_sample=False) answers, with the
# values that leave it alone: a model that ships another value goes to transformers' generate,
# which applies it (beam, contrastive and DoLa searches are caught by the generation mode)
_SHAPING = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None, []),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),  # 0 is a token
    "forced_eos_token_id": (None,),
    "sequence_bias": (None, {}),
    "guidance_scale": (None, 1.0),
    "exponential_decay_length_penalty": (None,),
    "watermarking_config": (None,),
    "cache_implementation": (None, "dynamic"),
    "stop_strings": (None, [], ""),
    "token_healing": (None, False),
}


def _own_loop_fits(lm, cache) -> bool:
    """Whether ``greedy_ids``' loop answers ``lm`` as transformers' generate would: greedy
    search, no setting that shapes it, transformers' own model code with the default input
    preparation (Phi-3's longrope and multimodal models override it), and a cache whose layers
    are all plain or sliding-window key/value layers (linear-attention and hybrid layers keep
    states that leaving rows would not take with them)."""
    import copy

    from transformers import GenerationConfig
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    from transformers.generation import GenerationMixin
    from transformers.generation.configuration_utils import GenerationMode

    settings = copy.deepcopy(getattr(lm, "generation_config", None) or GenerationConfig())
    settings.do_sample = False
    return (
        settings.get_generation_mode() == GenerationMode.GREEDY_SEARCH
        and all(getattr(settings, name, None) in ok for name, ok in _SHAPING.items())
        and not getattr(lm.config, "is_encoder_decoder", False)
        and not lm.is_custom_code()
        and type(lm).prepare_inputs_for_generation is GenerationMixin.prepare_inputs_for_generation
        and bool(cache.layers)
        and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)
    )


def greedy_ids(model, tokenizer, enc: dict, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of a left-padded batch: each row's new token ids, through its
    end token when it stops.

    transformers' generate keeps an ended answer in the batch until the longest one ends, so
    on a CPU a batch of short answers pays for its longest: 58% of the slots went to ended
    rows in the demo's tuned eval. Here an ended row leaves the batch and its KV cache
    (``Cache.batch_select_indices``): the same tokens as generate's, 1.36x faster on the
    demo's 444 held-out questions (bench/generation.py --compare loop). A model the loop does
    not fit (``_own_loop_fits``) goes to generate itself.
    """
    import inspect

    import torch
    from transformers import DynamicCache

    from lorafit.loss import _causal_lm

    lm = _causal_lm(model)
    cache = DynamicCache(config=lm.config)
    if not _own_loop_fits(lm, cache):
        return transformers_greedy_ids(model, tokenizer, enc, max_new_tokens)
    end = tokenizer.eos_token_id
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows = list(range(ids.shape[0]))  # the batch's rows still answering, as input rows
    new: list[list[int]] = [[] for _ in rows]
    if max_new_tokens <= 0:
        return new
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    keep_last = {}
    if "logits_to_keep" in inspect.signature(lm.forward).parameters:
        keep_last = {"logits_to_keep": 1}  # a prompt's logits over the vocabulary are not needed
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            **keep_last,
        )
        position = positions[:, -1:]
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            tokens = token.tolist()
            for row, t in zip(rows, tokens, strict=True):
                new[row].append(t)
            going = [i for i, t in enumerate(tokens) if t != end]
            if step == max_new_tokens - 1 or not going:
                break
            cache = out.cache if getattr(out, "cache", None) is not None else cache
            if len(going) < len(tokens):
                # a host index: it selects from tensors on any device (layers spread on GPUs)
                keep = torch.tensor(going)
                cache.batch_select_indices(keep)
                rows = [rows[i] for i in going]
                mask, token, position = mask[keep], token[keep], position[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            position = position + 1
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=position,
                cache=cache,
                use_cache=True,
            )
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
