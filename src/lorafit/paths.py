"""Where lorafit keeps things: the cache (``$LORAFIT_HOME``) and default run directories."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path


def lorafit_home() -> Path:
    """Cache root: ``$LORAFIT_HOME`` or ``~/.cache/lorafit``."""
    return Path(os.environ.get("LORAFIT_HOME") or Path.home() / ".cache" / "lorafit")


def default_run_dir(prefix: str = "run") -> Path:
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def temp_sibling(path: Path) -> Path:
    """A hidden temp name next to ``path`` for write-then-rename, unique to this process:
    two processes writing the same file (e.g. the ranks of a torchrun job) never share one."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def exclusive_lock(path: Path, wait: bool = True) -> Iterator[int]:
    """Hold an exclusive lock on ``path`` (created if missing) and yield its descriptor.
    Waits while another process holds it (``wait=False``: raises BlockingIOError at once);
    released when the block ends, and by the OS if the process dies."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield fd
    finally:
        os.close(fd)
