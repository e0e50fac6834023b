"""A run directory describes itself: config, model source, data hashes, versions, metrics.

Layout written by ``lorafit train``:
    config.yaml      the resolved config (defaults < YAML < flags)
    run.json         status, base model source, dataset hashes/rows, library versions, results
    metrics.jsonl    one line per logged step (loss, eval_loss, lr, tokens/s)
    loss.png         train/eval loss curves
    adapter/         LoRA adapter (safetensors) + tokenizer
    checkpoints/     resumable trainer checkpoints
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError
from lorafit.paths import exclusive_lock, temp_sibling

RUN_FILE = "run.json"
ADAPTER_DIR = "adapter"
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


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RUN_FILE).is_file() and (Path(path) / ADAPTER_DIR).is_dir()


def prepare_run_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create ``path`` for a new run; refuse to clobber an existing one unless told to."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not resume:
        if not overwrite:
            raise LorafitError(
                f"{path}: run directory already exists; choose another --output, pass "
                "--overwrite to replace it, or --resume to continue its training"
            )
        if (path / RUN_FILE).is_file() or (path / "config.yaml").is_file():
            shutil.rmtree(path)
        else:
            raise LorafitError(f"{path}: exists and is not a lorafit run; refusing to delete it")
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".write-test"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise LorafitError(f"{path}: cannot write to the run directory ({e.strerror})") from e
    return path


class RunLock:
    """An exclusive lock file: a second run pointed at the same directory refuses to start."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._held = contextlib.ExitStack()

    def __enter__(self) -> RunLock:
        try:
            fd = self._held.enter_context(exclusive_lock(self.path, wait=False))
        except BlockingIOError:
            raise LorafitError(
                f"{self.path.parent}: another lorafit process is training into this directory"
            ) from None
        os.write(fd, str(os.getpid()).encode())
        self._held.callback(self.path.unlink, missing_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self._held.close()
