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


def process_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun / accelerate launch; (0, 1) in a plain process."""
    import os

    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def training_device(world_size: int) -> str:
    """This process's device: its own GPU under torchrun, else the best one there is."""
    import os

    from lorafit.model import best_device

    device = best_device()
    if device == "cuda" and world_size > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def rank_agreement(model, history: list[dict], world_size: int) -> dict | None:
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
