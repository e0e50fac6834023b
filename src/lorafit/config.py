"""Typed configuration: every default in one place, loaded from one YAML file.

Precedence: defaults < YAML file < command-line flags / ``--set section.key=value``.
Unknown keys and wrong types are errors that name the key.

    lorafit train configs/demo.yaml --set train.max_steps=20 --set lora.r=8
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorafit.errors import LorafitError
from lorafit.shipped import preset

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
# The kinds of question lorafit.data.kinds generates, and how many per glossary term of each,
# in training and held out (see README for the measurements behind them).
KINDS = ("define", "expand", "reverse", "followup", "compare", "variant")
TRAIN_KINDS = {"define": 4, "expand": 4, "reverse": 8, "followup": 3, "compare": 2, "variant": 4}
EVAL_KINDS = {"define": 2, "expand": 1, "reverse": 1, "followup": 1, "compare": 1, "variant": 1}
# Only base answers that end within this many tokens are replayed: long answers cost the most
# training time per row and are mostly the base model's rambling arithmetic (measured on the
# demo, see README).
REPLAY_MAX_NEW_TOKENS = 32


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field(
        DEFAULT_MODEL,
        description="Model source: 'embedded:smollm2-135m-instruct', a local HF directory, "
        "a local .gguf file, or a Hugging Face Hub id (needs internet).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Dtype the base weights are held in. float32 + bf16 autocast is fastest on CPU.",
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="bitsandbytes quantization of the frozen base (QLoRA: 4bit = NF4)."
    )
    device_map: str | None = Field(
        None,
        description="None = one device (CUDA if present, else CPU); 'auto' lets "
        "accelerate spread layers over GPU and CPU.",
    )
    gpu_memory: str | None = Field(
        None, description="GPU budget for device_map=auto offloading, e.g. '3.5GiB'."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a Hub model. Off unless you trust it."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    allow_pickle: bool = Field(
        False,
        description="Load pickle weights (.bin/.pt) when a model has no safetensors. Pickles "
        "can run code: only for files you trust.",
    )


class LoraSection(_Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules that get adapters; 'all-linear' = every linear "
        "layer except the LM head (learns far more than q/v only; see README).",
    )
    top_layers: int | None = Field(
        None,
        gt=0,
        description="Adapt only the top N decoder layers (None: all). Backward then stops "
        "below them: faster and less memory, but it learns less per epoch (see README).",
    )


class DataSection(_Section):
    glossary: str | None = Field(
        None,
        description="Glossary file the demo generates its training data from "
        "(lorafit:glossaries/aviation.yaml is the shipped example).",
    )
    train: str | None = Field(None, description="Training file (JSONL/JSON, format detected).")
    eval: str | None = Field(None, description="Held-out evaluation file.")
    max_length: int = Field(256, gt=8, description="Examples longer than this are truncated.")
    system_prompt: str | None = Field(
        None,
        description="System turn added to every example; None keeps the chat "
        "template's own default (the same one used when you chat with the model).",
    )
    seed: int = Field(0, description="Seed for data generation (phrasing choice, ordering).")
    replay: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Share of self-generated general examples mixed into training (the base "
        "model's own answers to the shipped general prompts), so the tuned model keeps its general "
        "abilities; 0 turns it off.",
    )
    replay_kl: float = Field(
        2.0,
        ge=0,
        description="Weight of a KL term that keeps the tuned model's next-token distributions "
        "on replay answers close to the base model's (its top 64 tokens, stored at data "
        "preparation; measured on the demo: 3 general probes regress instead of 11 at 1.0; "
        "2.0 keeps the probes at the base model's level with a replay share of 0.2 instead of "
        "0.3); 0 trains on the replay answers' tokens only.",
    )
    unknown_terms: int | None = Field(
        None,
        ge=0,
        description="Made-up terms answered 'I don't know' in data generated from a glossary "
        "(teaches the model not to invent entries); default two per glossary term, a small "
        "glossary up to 24 (never more than four per term).",
    )
    replay_max_tokens: int = Field(
        REPLAY_MAX_NEW_TOKENS,
        gt=0,
        description="Replay only base answers that end within this many tokens (longer ones "
        "cost more training time than they protect).",
    )
    kinds: dict[str, int] = Field(
        default_factory=lambda: dict(TRAIN_KINDS),
        description="Training questions per glossary term of each kind (define, expand, "
        "reverse, followup, compare, variant; see lorafit.data.kinds); kinds not named keep "
        "their default, 0 turns one off.",
    )
    eval_kinds: dict[str, int] = Field(
        default_factory=lambda: dict(EVAL_KINDS),
        description="Held-out questions per glossary term of each kind, scored by kind.",
    )
    replay_prompts: str | None = Field(
        None,
        description="JSONL of {prompt} for replay (None: the shipped general set, "
        "lorafit:replay/general.jsonl).",
    )

    @field_validator("kinds", "eval_kinds", mode="before")
    @classmethod
    def _known_kinds(cls, value, info):
        if not isinstance(value, dict):
            raise ValueError("expected a mapping of question kind to a count, e.g. {reverse: 3}")
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown question kind(s) {unknown}; kinds: {', '.join(KINDS)}")
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in value.values()):
            raise ValueError("each count must be a whole number >= 0")
        defaults = TRAIN_KINDS if info.field_name == "kinds" else EVAL_KINDS
        return {**defaults, **value}


class TrainSection(_Section):
    epochs: float = Field(2.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(
        -1, description="Stop after this many optimizer steps (-1 = use epochs)."
    )
    min_steps: int = Field(
        60,
        ge=0,
        description="A dataset too small for this many optimizer steps over `epochs` is "
        "repeated until it has them (0 = off; ignored with max_steps): a few steps teach "
        "a small glossary almost nothing.",
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (LoRA tolerates high rates).")
    batch_size: int = Field(
        8,
        gt=0,
        description="Examples per forward pass (per device). Memory grows with rows x "
        "length; 8 x 2 is safe for rows up to max_length. With short rows 16 x 1 is faster "
        "for more memory "
        "(configs/demo.yaml uses it).",
    )
    grad_accumulation: int = Field(2, gt=0, description="Micro-batches per optimizer step.")
    loraplus_lr_ratio: float = Field(
        1.0,
        ge=1.0,
        description="LoRA+: the learning rate of LoRA's B matrices is train.lr times this "
        "(1 = plain LoRA).",
    )
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Share of steps warming up.")
    weight_decay: float = Field(0.0, ge=0.0)
    seed: int = Field(42, description="Seed for initialisation and data order.")
    shuffle: bool = Field(
        True, description="Shuffle the training rows each epoch (false: the file's order)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, slower."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto = bf16 autocast where the hardware has it, else fp32 "
        "(fp16 on older GPUs).",
    )
    padding_free: bool = Field(
        True,
        description="Pack each batch into one row with position ids instead of padding: "
        "no compute wasted on pad tokens; examples still cannot attend to each other.",
    )
    shared_prefix: bool = Field(
        True,
        description="Run the prefix every packed row shares (system prompt, start of the "
        "user turn) once per batch instead of once per row; same loss and gradients, "
        "checked on the first batch. Needs padding_free and no gradient checkpointing.",
    )
    logging_steps: int = Field(1, gt=0)
    save_steps: int = Field(50, gt=0, description="Checkpoint every N optimizer steps.")
    eval_loss_rows: int = Field(
        32, gt=0, description="Held-out rows used for the eval-loss curve during training."
    )
    eval_steps: int | None = Field(
        None, description="Evaluate loss every N steps (None = once per epoch)."
    )


class TrackingSection(_Section):
    enabled: bool = Field(True, description="Log runs to MLflow when it is installed.")
    uri: str | None = Field(None, description="MLflow tracking URI (default: local sqlite).")
    experiment: str = "lorafit"


class EvalSection(_Section):
    max_new_tokens: int = Field(64, gt=0, description="Answer length bound for eval.")
    batch_size: int = Field(48, gt=0, description="Prompts generated together (greedy).")
    limit: int | None = Field(None, description="Evaluate only the first N prompts.")
    cache_base_answers: bool = Field(
        True,
        description="Reuse the base model's answers (evaluation and replay) from earlier runs "
        "on the same base, prompts and settings, or shipped with lorafit for the embedded "
        "model on this kind of machine (they do not change; cached in "
        "$LORAFIT_HOME/answers). false: compute every one.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Precision eval's answers are computed in (autocast over float32 "
        "weights; quantized or half-precision weights keep their own): auto = as "
        "train.precision auto resolves, bf16 where the hardware has it natively (about 2x "
        "faster on such CPUs), fp16 on older GPUs, else fp32; fp32 = full precision (a "
        "near-tie can tip the other way: 5 of 444 demo answers differed).",
    )


class Config(_Section):
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    tracking: TrackingSection = TrackingSection()
    output_dir: str | None = Field(None, description="Run directory (default: runs/<timestamp>).")


def _parse_value(raw: str) -> Any:
    """Parse a --set value the way YAML would ('3' -> 3, 'true' -> True, '[a, b]' -> list)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``value`` at ``dotted`` in a nested dict after checking the key path exists."""
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise LorafitError(f"--set {dotted!r}: empty key")
    node: Any = Config
    for i, part in enumerate(parts):
        if get_origin(node) is dict and i == len(parts) - 1:
            break  # a key inside a mapping field such as data.kinds
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            known = ", ".join(sorted(fields)) if fields else "(none: it is a value)"
            raise LorafitError(f"--set {dotted}: unknown key {part!r}; known keys here: {known}")
        node = fields[part].annotation
    target = data
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise LorafitError(f"--set {dotted}: {part!r} is not a section")
    target[parts[-1]] = value


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` (value parsed as YAML: 3, 5e-4, true, [a, b])."""
    if "=" not in assignment:
        raise LorafitError(f"--set {assignment!r}: expected section.key=value, e.g. train.lr=5e-4")
    dotted, raw = assignment.split("=", 1)
    _set_path(data, dotted, _parse_value(raw))


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; see `lorafit config --help`)")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> Config:
    """Build the config: defaults < YAML ``path`` < ``overrides`` (``a.b=v``) < ``flags``.

    ``flags`` maps dotted keys to values from dedicated CLI options; None values are skipped.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        path = preset(path)  # a file, or a shipped preset ("demo", configs/demo.yaml installed)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise LorafitError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise LorafitError(f"{path}: expected a mapping of sections (model:, train:, ...)")
        data = loaded or {}
    for assignment in overrides or []:
        apply_override(data, assignment)
    for dotted, value in (flags or {}).items():
        if value is not None:  # flags are typed already: set as-is (a path stays a string)
            _set_path(data, dotted, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise LorafitError(_format_validation_error(e, source)) from e


def dump_config(config: Config) -> str:
    """The resolved config as YAML (what a run directory stores)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
