"""Load a base model for training or answering: tokenizer, device and precision,
bitsandbytes quantization, and the LoRA configuration peft attaches.

Where the weights come from (embedded GGUF, local folder, .gguf file, Hub id) is
lorafit.sources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafit.config import LoraSection, ModelSection
from lorafit.errors import LorafitError
from lorafit.sources import resolve_model_dir


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


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> bf16 where the hardware computes it natively, fp16 on older GPUs, else fp32."""
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def quantization_config(cfg: ModelSection):
    """transformers BitsAndBytesConfig for ``cfg.quantization`` (None for 'none')."""
    if cfg.quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        # fp32 offload only where accelerate may spread the model over GPU and CPU: with the
        # whole model on the CPU (device_map {"": "cpu"}) transformers 5.24 would keep every
        # layer "offloaded" in fp32, i.e. not quantize at all
        offload = cfg.device_map == "auto"
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offload)
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


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 / AMX): autocast pays there."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


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

        from lorafit.hooks import register_lora_layer
        from lorafit.lora_layer import FusedLoraLinear

        register_lora_layer(config, torch.nn.Linear, FusedLoraLinear)
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
