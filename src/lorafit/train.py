"""Train stage: a LoRA adapter with TRL's SFTTrainer + PEFT, into a self-describing run dir.

    lorafit train configs/demo.yaml --data data/generated/train.jsonl --output runs/demo

Examples are formatted with the model's own chat template and the loss is on the answer
(plus its end-of-turn token) only; see lorafit.data.tokenize.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from lorafit.config import Config, TrainSection, dump_config
from lorafit.data.formats import read_dataset
from lorafit.data.tokenize import Tokenized, tokenize_all
from lorafit.errors import LorafitError
from lorafit.model import (
    best_device,
    cpu_has_bf16,
    load_model,
    load_tokenizer,
    lora_config,
    resolve_model_dir,
    resolve_source,
)
from lorafit.paths import default_run_dir
from lorafit.plots import plot_loss
from lorafit.rundir import (
    ADAPTER_DIR,
    RUN_FILE,
    RunLock,
    file_sha256,
    library_versions,
    prepare_run_dir,
    read_json,
    write_json,
)
from lorafit.tracking import Tracker, flatten, tracking_uri

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> bf16 where the hardware computes it natively, fp16 on older GPUs, else fp32."""
    if precision != "auto":
        return precision
    if device == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def _to_hf_dataset(rows: list[Tokenized]):
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]}
    )


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
        "sha256": file_sha256(path),
        "format": dataset.format,
        "rows": report.rows,
        "used_rows": len(rows),
        "truncated": report.truncated,
        "dropped_no_answer": report.fully_masked,
        "answer_tokens": sum(r.trainable for r in rows),
        "tokens": sum(len(r.input_ids) for r in rows),
    }
    return rows, info


def _trainer_class():
    """SFTTrainer with lorafit's answer-only loss (single process; DDP keeps TRL's path)."""
    from trl import SFTTrainer

    from lorafit.loss import answer_only_loss, shared_prefix_length

    class LorafitTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or self.accelerator.num_processes > 1:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            share = self._shared_prefix_checked(model, inputs)
            loss, count = answer_only_loss(model, inputs, num_items_in_batch, share)
            if model.training:
                mask = inputs.get("attention_mask")
                self._tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
                self._answer_tokens += count
            return loss

        def _shared_prefix_checked(self, model, inputs) -> bool:
            """Share the batch's common prefix once it gave the same loss on a real batch.

            A model whose attention ignores custom masks or caches (some architectures do)
            would train on a different loss: compare once, and fall back if it differs.
            """
            if self.lorafit_shared_prefix is not None:
                return self.lorafit_shared_prefix
            if not model.training:
                return False
            if self.args.gradient_checkpointing or not self.lorafit_config.train.shared_prefix:
                # checkpointing recomputes layers in backward, outside the pass that
                # switched attention to rows_attention
                self.lorafit_shared_prefix = False
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
                            "train.shared_prefix failed on this model (%s); training "
                            "without sharing",
                            e,
                        )
                        self.lorafit_shared_prefix = False
                        return False
            finally:
                model.train()
            same = bool(torch.isclose(plain, shared, rtol=1e-4, atol=1e-5))
            if not same:
                log.warning(
                    "train.shared_prefix: loss %.6f with a shared prefix vs %.6f without on "
                    "this model; training without sharing",
                    shared.item(),
                    plain.item(),
                )
            else:
                log.info(
                    "shared prefix: each batch runs its rows' common opening once (%d tokens in "
                    "the first batch; checked: same loss as per row)",
                    prefix,
                )
            self.lorafit_shared_prefix = same
            self.lorafit_prefix_tokens = prefix
            return same

        lorafit_shared_prefix: bool | None = None
        lorafit_prefix_tokens = 0
        lorafit_config: Config | None = None

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self._tokens:
                logs = {**logs, "num_tokens": self._tokens, "answer_tokens": self._answer_tokens}
            return super().log(logs, *args, **kwargs)

        def _save_checkpoint(self, model, trial):
            # transformers writes checkpoint-N in place: a crash mid-save leaves a checkpoint
            # that --resume would pick up and fail on. Stage it, then rename (atomic on one fs).
            if self.accelerator.num_processes > 1:  # per-rank RNG files: keep the stock path
                return super()._save_checkpoint(model, trial)
            from transformers.trainer import rotate_checkpoints

            real = self.args.output_dir
            staging = os.path.join(real, ".staging")
            shutil.rmtree(staging, ignore_errors=True)
            self.args.output_dir = staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = real
            name = f"checkpoint-{self.state.global_step}"
            target = os.path.join(real, name)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(os.path.join(staging, name), target)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                output_dir=real,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=None,
                use_mtime=True,
            )

        _tokens = 0
        _answer_tokens = 0

    return LorafitTrainer


def _replay(config: Config, model, tokenizer, model_dir: Path, domain_rows: int):
    """Replay rows (the base model's own answers to general prompts) for ``data.replay``."""
    from lorafit.data.replay import (
        DEFAULT_REPLAY_PROMPTS,
        base_answers,
        replay_count,
        replay_examples,
    )

    count = replay_count(domain_rows, config.data.replay)
    if count == 0:
        return [], None
    prompts_file = Path(config.data.replay_prompts or DEFAULT_REPLAY_PROMPTS)
    if not prompts_file.is_file():
        raise LorafitError(f"data.replay_prompts: {prompts_file} does not exist")
    answers = base_answers(
        model,
        tokenizer,
        model_dir,
        prompts_file,
        config.data.system_prompt,
        needed=count,
        seed=config.data.seed,
        max_new_tokens=config.data.replay_max_tokens,
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
        "prompts": str(prompts_file),
        "prompts_sha256": file_sha256(prompts_file),
        "rows": len(rows),
        "distinct": min(usable, len(rows)),
        "answers_that_stopped": usable,
        "tokens": sum(len(r.input_ids) for r in rows),
    }


def _cuda_peak_bytes() -> int | None:
    """torch.cuda.max_memory_allocated of this process (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def check_disk_space(run_dir: Path, trainable_params: int) -> None:
    """Refuse to start when the run cannot even hold its checkpoints."""
    # fp32 adapter + up to 3 checkpoints (weights and two AdamW moments each) + logs/margin
    need = trainable_params * 4 * (1 + 3 * 3) + 64 * 2**20
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise LorafitError(
            f"{run_dir}: {free / 2**20:.0f} MiB free, but this run needs about "
            f"{need / 2**20:.0f} MiB for its adapter and checkpoints; free some space or "
            "choose another --output"
        )


def _rank_agreement(model, history: list[dict], world_size: int) -> dict | None:
    """Under several processes: every rank's adapter checksum and last logged loss (must agree)."""
    if world_size < 2:
        return None
    import hashlib

    import torch.distributed as dist

    digest = hashlib.sha256()
    # named like the saved adapter file's tensors, so the file can be checked against it
    params = {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}
    for name in sorted(params):
        digest.update(name.encode())
        digest.update(params[name].detach().float().cpu().numpy().tobytes())
    losses = [h["loss"] for h in history if "loss" in h]
    mine = {"adapter_sha256": digest.hexdigest(), "final_loss": losses[-1] if losses else None}
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, mine)
    same = len({g["adapter_sha256"] for g in gathered}) == 1
    if not same:
        log.warning("ranks ended with different adapter weights: %s", gathered)
    return {"world_size": world_size, "ranks": gathered, "adapters_identical": same}


def _callbacks(run_dir: Path, show_progress: bool, tracker: Tracker, writer: bool = True):
    from transformers import TrainerCallback

    metrics_path = run_dir / "metrics.jsonl"

    class MetricsCallback(TrainerCallback):
        """Per-step metrics to metrics.jsonl, tokens/s from TRL's token counter, NaN guard."""

        def __init__(self):
            self.last = (time.perf_counter(), 0, 0)
            self.progress = None
            self.task = None

        def on_train_begin(self, args, state, control, **kw):
            self.last = (time.perf_counter(), 0, 0)
            if show_progress:
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
            logs = dict(logs or {})
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
            for key in ("loss", "grad_norm"):
                value = row.get(key)
                if value is not None and not math.isfinite(value):
                    control.should_training_stop = True
                    state.lorafit_nonfinite = f"{key} became {value} at step {state.global_step}"
            if writer:  # only rank 0 writes; every rank runs the NaN guard above
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])
            if self.progress is not None and "loss" in row:
                info = f"loss {row['loss']:.3f}"
                if "tokens_per_s" in row:
                    info += f"  {row['tokens_per_s']:.0f} tok/s"
                self.progress.update(self.task, info=info)

        def on_train_end(self, args, state, control, **kw):
            if self.progress is not None:
                self.progress.stop()

    return [MetricsCallback()]


def train(
    config: Config,
    overwrite: bool = False,
    resume: bool = False,
    show_progress: bool = True,
) -> Path:
    """Train a LoRA adapter as ``config`` says; return the run directory."""
    if not config.data.train:
        raise LorafitError("no training data: pass --data FILE or set data.train in the config")
    run_dir = Path(config.output_dir or default_run_dir())
    rank, _ = process_rank()
    if rank != 0:  # under torchrun only rank 0 owns the run directory; the others just train
        return _train_locked(config, run_dir, resume, show_progress=False)
    prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
    with RunLock(run_dir):
        return _train_locked(config, run_dir, resume, show_progress)


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


def process_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun / accelerate launch; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _train_locked(config: Config, run_dir: Path, resume: bool, show_progress: bool) -> Path:
    import torch

    started = time.time()
    rank, world_size = process_rank()
    writer = rank == 0
    source = resolve_source(config.model.name)
    model_dir = resolve_model_dir(
        config.model.name, config.model.revision, config.model.allow_pickle
    )
    tokenizer = load_tokenizer(model_dir, config.model.trust_remote_code)
    train_rows, train_info = load_tokenized(config.data.train, tokenizer, config, "train")
    eval_rows, eval_info = (None, None)
    if config.data.eval:
        eval_rows, eval_info = load_tokenized(config.data.eval, tokenizer, config, "eval")
        # the eval-loss curve needs a sample, not every row (generation eval uses them all)
        eval_rows = eval_rows[: config.train.eval_loss_rows]

    device = best_device()
    if device == "cuda" and world_size > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    precision = resolve_precision(config.train.precision, device.split(":")[0])
    t = config.train
    torch.manual_seed(t.seed)
    model = load_model(config.model, model_dir, device)
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
    # replay is a share of the repeated rows: distinct general answers, not the same ones again
    replay_rows, replay_info = _replay(config, model, tokenizer, model_dir, len(train_rows))
    train_rows = train_rows + replay_rows
    run_info: dict[str, Any] = {
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "base_model": {"name": config.model.name, "kind": source.kind, "dir": str(model_dir)},
        "data": {"train": train_info, "eval": eval_info, "replay": replay_info},
        "device": device,
        "precision": precision,
        "versions": library_versions(),
        "world_size": world_size,
        "effective_batch_size": t.batch_size * t.grad_accumulation * world_size,
    }
    if not writer:
        tracker = Tracker("", enabled=False)
    else:
        (run_dir / "config.yaml").write_text(dump_config(config))
        tracker = _start_tracking(config, run_dir, run_info, resume)
        write_json(run_dir / RUN_FILE, run_info)
        if not resume:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        log.info(
            "training on %s x %d process(es), %s; effective batch %d (%d per device x %d "
            "accumulation x %d)",
            device,
            world_size,
            precision,
            run_info["effective_batch_size"],
            t.batch_size,
            t.grad_accumulation,
            world_size,
        )
    data = (tokenizer, model, train_rows, eval_rows, started)
    try:
        return _train_tracked(config, run_dir, resume, show_progress, run_info, tracker, data)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException as e:
        if writer and run_info.get("status") == "running":  # say why in run.json too
            run_info.update(status="failed", error=str(e) or type(e).__name__)
            with contextlib.suppress(OSError):
                write_json(run_dir / RUN_FILE, run_info)
        tracker.end("KILLED" if run_info.get("status") == "interrupted" else "FAILED")
        raise


def _start_tracking(config: Config, run_dir: Path, run_info: dict, resume: bool) -> Tracker:
    """Open (or, on --resume, reopen) the run's MLflow run and log what it is made of."""
    t = config.tracking
    tracker = Tracker(tracking_uri(t.uri), t.experiment, enabled=t.enabled)
    if not t.enabled:
        return tracker
    previous = {}
    if resume and (run_dir / RUN_FILE).is_file():
        previous = read_json(run_dir / RUN_FILE).get("tracking") or {}
    if previous.get("run_id") and previous.get("uri") == tracker.uri:
        tracker.attach(previous["run_id"])
    else:
        # `lorafit demo` names every run dir "run": qualify it with the demo's directory
        name = run_dir.name if run_dir.name != "run" else f"{run_dir.resolve().parent.name}-run"
        tracker.start(
            name,
            {
                "lorafit.run_dir": str(run_dir.resolve()),
                "lorafit.base_model": config.model.name,
            },
        )
    if tracker.run_id:
        run_info["tracking"] = {
            "uri": tracker.uri,
            "experiment": tracker.experiment,
            "run_id": tracker.run_id,
        }
    tracker.log_params(flatten(config.model_dump(mode="json")))
    tracker.log_params(flatten({"dataset": run_info["data"]}))
    tracker.set_tags({f"version.{k}": v for k, v in run_info["versions"].items()})
    tracker.set_tags(
        {"lorafit.device": run_info["device"], "lorafit.precision": run_info["precision"]}
    )
    return tracker


def _train_tracked(
    config: Config,
    run_dir: Path,
    resume: bool,
    show_progress: bool,
    run_info: dict,
    tracker: Tracker,
    data: tuple,
) -> Path:
    from trl import SFTConfig

    tokenizer, model, train_rows, eval_rows, started = data
    rank, world_size = process_rank()
    writer = rank == 0
    train_info = run_info["data"]["train"]
    device, precision = run_info["device"], run_info["precision"]

    t = config.train
    eval_strategy = "no"
    if eval_rows:
        eval_strategy = "steps" if t.eval_steps else "epoch"
    args = SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
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
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=_to_hf_dataset(train_rows),
        eval_dataset=_to_hf_dataset(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=lora_config(config.lora, model),
        callbacks=(callbacks := _callbacks(run_dir, show_progress, tracker, writer)),
    )
    trainer.lorafit_config = config
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our progress bar and metrics.jsonl replace it
    peft_model = trainer.model
    trainable, total = peft_model.get_nb_trainable_parameters()
    if writer:
        check_disk_space(run_dir, trainable)
    resume_from = resume and any((run_dir / "checkpoints").glob("checkpoint-*"))
    try:
        result = trainer.train(resume_from_checkpoint=True if resume_from else None)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        step = trainer.state.global_step
        run_info.update(status="failed", error=f"disk full at step {step}")
        with contextlib.suppress(OSError):
            write_json(run_dir / RUN_FILE, run_info)
        raise LorafitError(
            f"{run_dir}: the disk filled up at step {step} ({e.strerror}). Checkpoints are "
            "written atomically, so the last complete one is intact: free some space and "
            f"continue with: lorafit train ... --output {run_dir} --resume"
        ) from None
    except KeyboardInterrupt:
        # Ctrl-C: keep the work done so far as a resumable checkpoint, then leave cleanly
        for callback in callbacks:
            callback.on_train_end(args, trainer.state, trainer.control)
        trainer._save_checkpoint(trainer.model, trial=None)
        step = trainer.state.global_step
        run_info.update(status="interrupted", error=f"interrupted at step {step}")
        if writer:
            write_json(run_dir / RUN_FILE, run_info)
        raise LorafitError(
            f"interrupted at step {step}; checkpoint saved. Continue with: lorafit train "
            f"... --output {run_dir} --resume"
        ) from None
    nonfinite = getattr(trainer.state, "lorafit_nonfinite", None)
    if nonfinite:
        run_info.update(status="failed", error=nonfinite)
        if writer:
            write_json(run_dir / RUN_FILE, run_info)
        raise LorafitError(
            f"training stopped: {nonfinite}. Lower train.lr (now {t.lr:g}); the last good "
            f"checkpoint is kept in {run_dir / 'checkpoints'}"
        )

    ranks = _rank_agreement(peft_model, trainer.state.log_history, world_size)
    if not writer:
        return run_dir
    if ranks:
        run_info["distributed"] = ranks
    tmp = run_dir / f".{ADAPTER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(run_dir / ADAPTER_DIR, ignore_errors=True)
    tmp.rename(run_dir / ADAPTER_DIR)

    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    elapsed = time.time() - started
    train_runtime = result.metrics.get("train_runtime", elapsed)
    epoch_scale = trainer.state.epoch or 1
    run_info.update(
        status="completed",
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        lora={"trainable_params": trainable, "total_params": total},
        results={
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "first_loss": train_losses[0] if train_losses else None,
            "final_loss": train_losses[-1] if train_losses else None,
            "final_eval_loss": eval_losses[-1] if eval_losses else None,
            "train_runtime_s": train_runtime,
            "wall_s": elapsed,
            # tokens this process really trained on (counted in compute_loss); the data-size
            # estimate only where TRL's own loss path ran (multi-process)
            "answer_tokens_per_s": (
                trainer._answer_tokens or epoch_scale * train_info["answer_tokens"]
            )
            / max(train_runtime, 1e-9),
            "tokens_per_s": (trainer._tokens or epoch_scale * train_info["tokens"])
            / max(train_runtime, 1e-9),
            # 1 when each batch ran its common prefix once (checked equal on the first batch)
            "shared_prefix": int(bool(trainer.lorafit_shared_prefix)),
            "shared_prefix_tokens": trainer.lorafit_prefix_tokens,
            "cuda_peak_bytes": _cuda_peak_bytes(),
        },
    )
    write_json(run_dir / RUN_FILE, run_info)
    plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
    tracker.log_metrics({**run_info["results"], **run_info["lora"]}, trainer.state.global_step)
    for name in ("config.yaml", RUN_FILE, "metrics.jsonl", "loss.png"):
        tracker.log_artifact(run_dir / name)
    tracker.log_artifact(run_dir / ADAPTER_DIR, ADAPTER_DIR)
    tracker.end("FINISHED")
    return run_dir
