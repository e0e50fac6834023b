"""Files lorafit ships inside its package: presets, the example glossary, replay prompts, probes.

They are read through ``importlib.resources``, so an installed lorafit (a wheel, the Docker
image) finds them from any working directory. A config or a command names a shipped file as
``lorafit:NAME``, and a shipped preset by its name:

    lorafit data generate lorafit:glossaries/aviation.yaml --out data/generated
    lorafit estimate tinyllama-qlora-4gb --gpu-memory 4GiB
    lorafit init my-project        # editable copies of the demo preset and the glossary

Imports nothing heavy: the config loader and every stage may use it.
"""

from __future__ import annotations

import atexit
import contextlib
from importlib import resources
from pathlib import Path

from lorafit.errors import LorafitError

SCHEME = "lorafit:"
EXAMPLE_GLOSSARY = "lorafit:glossaries/aviation.yaml"
REPLAY_PROMPTS = "lorafit:replay/general.jsonl"
PROBES = "lorafit:probes/general.jsonl"
DEMO_PRESET = "demo"

# as_file() may extract a file from a zipped install; keep such copies for the whole process
_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def _root():
    return resources.files("lorafit") / "resources"


def available(folder: str) -> list[str]:
    """The shipped files in ``folder`` (e.g. "presets"), by name."""
    entry = _root() / folder
    return sorted(f.name for f in entry.iterdir() if f.is_file()) if entry.is_dir() else []


def shipped(name: str) -> Path:
    """A real file path for the shipped file ``name`` (e.g. "glossaries/aviation.yaml")."""
    entry = _root()
    for part in name.strip("/").split("/"):
        if part in ("", ".", ".."):
            raise LorafitError(f"{SCHEME}{name}: not a shipped file name")
        entry = entry / part
    if not entry.is_file():
        folder = name.rsplit("/", 1)[0] if "/" in name else ""
        known = ", ".join(f"{SCHEME}{folder}/{f}" for f in available(folder)) or "none"
        raise LorafitError(f"{SCHEME}{name}: lorafit ships no such file (shipped: {known})")
    return Path(_extracted.enter_context(resources.as_file(entry)))


def resolve(value: str | Path) -> Path:
    """``lorafit:NAME`` -> the shipped file; anything else is a path as given."""
    text = str(value)
    if text.startswith(SCHEME):
        return shipped(text.removeprefix(SCHEME))
    return Path(value)


def preset(name: str | Path) -> Path:
    """A config file: a path that exists, ``lorafit:presets/X.yaml``, or a preset name ("demo")."""
    path = Path(name)
    if str(name).startswith(SCHEME) or path.is_file():
        return resolve(name)
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    where = path.parent == Path(".") or path.parent.name == "configs"
    if where and f"{stem}.yaml" in available("presets"):
        return shipped(f"presets/{stem}.yaml")
    names = ", ".join(p.removesuffix(".yaml") for p in available("presets"))
    raise LorafitError(f"{name}: config file not found (shipped presets: {names})")


STARTER_CONFIG = "lorafit.yaml"
STARTER_GLOSSARY = "glossary.yaml"


def init_project(folder: str | Path) -> list[Path]:
    """``lorafit init``: an editable copy of the demo preset (``lorafit.yaml``) and of the
    example glossary (``glossary.yaml``) in ``folder``; existing files are never replaced."""
    folder = Path(folder)
    config, glossary = folder / STARTER_CONFIG, folder / STARTER_GLOSSARY
    clash = [str(p) for p in (config, glossary) if p.exists()]
    if clash:
        raise LorafitError(f"{', '.join(clash)}: already there; lorafit init never replaces files")
    text = preset(DEMO_PRESET).read_text(encoding="utf-8")
    line = f"glossary: {EXAMPLE_GLOSSARY}  # shipped with lorafit"
    if line not in text:
        raise LorafitError(f"the shipped demo preset lacks the line {line!r}")
    text = text.replace(line, f"glossary: {STARTER_GLOSSARY}  # relative to the working directory")
    folder.mkdir(parents=True, exist_ok=True)
    glossary.write_bytes(resolve(EXAMPLE_GLOSSARY).read_bytes())
    config.write_text(text, encoding="utf-8")
    return [config, glossary]
