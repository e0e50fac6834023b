"""A run directory: its layout, its status and its lock, in one place.

Every stage that reads or writes a run goes through ``RunDir``; the file names below are
written nowhere else.

    config.yaml      the resolved config (defaults < YAML < flags)
    run.json         status, the resolved base model, dataset hashes/rows, versions, results
    metrics.jsonl    one line per logged step (loss, eval loss, learning rate, tokens/s)
    loss.png         train/eval loss curves
    adapter/         LoRA adapter (safetensors) + tokenizer
    checkpoints/     resumable trainer checkpoints
    eval/            `lorafit eval`'s default output
    merged/          the merged model `serve` and `export` make of a run (merge.json: its report)

Status in run.json moves ``running -> completed | failed | interrupted``, written once per
change by ``RunRecord``. ``training_dir`` takes the lock before anything is deleted and, with
``--overwrite``, trains beside the old run and swaps the two only when the new one is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.errors import LorafitError
from lorafit.paths import check_replaceable, exclusive_lock, replace_dir, temp_sibling

if TYPE_CHECKING:
    from lorafit.config import Config

# in every merged model lorafit writes (merge, serve, export): its run, parity, system prompt
MERGE_INFO = "lorafit_merge.json"
LIBRARIES = (
    "lorafit",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "gguf",
)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    path = Path(path)
    tmp = temp_sibling(path)
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class RunDir:
    """A training run's directory: where each of its files lives, and what it holds."""

    CONFIG = "config.yaml"
    INFO = "run.json"
    METRICS = "metrics.jsonl"
    LOSS_PLOT = "loss.png"
    ADAPTER = "adapter"
    CHECKPOINTS = "checkpoints"
    EVAL = "eval"
    MERGED = "merged"
    MERGE_REPORT = "merge.json"
    LOCK = ".lock"

    def __init__(self, path: str | Path, target: str | Path | None = None):
        self.path = Path(path)
        # where the run ends up: differs from ``path`` while --overwrite trains beside it
        self.target = Path(target) if target is not None else self.path

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config_file = property(lambda self: self.path / self.CONFIG)
    info_file = property(lambda self: self.path / self.INFO)
    metrics_file = property(lambda self: self.path / self.METRICS)
    loss_plot = property(lambda self: self.path / self.LOSS_PLOT)
    adapter_dir = property(lambda self: self.path / self.ADAPTER)
    checkpoints_dir = property(lambda self: self.path / self.CHECKPOINTS)
    eval_dir = property(lambda self: self.path / self.EVAL)
    merged_dir = property(lambda self: self.path / self.MERGED)
    merge_report = property(lambda self: self.path / self.MERGE_REPORT)
    lock_file = property(lambda self: self.path / self.LOCK)

    @staticmethod
    def holds_run(path: str | Path) -> bool:
        """Does ``path`` hold a lorafit run (finished or not)?"""
        return (Path(path) / RunDir.INFO).is_file()

    @classmethod
    def existing(cls, path: str | Path) -> RunDir:
        """A finished run to read (eval, merge, serve, export), or a clear error."""
        run = cls(path)
        if not run.info_file.is_file():
            raise LorafitError(f"{path}: not a lorafit run directory (no {cls.INFO})")
        if not run.adapter_dir.is_dir():
            status = run.info().get("status", "unknown")
            raise LorafitError(
                f"{path}: this run has no adapter yet (status: {status}); finish it with "
                f"lorafit train ... --output {path} --resume"
            )
        return run

    def info(self) -> dict[str, Any]:
        return read_json(self.info_file)

    def config(self) -> Config:
        """The run's resolved config, through the typed loader (defaults fill newer keys)."""
        from lorafit.config import load_config

        return load_config(self.config_file)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete trainer checkpoint. transformers writes trainer_state.json last,
        so a checkpoint without a readable one was cut off mid-save: it is deleted."""
        complete = []
        for path in self.checkpoints_dir.glob("checkpoint-*"):
            step = path.name.removeprefix("checkpoint-")
            try:
                json.loads((path / "trainer_state.json").read_text())
                complete.append((int(step), path))
            except (OSError, ValueError):
                shutil.rmtree(path, ignore_errors=True)
        return max(complete)[1] if complete else None


class RunRecord:
    """run.json of the run being trained: each status change written once, atomically.

    Only the process that owns the directory writes (rank 0 under torchrun)."""

    def __init__(self, run: RunDir, info: dict[str, Any], writer: bool = True):
        self.run, self.info, self.writer = run, info, writer

    @property
    def status(self) -> str:
        return self.info.get("status", "")

    def _write(self) -> None:
        if self.writer:
            with contextlib.suppress(OSError):  # a full disk must not hide the real error
                write_json(self.run.info_file, self.info)

    def start(self) -> None:
        self.info.update(status="running", started=now())
        self._write()

    def update(self, **fields: Any) -> None:
        self.info.update(fields)
        self._write()

    def complete(self, **fields: Any) -> None:
        self.info.update(fields, status="completed", finished=now())
        self._write()

    def fail(self, error: str) -> None:
        """Failed with ``error``, unless the run already ended another way."""
        if self.status == "running":
            self.info.update(status="failed", error=error, finished=now())
            self._write()

    def interrupt(self, error: str) -> None:
        if self.status == "running":
            self.info.update(status="interrupted", error=error, finished=now())
            self._write()


class RunLock:
    """An exclusive lock file: a second run pointed at the same directory refuses to start."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / RunDir.LOCK
        self._held = contextlib.ExitStack()

    def __enter__(self) -> RunLock:
        try:
            fd = self._held.enter_context(exclusive_lock(self.path, wait=False))
        except BlockingIOError:
            raise LorafitError(
                f"{self.path.parent}: another lorafit process is training into this directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc) -> None:
        self._held.close()


def _check_writable(path: Path) -> None:
    probe = path / ".write-test"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise LorafitError(f"{path}: cannot write to the run directory ({e.strerror})") from e


def _clear(path: Path, keep: str) -> None:
    for child in path.iterdir():
        if child.name != keep:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


@contextlib.contextmanager
def training_dir(
    target: str | Path, overwrite: bool = False, resume: bool = False, writer: bool = True
) -> Iterator[RunDir]:
    """The directory to train into, locked for this process while the block runs.

    - new run: ``target`` must be missing or empty (or hold the run to ``resume``);
    - ``overwrite``: ``target`` must be a lorafit run (or missing) and not a folder whose loss
      would hurt (``check_replaceable``). The new run trains in ``.NAME.overwrite`` beside it;
      when the block ends without an error the two are swapped and the old run is deleted.
      A crash leaves the old run untouched; ``--overwrite --resume`` continues the new one.

    Only the ``writer`` (rank 0) checks, locks and moves; other ranks get the same path.
    """
    target = Path(target)
    staging = target.absolute().with_name(f".{target.absolute().name}.overwrite")
    work = staging if overwrite else target
    if not writer:
        yield RunDir(work, target)
        return
    with contextlib.ExitStack() as held:
        if overwrite:
            check_replaceable(target, RunDir.INFO, "--output")
            if target.is_dir():  # nobody may be training into the run this one replaces
                held.enter_context(RunLock(target))
            staging.mkdir(parents=True, exist_ok=True)
            held.enter_context(RunLock(staging))
            if not (resume and RunDir(staging).latest_checkpoint()):
                _clear(staging, keep=RunDir.LOCK)
        else:
            if target.exists() and not target.is_dir():
                raise LorafitError(f"--output {target}: is a file; choose a folder")
            if target.is_dir() and any(target.iterdir()) and not resume:
                raise LorafitError(
                    f"{target}: run directory already exists; choose another --output, pass "
                    "--overwrite to replace it, or --resume to continue its training"
                )
            target.mkdir(parents=True, exist_ok=True)
            held.enter_context(RunLock(target))
        _check_writable(work)
        yield RunDir(work, target)
        if overwrite:
            replace_dir(staging, target)


def temp_sibling_write(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
