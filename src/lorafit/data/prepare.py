"""Training data as the trainer sees it: tokenized rows, small sets repeated, replay mixed in.

    data = load_training_data(config, tokenizer, world_size)   # read, validate, tokenize
    data.add_replay(config, model, tokenizer, base)            # the base model's own answers

Examples are formatted with the model's own chat template and the loss is on the answer (plus
its end-of-turn token) only (lorafit.data.tokenize).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lorafit.config import Config, TrainSection
from lorafit.data.formats import read_dataset
from lorafit.data.tokenize import Tokenized, tokenize_all
from lorafit.errors import LorafitError
from lorafit.model import resolve_precision
from lorafit.rundir import file_sha256
from lorafit.shipped import REPLAY_PROMPTS, resolve

log = logging.getLogger(__name__)


TEACHER_TOP_K = 64  # base tokens kept per position: nearly all of a small model's mass


@dataclass
class TrainingData:
    """Rows to train on and to compute the eval loss on, and what run.json says of them;
    ``teachers``: for each replay row (by its token ids), the base model's top next tokens at
    each answer position, which ``data.replay_kl`` distils."""

    train: list[Tokenized]
    eval: list[Tokenized] | None
    info: dict[str, Any] = field(default_factory=dict)  # {"train", "eval", "replay"}
    teachers: dict[tuple[int, ...], Any] = field(default_factory=dict)  # -> loss.RowTeacher

    def add_replay(
        self, config: Config, model, tokenizer, base_record: dict | None, world_size: int = 1
    ) -> None:
        """Mix in the base model's answers to general prompts (``data.replay`` of the mix),
        with its next-token distributions on them when ``data.replay_kl`` asks
        (``base_record``: run.json's base_model, which keys the answers' cache; None: no cache)."""
        rows, info = replay_rows(config, model, tokenizer, base_record, len(self.train))
        self.train = self.train + rows
        self.info["replay"] = info
        if rows and config.data.replay_kl and world_size > 1:
            # several processes train through TRL's own loss, which has no KL term: computing
            # the base distributions would cost a forward per replay row for nothing
            info["kl_weight"], info["kl_rows"] = 0.0, 0
            log.warning(
                "data.replay_kl applies to one-process training only; with %d processes the "
                "replay rows train on the base model's answers alone",
                world_size,
            )
        elif rows and config.data.replay_kl:
            self.teachers = base_distributions(model, rows, precision=config.train.precision)
            info["kl_weight"], info["kl_rows"] = config.data.replay_kl, len(self.teachers)


def base_distributions(
    model, rows: list[Tokenized], k: int = TEACHER_TOP_K, precision: str = "fp32", batch: int = 16
) -> dict:
    """{row token ids: RowTeacher} from the base model (before any adapter exists): each
    distinct row once, ``batch`` rows of similar length per forward (right padding leaves the
    real positions as they are), the vocabulary head only where a label is predicted, in the
    ``precision`` training computes in (train.precision, 'auto' resolved here: so that the KL
    term starts at 0)."""
    import torch

    from lorafit.loss import RowTeacher, _causal_lm

    distinct: dict[tuple[int, ...], list[int]] = {}
    for row in rows:
        at = [p for p, label in enumerate(row.labels) if p and label != -100]
        if at:
            distinct.setdefault(tuple(row.input_ids), at)
    keys = sorted(distinct, key=len)
    lm = _causal_lm(model)
    backbone = getattr(lm, lm.base_model_prefix)
    device = next(model.parameters()).device
    precision = resolve_precision(precision, str(device))
    out: dict[tuple[int, ...], RowTeacher] = {}
    was_training = model.training
    model.eval()
    # training autocasts whatever the weights (quantized ones too): so do the targets
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=half, enabled=half is not None)
    with torch.no_grad(), autocast:
        for start in range(0, len(keys), batch):
            group = keys[start : start + batch]
            width = len(group[-1])
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for i, key in enumerate(group):
                ids[i, : len(key)], mask[i, : len(key)] = torch.tensor(key), 1
            hidden = backbone(
                input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
            ).last_hidden_state
            for i, key in enumerate(group):
                at = distinct[key]
                before = torch.tensor(at, device=hidden.device) - 1  # states predicting label p
                logits = lm.get_output_embeddings()(hidden[i, before]).float()
                top = torch.log_softmax(logits, dim=-1).topk(k)
                out[key] = RowTeacher(
                    torch.tensor(at), top.indices.cpu().to(torch.int32), top.values.cpu().half()
                )
    if was_training:
        model.train()
    return out


def load_tokenized(path: str, tokenizer, config: Config, role: str):
    """Read, validate and tokenize a data file; report and guard masking problems."""
    dataset = read_dataset(path)
    for warning in dataset.warnings:
        log.warning(warning)
    rows, report = tokenize_all(
        tokenizer, dataset.examples, config.data.max_length, config.data.system_prompt
    )
    if report.truncated:
        log.warning(
            "%s: %d of %d %s rows are longer than data.max_length=%d and were truncated",
            path,
            report.truncated,
            report.rows,
            role,
            config.data.max_length,
        )
    if report.fully_masked:
        log.warning(
            "%s: %d %s rows have no answer token left after truncation and were dropped; "
            "raise data.max_length",
            path,
            report.fully_masked,
            role,
        )
    if not rows:
        raise LorafitError(
            f"{path}: every {role} row lost its answer to truncation (data.max_length="
            f"{config.data.max_length}); raise data.max_length"
        )
    info = {
        "path": str(path),
        "sha256": file_sha256(resolve(path)),
        "format": dataset.format,
        "rows": report.rows,
        "used_rows": len(rows),
        "truncated": report.truncated,
        "dropped_no_answer": report.fully_masked,
        "answer_tokens": sum(r.trainable for r in rows),
        "tokens": sum(len(r.input_ids) for r in rows),
    }
    return rows, info


def optimizer_steps(rows: int, t: TrainSection, world_size: int = 1) -> int:
    """Optimizer steps of ``rows`` examples over ``t.epochs`` (a step = one effective batch)."""
    per_epoch = math.ceil(rows / (t.batch_size * t.grad_accumulation * world_size))
    return math.ceil(per_epoch * t.epochs)


def data_repeats(rows: int, t: TrainSection, world_size: int = 1) -> int:
    """How many times to repeat a small dataset so that training takes ``t.min_steps`` steps
    (replay comes on top and only adds steps). 1 when it already has them or max_steps rules."""
    if rows == 0 or t.min_steps <= 0 or t.max_steps > 0:
        return 1
    repeats = 1
    while optimizer_steps(rows * repeats, t, world_size) < t.min_steps:
        repeats += 1
    return repeats


def load_training_data(config: Config, tokenizer, world_size: int = 1) -> TrainingData:
    """The training rows (repeated up to ``train.min_steps``) and a sample of eval rows."""
    if not config.data.train:
        raise LorafitError("no training data: pass --data FILE or set data.train in the config")
    train_rows, train_info = load_tokenized(config.data.train, tokenizer, config, "train")
    eval_rows, eval_info = None, None
    if config.data.eval:
        eval_rows, eval_info = load_tokenized(config.data.eval, tokenizer, config, "eval")
        # the eval-loss curve needs a sample, not every row (generation eval uses them all)
        eval_rows = eval_rows[: config.train.eval_loss_rows]
    repeats = data_repeats(len(train_rows), config.train, world_size)
    if repeats > 1:
        log.info(
            "small dataset: %d rows are %d optimizer step(s) over %g epoch(s); repeating them "
            "%dx to reach train.min_steps=%d (set it to 0 to turn this off)",
            len(train_rows),
            optimizer_steps(len(train_rows), config.train, world_size),
            config.train.epochs,
            repeats,
            config.train.min_steps,
        )
        train_info["repeats"] = repeats
        train_rows = train_rows * repeats
    return TrainingData(train_rows, eval_rows, {"train": train_info, "eval": eval_info})


def replay_rows(config: Config, model, tokenizer, base_record: dict | None, domain_rows: int):
    """Replay rows (the base model's own answers to general prompts) for ``data.replay``;
    a share of the (repeated) domain rows, so repeats bring other general answers. The
    answers are computed in the precision training computes in (as the KL targets are)."""
    from lorafit.answer_cache import model_key
    from lorafit.data.replay import base_answers, replay_count, replay_examples

    count = replay_count(domain_rows, config.data.replay)
    if count == 0:
        return [], None
    prompts_file = resolve(config.data.replay_prompts or REPLAY_PROMPTS)
    if not prompts_file.is_file():
        raise LorafitError(f"data.replay_prompts: {prompts_file} does not exist")
    precision = resolve_precision(config.train.precision, str(next(model.parameters()).device))
    cache = base_record is not None and config.eval.cache_base_answers
    sources: Counter = Counter()
    answers = base_answers(
        model,
        tokenizer,
        model_key(base_record, model, precision) if cache else None,
        prompts_file,
        config.data.system_prompt,
        needed=count,
        seed=config.data.seed,
        max_new_tokens=config.data.replay_max_tokens,
        precision=precision,
        sources=sources,
    )
    examples = replay_examples(answers, count, config.data.seed)
    rows, _ = tokenize_all(tokenizer, examples, config.data.max_length, config.data.system_prompt)
    usable = sum(a["stopped"] for a in answers)
    log.info(
        "replay: %d general examples (%d distinct, share %.0f%%) mixed into %d domain rows",
        len(rows),
        min(usable, len(rows)),
        100 * config.data.replay,
        domain_rows,
    )
    return rows, {
        "share": config.data.replay,
        "max_tokens": config.data.replay_max_tokens,
        "prompts": str(config.data.replay_prompts or REPLAY_PROMPTS),
        "prompts_sha256": file_sha256(prompts_file),
        "rows": len(rows),
        "distinct": min(usable, len(rows)),
        "answers_that_stopped": usable,
        "tokens": sum(len(r.input_ids) for r in rows),
        "answers": {k: sources[k] for k in ("shipped", "cached", "computed")},  # base model's
    }
