"""TRL's SFTTrainer with lorafit's loss, and the callbacks a lorafit run needs.

- ``LorafitTrainer``: the answer-only loss (lorafit.loss), with the batch's shared prefix run
  once after a check on a real batch that it gives the same loss;
- ``MetricsCallback``: metrics.jsonl, MLflow metrics, the progress bar, a guard on NaN loss;
- ``GracefulStop``: Ctrl-C (or SIGTERM) ends the run at the next step with a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from lorafit.config import Config
from lorafit.loss import answer_only_loss, shared_prefix_length
from lorafit.tracking import Tracker

log = logging.getLogger(__name__)


class LorafitTrainer(SFTTrainer):
    """SFTTrainer whose loss is lorafit's answer-only loss in a single process.

    Under several processes (DDP) TRL's own loss runs: lorafit's calls the backbone directly,
    outside the DDP wrapper whose forward prepares the gradient all-reduce.
    """

    def __init__(self, *args, lorafit_config: Config, teachers: dict | None = None, **kwargs):
        from lorafit.hooks import no_telemetry

        no_telemetry()  # TRL pings the Hub from its constructor
        super().__init__(*args, **kwargs)
        self.lorafit_config = lorafit_config
        self.teachers = teachers or {}
        self.teacher_positions_seen = 0  # replay positions the KL term reached (run.json)
        self.shared_prefix: bool | None = None  # decided on the first batch that has one
        self.shared_prefix_tokens = 0
        self.tokens_seen = 0
        self.answer_tokens_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or self.accelerator.num_processes > 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        share = self._shared_prefix_checked(model, inputs)
        teacher = self._teacher(inputs) if model.training else None
        # accelerate autocasts the wrapped model's forward; this loss calls the inner model,
        # so train.precision's autocast has to be entered here
        with self.accelerator.autocast():
            loss, count = answer_only_loss(model, inputs, num_items_in_batch, share, teacher)
        if model.training:
            mask = inputs.get("attention_mask")
            self.tokens_seen += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            self.answer_tokens_seen += count
        return loss

    def create_optimizer(self, model=None):
        """AdamW as TRL builds it; with ``train.loraplus_lr_ratio`` > 1, peft's LoRA+ optimizer
        (Hayou et al. 2024): LoRA's B matrices learn that many times faster than A."""
        ratio = self.lorafit_config.train.loraplus_lr_ratio
        if ratio == 1 or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        opt_model = self.model if model is None else model
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = create_loraplus_optimizer(
            opt_model,
            cls,
            **{**kwargs, "lr": kwargs.get("lr", self.args.learning_rate)},
            loraplus_lr_ratio=ratio,
            loraplus_weight_decay=self.args.weight_decay,
            # peft's default for LoRA on embeddings is a fixed 1e-6: train them at train.lr
            loraplus_lr_embedding=kwargs.get("lr", self.args.learning_rate),
        )
        return self.optimizer

    def _teacher(self, inputs):
        """The base distributions of the replay rows packed in this batch (None: none)."""
        from lorafit.loss import Teacher

        teacher = Teacher.for_batch(
            self.teachers,
            inputs["input_ids"],
            inputs.get("position_ids"),
            self.lorafit_config.data.replay_kl,
        )
        if teacher is not None:
            self.teacher_positions_seen += int(teacher.mask.sum())
        return teacher

    def _shared_prefix_checked(self, model, inputs) -> bool:
        """Share the batch's common prefix once it gave the same loss on a real batch.

        A model whose attention ignores custom masks (some architectures do) would train on a
        different loss: compare once, and fall back if it differs.
        """
        if self.shared_prefix is not None:
            return self.shared_prefix
        if not model.training:
            return False
        if self.args.gradient_checkpointing or not self.lorafit_config.train.shared_prefix:
            # checkpointing recomputes layers in backward, outside the pass that
            # switched attention to rows_attention
            self.shared_prefix = False
            return False
        import torch

        ids, labels = inputs["input_ids"], inputs["labels"]
        prefix, _ = shared_prefix_length(ids, labels, inputs.get("position_ids"))
        if not prefix:
            return False  # nothing shared in this batch: decide on a later one
        model.eval()  # no dropout: both losses must see the same network
        try:
            with torch.no_grad():
                plain, _ = answer_only_loss(model, inputs)
                try:
                    shared, _ = answer_only_loss(model, inputs, shared_prefix=True)
                except Exception as e:  # an attention that cannot take the row mask
                    log.warning(
                        "train.shared_prefix failed on this model (%s); training without sharing",
                        e,
                    )
                    self.shared_prefix = False
                    return False
        finally:
            model.train()
        same = bool(torch.isclose(plain, shared, rtol=1e-4, atol=1e-5))
        if not same:
            log.warning(
                "train.shared_prefix: loss %.6f with a shared prefix vs %.6f without on this "
                "model; training without sharing",
                shared.item(),
                plain.item(),
            )
        else:
            log.info(
                "shared prefix: each batch runs its rows' common opening once (%d tokens in the "
                "first batch; checked: same loss as per row)",
                prefix,
            )
        self.shared_prefix = same
        self.shared_prefix_tokens = prefix
        return same

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.tokens_seen:
            logs = {
                **logs,
                "num_tokens": self.tokens_seen,
                "answer_tokens": self.answer_tokens_seen,
            }
        return super().log(logs, *args, **kwargs)


def sft_config(
    config: Config, checkpoints: Path, device: str, precision: str, world_size: int, has_eval: bool
) -> SFTConfig:
    """TRL's settings for a lorafit run: every value set deliberately (TRL's defaults differ)."""
    t = config.train
    eval_strategy = ("steps" if t.eval_steps else "epoch") if has_eval else "no"
    return SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accumulation,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="random" if t.shuffle else "sequential",
        activation_checkpointing=t.gradient_checkpointing,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=2,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        report_to="none",
        disable_tqdm=True,
        max_length=None,  # rows are already truncated by lorafit.data.tokenize
        padding_free=t.padding_free,
        dataloader_num_workers=0,
        optim="adamw_torch",
        # several processes: gloo on CPU (nccl needs GPUs); LoRA uses every adapter param
        ddp_backend="gloo" if world_size > 1 and device == "cpu" else None,
        ddp_find_unused_parameters=False if world_size > 1 else None,
    )


class MetricsCallback(TrainerCallback):
    """Per-step metrics to metrics.jsonl and MLflow, tokens/s from the trainer's token counter,
    the progress bar, and a stop on a loss or gradient that is no longer finite, or on a
    gradient that vanished while the loss did not (a collapsed model)."""

    def __init__(self, metrics_file: Path, tracker: Tracker, show_progress: bool, writer: bool):
        self.metrics_file, self.tracker = metrics_file, tracker
        self.show_progress, self.writer = show_progress, writer
        self.last = (time.perf_counter(), 0, 0)
        self.progress = None
        self.task = None
        self.nonfinite: str | None = None

    def on_train_begin(self, args, state, control, **kw):
        self.last = (time.perf_counter(), 0, 0)
        if self.show_progress:
            from lorafit.progress import progress_bar

            self.progress = progress_bar("training", info=True)
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=state.max_steps, completed=state.global_step, info=""
            )

    def on_step_end(self, args, state, control, **kw):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        row = self._row(state, dict(logs or {}))
        for key in ("loss", "grad_norm"):
            value = row.get(key)
            if value is not None and not math.isfinite(value):
                control.should_training_stop = True
                self.nonfinite = f"{key} became {value} at step {state.global_step}"
        loss, grad_norm = row.get("loss"), row.get("grad_norm")
        if grad_norm == 0 and loss is not None and loss > 0 and self.nonfinite is None:
            # the same divergence as a NaN, as bf16 kernels on some CPUs (AMX) end it: the
            # logits saturate to one flat distribution and no gradient is left
            control.should_training_stop = True
            self.nonfinite = (
                f"grad_norm became 0 with the loss at {loss:.3f} (the model collapsed) "
                f"at step {state.global_step}"
            )
        if self.writer:  # only rank 0 writes; every rank runs the NaN guard above
            with self.metrics_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])
        if self.progress is not None and "loss" in row:
            info = f"loss {row['loss']:.3f}"
            if "tokens_per_s" in row:
                info += f"  {row['tokens_per_s']:.0f} tok/s"
            self.progress.update(self.task, info=info)

    def _row(self, state, logs: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        now = time.perf_counter()
        if "loss" in logs:
            tokens = int(logs.get("num_tokens", 0))
            answers = int(logs.get("answer_tokens", 0))
            t0, n0, a0 = self.last
            if tokens > n0 and now > t0:
                row["tokens_per_s"] = (tokens - n0) / (now - t0)
                row["answer_tokens_per_s"] = (answers - a0) / (now - t0)
            self.last = (now, tokens, answers)
            row["num_tokens"] = tokens
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm", "mean_token_accuracy"):
            if key in logs:
                row[key] = logs[key]
        return row

    def on_train_end(self, args, state, control, **kw):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class GracefulStop(TrainerCallback):
    """Ctrl-C or SIGTERM during training: finish the current step, save a checkpoint through
    the trainer's own save, and stop. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested: str | None = None

    def on_step_end(self, args, state, control, **kw):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    @contextlib.contextmanager
    def armed(self):
        """Catch the signals while the block runs (main thread, single process only)."""

        def request(signum, _frame):
            self.requested = signal.Signals(signum).name
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next one aborts
            log.warning(
                "stopping after this step and saving a checkpoint (press Ctrl-C again to abort)"
            )

        before = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)
