"""Train stage: a LoRA adapter with TRL's SFTTrainer + PEFT, into a self-describing run dir.

    lorafit train configs/demo.yaml --data data/generated/train.jsonl --output runs/demo

tokenizer -> data -> model + LoRA -> trainer -> save. Data preparation is lorafit.data.prepare,
the trainer and its callbacks lorafit.trainer, the run directory lorafit.rundir.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.config import Config, dump_config
from lorafit.data.prepare import TrainingData, load_training_data
from lorafit.errors import LorafitError
from lorafit.launch import process_rank, rank_agreement, training_device
from lorafit.model import load_model, load_tokenizer, lora_config, resolve_precision
from lorafit.paths import default_run_dir
from lorafit.plots import plot_loss
from lorafit.rundir import RunDir, RunRecord, library_versions, training_dir
from lorafit.sources import resolve_base
from lorafit.tracking import Tracker, config_without_secrets, start_training_run

log = logging.getLogger(__name__)


def train(
    config: Config,
    overwrite: bool = False,
    resume: bool = False,
    show_progress: bool = True,
    callbacks: list | None = None,
) -> Path:
    """Train a LoRA adapter as ``config`` says; return the run directory. ``callbacks``:
    extra transformers TrainerCallbacks (the benchmark's evaluation points)."""
    rank, world_size = process_rank()
    writer = rank == 0  # under torchrun only rank 0 writes the run directory
    target = Path(config.output_dir or default_run_dir())
    with training_dir(target, overwrite, resume, writer) as run:
        _train(config, run, resume, show_progress and writer, world_size, writer, callbacks or [])
    return target


def _train(config, run: RunDir, resume, show_progress, world_size, writer, callbacks) -> None:
    import torch

    started = time.time()
    device = training_device(world_size)
    base = resolve_base(config.model)
    tokenizer = load_tokenizer(base.dir, config.model.trust_remote_code)
    data = load_training_data(config, tokenizer, world_size)
    torch.manual_seed(config.train.seed)
    model = load_model(config.model, base.dir, device)
    data.add_replay(config, model, tokenizer, base.record(), world_size)
    record = RunRecord(run, _run_info(config, base, data, device, world_size), writer)
    tracker = Tracker("", enabled=False)
    if writer:
        run.config_file.write_text(dump_config(config_without_secrets(config)))
        if not resume:
            run.metrics_file.unlink(missing_ok=True)
        record.start()
        tracker = start_training_run(config, run, record, resume)
        _log_setup(record.info, config)
    job = TrainingJob(config, run, record, tracker, data, started)
    try:
        _fit(job, model, tokenizer, resume, show_progress, callbacks)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            record.interrupt("aborted (Ctrl-C)")
        record.fail(str(e) or type(e).__name__)
        tracker.end("KILLED" if record.status == "interrupted" else "FAILED")
        raise


def _run_info(config: Config, base, data: TrainingData, device: str, world_size: int) -> dict:
    t = config.train
    return {
        "status": "new",
        "base_model": base.record(),
        "data": data.info,
        "device": device,
        "precision": resolve_precision(t.precision, device),
        "versions": library_versions(),
        "world_size": world_size,
        "effective_batch_size": t.batch_size * t.grad_accumulation * world_size,
    }


def _log_setup(info: dict, config: Config) -> None:
    t = config.train
    log.info(
        "training on %s x %d process(es), %s; effective batch %d (%d per device x %d "
        "accumulation x %d)",
        info["device"],
        info["world_size"],
        info["precision"],
        info["effective_batch_size"],
        t.batch_size,
        t.grad_accumulation,
        info["world_size"],
    )


@dataclass
class TrainingJob:
    """What one training writes to and reads from, from start to saved adapter."""

    config: Config
    run: RunDir
    record: RunRecord
    tracker: Tracker
    data: TrainingData
    started: float  # time.time() at the start, for run.json's wall_s


def _fit(job: TrainingJob, model, tokenizer, resume: bool, show_progress: bool, extra: list):
    """Build the trainer, train (resuming from the last complete checkpoint), save the adapter."""
    from lorafit.trainer import GracefulStop, LorafitTrainer, MetricsCallback, sft_config

    config, run, record, tracker, data = job.config, job.run, job.record, job.tracker, job.data
    info = record.info
    metrics = MetricsCallback(run.metrics_file, tracker, show_progress, record.writer)
    stop = GracefulStop()
    trainer = LorafitTrainer(
        model=model,
        args=sft_config(
            config,
            run.checkpoints_dir,
            info["device"],
            info["precision"],
            info["world_size"],
            bool(data.eval),
        ),
        train_dataset=_to_hf_dataset(data.train),
        eval_dataset=_to_hf_dataset(data.eval) if data.eval else None,
        processing_class=tokenizer,
        peft_config=lora_config(config.lora, model),
        callbacks=[metrics, stop, *extra],
        lorafit_config=config,
        teachers=data.teachers,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our progress bar and metrics.jsonl replace it
    trainable, total = trainer.model.get_nb_trainable_parameters()
    if record.writer:
        check_disk_space(run.path, trainable)
    checkpoint = run.latest_checkpoint() if resume else None
    try:
        result = _run(trainer, stop, checkpoint, info["world_size"])
    except ValueError as e:
        if not (checkpoint and "parameter group" in str(e)):
            raise
        record.fail("the checkpoint's optimizer does not match this config")
        raise LorafitError(
            f"{checkpoint}: its optimizer state has other parameter groups than this config "
            f"builds (train.loraplus_lr_ratio is {config.train.loraplus_lr_ratio:g} now; 1 and "
            "any other value group the parameters differently). Resume with the value the run "
            "was trained with, or train a new run."
        ) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        step = trainer.state.global_step
        record.fail(f"disk full at step {step}")
        raise LorafitError(
            f"{run.target}: the disk filled up at step {step} ({e.strerror}). The last complete "
            "checkpoint is intact: free some space and continue." + _resume_hint(run)
        ) from None
    step = trainer.state.global_step
    if metrics.nonfinite:
        record.fail(metrics.nonfinite)
        raise LorafitError(
            f"training stopped: {metrics.nonfinite}. Lower train.lr (now {config.train.lr:g}); "
            f"the last good checkpoint is kept in {run.checkpoints_dir}"
        )
    if stop.requested:
        record.interrupt(f"interrupted at step {step} ({stop.requested})")
        raise LorafitError(f"interrupted at step {step}; checkpoint saved." + _resume_hint(run))
    ranks = rank_agreement(trainer.model, trainer.state.log_history, info["world_size"])
    if not record.writer:
        return
    _save_adapter(trainer.model, tokenizer, run)
    record.complete(
        distributed=ranks,
        lora={"trainable_params": trainable, "total_params": total},
        results=_results(trainer, result, info, job.started),
    )
    plot_loss(run.metrics_file, run.loss_plot)
    tracker.log_metrics({**record.info["results"], **record.info["lora"]}, step)
    for path in (run.config_file, run.info_file, run.metrics_file, run.loss_plot):
        tracker.log_artifact(path)
    tracker.log_artifact(run.adapter_dir, RunDir.ADAPTER)
    tracker.end("FINISHED")


def _run(trainer, stop, checkpoint: Path | None, world_size: int):
    resume_from = str(checkpoint) if checkpoint else None
    if world_size > 1:  # every rank must stop at the same step: no signal handling
        return trainer.train(resume_from_checkpoint=resume_from)
    with stop.armed():
        return trainer.train(resume_from_checkpoint=resume_from)


def _results(trainer, result, info: dict, started: float) -> dict[str, Any]:
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    elapsed = time.time() - started
    runtime = max(result.metrics.get("train_runtime", elapsed), 1e-9)
    epochs = trainer.state.epoch or 1
    data = info["data"]["train"]
    return {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "first_loss": train_losses[0] if train_losses else None,
        "final_loss": train_losses[-1] if train_losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "train_runtime_s": runtime,
        "wall_s": elapsed,
        # tokens this process really trained on (counted in compute_loss); the data-size
        # estimate only where TRL's own loss path ran (multi-process)
        "answer_tokens_per_s": (trainer.answer_tokens_seen or epochs * data["answer_tokens"])
        / runtime,
        "tokens_per_s": (trainer.tokens_seen or epochs * data["tokens"]) / runtime,
        # 1 when each batch ran its common prefix once (checked equal on the first batch)
        "shared_prefix": int(bool(trainer.shared_prefix)),
        "shared_prefix_tokens": trainer.shared_prefix_tokens,
        # replay answer positions the KL term reached (0 with data.replay_kl 0, or multi-process)
        "kl_positions": trainer.teacher_positions_seen,
        "cuda_peak_bytes": _cuda_peak_bytes(),
    }


def _save_adapter(peft_model, tokenizer, run: RunDir) -> None:
    """adapter/ written whole or not at all (temp folder, then rename)."""
    tmp = run.path / f".{RunDir.ADAPTER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(run.adapter_dir, ignore_errors=True)
    tmp.rename(run.adapter_dir)


def _to_hf_dataset(rows):
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]}
    )


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


def _resume_hint(run: RunDir) -> str:
    again = " --overwrite --resume" if run.path != run.target else " --resume"
    return f" Continue with: lorafit train ... --output {run.target}{again}"
