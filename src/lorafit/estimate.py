"""Memory planner: predict a training run's peak memory from the model's config alone.

    lorafit estimate configs/tinyllama-qlora-4gb.yaml --gpu-memory 4GiB

Reads only config.json (or the embedded model's materialized config): no weights are loaded.
The peak is the sum of
- weights: frozen base by quantization (fp32/bf16, 8-bit rows + scales, 4-bit NF4 blocks with
  double-quantized scales); embeddings, norms and the LM head stay in the compute dtype;
- LoRA: adapter weights, gradients and two AdamW moments, all fp32 (16 bytes per parameter);
- activations kept for the backward pass, per token and layer (inputs of the norms and linear
  layers, q/k/v, attention probabilities, the MLP's four intermediate vectors), or only the
  layer inputs plus one layer when gradient checkpointing is on;
- logits: vocabulary x positions x 3 (logits, log-softmax, gradient) in fp32; lorafit computes
  the LM head on answer positions only (``ANSWER_SHARE`` of the tokens);
- overhead: on CPU the Python/torch/transformers process itself; on CUDA the allocator's slack.
The CPU constants were fitted to measured peak RSS of the embedded model (see README).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lorafit.config import Config

GiB = 2**30
CPU_PROCESS_BYTES = (
    0.9 * GiB
)  # python + torch + transformers + trl + peft + datasets, measured 0.8-1.0
CUDA_CONTEXT_BYTES = 0.45 * GiB  # CUDA context + cuBLAS workspace (outside the allocator)
ALLOCATOR_SLACK = 1.10  # caching allocator / fragmentation
ANSWER_SHARE = 0.45  # share of positions that are answer tokens in chat-formatted Q/A data
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer in one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def params(self) -> dict[str, int]:
        linear = self.layers * sum(a * b for a, b in self.linears().values())
        embed = self.vocab * self.hidden
        return {
            "linear": linear,
            "embedding": embed,
            "lm_head": 0 if self.tied else embed,
            "norms": self.hidden * (2 * self.layers + 1),
        }


def shape_from_config(cfg) -> ModelShape:
    heads = cfg.num_attention_heads
    return ModelShape(
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        layers=cfg.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        vocab=cfg.vocab_size,
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
    )


def load_shape(config: Config) -> tuple[ModelShape, str]:
    """The model's shape from its config.json only (a Hub model: one small download)."""
    from transformers import AutoConfig

    from lorafit.sources import hub_config, materialize_gguf, resolve_source

    source = resolve_source(config.model.name)
    if source.kind == "hub":  # cache, then the copy shipped for presets, then the network
        hf = hub_config(source, config.model.revision, config.model.trust_remote_code)
    else:
        target = source.path
        if source.kind in ("embedded", "gguf"):
            target = str(materialize_gguf(source.path))
        hf = AutoConfig.from_pretrained(target, trust_remote_code=config.model.trust_remote_code)
    dtype = str(getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or "float32")
    return shape_from_config(hf), dtype.removeprefix("torch.")


@dataclass
class Estimate:
    device: str
    weights_bytes: int
    lora_bytes: int
    activation_bytes: int
    logits_bytes: int
    overhead_bytes: int
    lora_params: int
    total_params: int
    tokens_per_step: int
    gpu_peak_bytes: int = 0
    cpu_peak_bytes: int = 0
    budget_bytes: int | None = None
    fits: bool | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_bytes(text: str) -> int:
    """'4GiB', '3.5GB', '512MiB', '4000000000' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    t = text.strip().lower().replace(" ", "")
    for unit, scale in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    return int(float(t))


def lora_params(shape: ModelShape, r: int, targets: str | list[str]) -> int:
    names = shape.linears()
    chosen = list(names) if targets == "all-linear" else [t for t in targets if t in names]
    return shape.layers * sum(r * (names[n][0] + names[n][1]) for n in chosen)


def weight_bytes(shape: ModelShape, quantization: str, dtype_bytes: int) -> int:
    p = shape.params()
    rest = (p["embedding"] + p["lm_head"] + p["norms"]) * dtype_bytes
    if quantization == "4bit":  # NF4: half a byte, 64-value blocks, double-quantized absmax
        per_param = 0.5 + 1 / 64 + 4 / (64 * 256)
    elif quantization == "8bit":  # int8 rows + one fp32 scale per row (~1 byte)
        per_param = 1.0 + 4 / shape.hidden
    else:
        per_param = dtype_bytes
    return int(p["linear"] * per_param + rest)


def activation_elements_per_token(shape: ModelShape, seq_len: int, r: int, checkpointing: bool):
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    per_layer = 7 * h + 3 * kv + 4 * i + shape.heads * seq_len + 7 * r
    if checkpointing:  # layer inputs kept; one layer's activations rebuilt during backward
        return shape.layers * h + per_layer
    return shape.layers * per_layer


def longest_row(config: Config) -> int | None:
    """Longest training row in tokens (chat template applied), when data.train exists."""
    from pathlib import Path

    if not config.data.train or not Path(config.data.train).is_file():
        return None
    from lorafit.data.formats import read_dataset
    from lorafit.data.tokenize import tokenize_all
    from lorafit.model import load_tokenizer
    from lorafit.sources import resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir(config.model.name, config.model.revision))
    examples = read_dataset(config.data.train).examples
    rows, _ = tokenize_all(tokenizer, examples, config.data.max_length, config.data.system_prompt)
    return max(len(r.input_ids) for r in rows) if rows else None


def estimate(
    config: Config,
    shape: ModelShape,
    device: str,
    model_dtype: str = "float32",
    seq_len: int | None = None,
) -> Estimate:
    t, lora = config.train, config.lora
    compute = "float32"
    if device == "cuda" or config.train.precision in ("bf16", "fp16"):
        compute = "bfloat16"
    if config.model.dtype != "auto":
        weights_dtype = config.model.dtype
    else:
        weights_dtype = model_dtype if device == "cuda" else "float32"
    seq = min(seq_len or config.data.max_length, config.data.max_length)
    tokens = t.batch_size * seq
    w = weight_bytes(shape, config.model.quantization, DTYPE_BYTES.get(weights_dtype, 4))
    lp = lora_params(shape, lora.r, lora.target_modules)
    act_elems = activation_elements_per_token(shape, seq, lora.r, t.gradient_checkpointing)
    act = int(tokens * act_elems * DTYPE_BYTES[compute])
    logits = int(tokens * ANSWER_SHARE * shape.vocab * 4 * 3)
    total_params = sum(shape.params().values())
    e = Estimate(
        device=device,
        weights_bytes=w,
        lora_bytes=16 * lp,
        activation_bytes=act,
        logits_bytes=logits,
        overhead_bytes=0,
        lora_params=lp,
        total_params=total_params,
        tokens_per_step=tokens,
    )
    working = e.weights_bytes + e.lora_bytes + e.activation_bytes + e.logits_bytes
    if device == "cuda":
        e.overhead_bytes = int(working * (ALLOCATOR_SLACK - 1) + CUDA_CONTEXT_BYTES)
        e.gpu_peak_bytes = working + e.overhead_bytes
        # the host keeps a copy of the weights while loading, plus the process itself
        e.cpu_peak_bytes = int(CPU_PROCESS_BYTES + e.weights_bytes)
        e.notes.append(
            f"GPU peak includes ~{CUDA_CONTEXT_BYTES / GiB:.2f} GiB CUDA context outside "
            "torch.cuda.max_memory_allocated"
        )
    else:
        e.overhead_bytes = int(CPU_PROCESS_BYTES + working * (ALLOCATOR_SLACK - 1))
        e.cpu_peak_bytes = working + e.overhead_bytes
    if seq_len:
        e.notes.append(f"sequence length {seq}: the longest row of data.train (worst batch)")
    else:
        e.notes.append(
            f"sequence length = data.max_length ({seq}): no data.train to measure rows on, so "
            "this is the worst case"
        )
    return e


def check_budget(e: Estimate, budget: int | None) -> Estimate:
    if budget is None:
        return e
    peak = e.gpu_peak_bytes if e.device == "cuda" else e.cpu_peak_bytes
    e.budget_bytes, e.fits = budget, peak <= budget
    return e


def proposals(
    config: Config,
    shape: ModelShape,
    device: str,
    budget: int,
    dtype: str,
    seq_len: int | None = None,
) -> list[dict]:
    """Settings changes that fit ``budget``, cheapest loss of speed/quality first."""
    t = config.train
    candidates: list[dict[str, Any]] = []
    for bs in (t.batch_size // 2, t.batch_size // 4, 1):
        if 1 <= bs < t.batch_size:
            accum = math.ceil(t.batch_size * t.grad_accumulation / bs)
            candidates.append({"train.batch_size": bs, "train.grad_accumulation": accum})
    candidates.append({"train.gradient_checkpointing": True})
    if config.model.quantization == "none":
        candidates.append({"model.quantization": "8bit"})
        candidates.append({"model.quantization": "4bit"})
    candidates.append(
        {
            "model.quantization": "4bit",
            "train.gradient_checkpointing": True,
            "train.batch_size": 1,
            "train.grad_accumulation": t.batch_size * t.grad_accumulation,
        }
    )
    for length in (config.data.max_length // 2,):
        if length >= 64:
            candidates.append({"data.max_length": length})
    fitting = []
    for change in candidates:
        trial = apply(config, change)
        e = check_budget(estimate(trial, shape, device, dtype, seq_len), budget)
        if e.fits:
            peak = e.gpu_peak_bytes if device == "cuda" else e.cpu_peak_bytes
            fitting.append({"set": change, "peak_bytes": peak})
    return fitting


def apply(config: Config, change: dict[str, Any]) -> Config:
    data = config.model_dump()
    for key, value in change.items():
        section, name = key.split(".", 1)
        data[section][name] = value
    return Config.model_validate(data)


@dataclass
class Planned:
    """What ``lorafit estimate`` shows: the estimate, and the changes that would fit a budget."""

    config: Config
    estimate: Estimate
    proposals: list[dict] = field(default_factory=list)


def plan(config: Config, budget: str | None = None, device: str | None = None) -> Planned:
    """Estimate ``config``'s peak memory on ``device`` (default: this machine's best); with a
    ``budget`` (e.g. "4GiB"), whether it fits and which setting changes would."""
    from lorafit.model import best_device

    shape, dtype = load_shape(config)
    seq = longest_row(config)
    device = device or best_device()
    limit = parse_bytes(budget) if budget else None
    e = check_budget(estimate(config, shape, device, dtype, seq), limit)
    fixes = proposals(config, shape, device, limit, dtype, seq) if limit and not e.fits else []
    return Planned(config, e, fixes)


def auto_fit(config: Config, budget: str | None) -> tuple[Config, str]:
    """``train --auto-fit``: ``config`` unchanged when it fits ``budget``, else with the first
    setting change that fits; and a line saying which."""
    from lorafit.errors import LorafitError

    if not budget:
        raise LorafitError("--auto-fit needs --gpu-memory (the budget to fit), e.g. 4GiB")
    planned = plan(config, budget)
    if planned.estimate.fits:
        return config, f"estimate fits {budget}: settings unchanged"
    if not planned.proposals:
        raise LorafitError(
            f"no setting change lorafit knows makes this run fit {budget}; see `lorafit "
            "estimate` for the breakdown (a smaller model or more memory is needed)"
        )
    first = planned.proposals[0]
    change = ", ".join(f"{k}={v}" for k, v in first["set"].items())
    return apply(config, first["set"]), (
        f"auto-fit: {change} (estimated peak {first['peak_bytes'] / GiB:.2f} GiB <= {budget})"
    )
