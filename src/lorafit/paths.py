"""Where lorafit keeps things: the cache (``$LORAFIT_HOME``) and default run directories."""

from __future__ import annotations

import os
import time
from pathlib import Path


def lorafit_home() -> Path:
    """Cache root: ``$LORAFIT_HOME`` or ``~/.cache/lorafit``."""
    return Path(os.environ.get("LORAFIT_HOME") or Path.home() / ".cache" / "lorafit")


def default_run_dir(prefix: str = "run") -> Path:
    return Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
