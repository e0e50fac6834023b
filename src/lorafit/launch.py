"""`lorafit train --nproc N`: start the same command under PyTorch's own launcher (torchrun).

No home-made process management: torchrun spawns the workers, sets RANK/WORLD_SIZE/LOCAL_RANK,
does the rendezvous across machines, and tears every worker down when one fails.
"""

from __future__ import annotations

import logging
import subprocess
import sys

from lorafit.errors import LorafitError

log = logging.getLogger(__name__)
LAUNCHER_OPTIONS = ("--nproc", "--nnodes", "--rdzv-endpoint")


def strip_launcher_options(argv: list[str]) -> list[str]:
    """The user's command line without the options that only the launcher understands."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in LAUNCHER_OPTIONS:
            skip = True
            continue
        if arg.split("=", 1)[0] in LAUNCHER_OPTIONS:
            continue
        out.append(arg)
    return out


def torchrun_command(
    argv: list[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None
) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise LorafitError(
                "--nnodes > 1 needs --rdzv-endpoint HOST:PORT (a machine and port every node can "
                "reach); run the same command on every machine"
            )
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        cmd.append("--standalone")
    return [*cmd, "-m", "lorafit", *strip_launcher_options(argv)]


def launch_torchrun(argv: list[str], nproc: int, nnodes: int = 1, rdzv: str | None = None) -> int:
    cmd = torchrun_command(argv, nproc, nnodes, rdzv)
    log.info("starting: %s", " ".join(cmd[1:]))
    return subprocess.call(cmd)
