"""`lorafit doctor`: what this machine has, and what to do about what it lacks."""

from __future__ import annotations

import platform
import shutil
import sys
from dataclasses import dataclass

from lorafit.paths import lorafit_home
from lorafit.rundir import library_versions


@dataclass
class Check:
    name: str
    value: str
    ok: bool = True
    advice: str = ""


def run_checks() -> list[Check]:
    import psutil
    import torch

    from lorafit.errors import LorafitError
    from lorafit.model import cpu_has_bf16
    from lorafit.sources import resolve_source

    versions = library_versions()
    checks = [
        Check(
            "python",
            platform.python_version(),
            sys.version_info >= (3, 11),
            "lorafit needs Python 3.11 or newer",
        )
    ]
    for lib in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes"):
        v = versions.get(lib, "not installed")
        checks.append(Check(lib, v, v != "not installed", f"pip install -e . (reinstalls {lib})"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        checks.append(Check("gpu", f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
    else:
        bf16 = cpu_has_bf16()
        checks.append(
            Check(
                "gpu",
                f"CPU only ({torch.get_num_threads()} threads, "
                f"{'native bf16' if bf16 else 'no native bf16: trains in fp32'})",
                True,
                ""
                if bf16
                else "training works but is slower; a CUDA GPU or a bf16-capable CPU helps",
            )
        )
    ram = psutil.virtual_memory()
    checks.append(
        Check(
            "ram",
            f"{ram.total / 2**30:.1f} GiB total, {ram.available / 2**30:.1f} GiB free",
            ram.available > 3 * 2**30,
            "the demo needs about 3 GiB free",
        )
    )
    home = lorafit_home()
    probe = home if home.exists() else home.parent if home.parent.exists() else None
    free = shutil.disk_usage(probe).free if probe else 0
    checks.append(
        Check(
            "cache",
            f"{home} ({free / 2**30:.1f} GiB free)",
            free > 2 * 2**30,
            "free some disk or set LORAFIT_HOME to a bigger disk (models need ~1 GiB)",
        )
    )
    try:
        src = resolve_source()
        checks.append(Check("embedded model", src.path))
    except LorafitError as e:
        checks.append(Check("embedded model", "missing", False, str(e)))
    return checks
