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


# --- replacing an output that lorafit wrote ------------------------------------------------


def _protected() -> dict[Path, str]:
    return {
        Path("/"): "the root directory",
        Path.home().resolve(): "your home directory",
        Path.cwd().resolve(): "the working directory",
    }


def refuse_unsafe_target(target: Path, option: str, sources: tuple[Path, ...] = ()) -> None:
    """Refuse an output that replacing would destroy more than a lorafit output: the working
    directory, the home directory, ``/`` (or a folder holding one of them), and a source of
    the command or any folder that holds it."""
    from lorafit.errors import LorafitError

    resolved = target.resolve()
    for path, name in _protected().items():
        if resolved == path or resolved in path.parents:
            raise LorafitError(
                f"{option} {target}: that is {'' if resolved == path else 'a folder holding '}"
                f"{name}; lorafit never replaces it. Choose a folder of its own, e.g. "
                f"{option} runs/my-output"
            )
    for source in sources:
        held = source.resolve()
        if resolved == held or resolved in held.parents:
            raise LorafitError(
                f"{option} {target}: that folder holds {source}, which this command reads; "
                "choose another output folder"
            )


def check_replaceable(target: Path, marker: str, option: str, sources=()) -> None:
    """Before ``--overwrite`` replaces ``target``: it must be safe (``refuse_unsafe_target``)
    and, when it holds anything, hold ``marker``, the file lorafit writes into every such
    output. A folder without it was not written by lorafit, and lorafit does not delete it."""
    from lorafit.errors import LorafitError

    recover_replaced(target)
    refuse_unsafe_target(target, option, tuple(sources))
    if target.exists() and not target.is_dir():
        raise LorafitError(f"{option} {target}: is a file, not a folder; choose another")
    if target.is_dir() and any(target.iterdir()) and not (target / marker).is_file():
        raise LorafitError(
            f"{option} {target}: this folder was not written by lorafit (it has no {marker}), "
            "so --overwrite will not delete it; move it away yourself or choose another folder"
        )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return done == 0


def _aside(target: Path) -> Path:
    absolute = target.absolute()  # "." has no name of its own
    return absolute.with_name(f".{absolute.name}.replaced")


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target``, then delete what was there.

    The two are swapped in one atomic step where the OS can (Linux): a crash at any moment
    leaves either the old or the new folder at ``target``. Elsewhere the old one is renamed
    aside first (``recover_replaced`` puts it back if a crash hit between the two renames).
    """
    import shutil

    if not target.exists():
        new.rename(target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)  # it now holds the old folder
        return
    aside = _aside(target)
    shutil.rmtree(aside, ignore_errors=True)
    target.rename(aside)
    new.rename(target)
    shutil.rmtree(aside)


def recover_replaced(target: Path) -> None:
    """Undo a ``replace_dir`` that crashed between its two renames (non-Linux only)."""
    aside = _aside(target)
    if aside.is_dir() and not target.exists():
        aside.rename(target)
