"""Merge stage: fold the LoRA adapter into the full-precision base; check it.

    lorafit merge runs/demo --output models/demo-merged

The merge always goes into a full-precision (fp32) copy of the base, also for QLoRA runs:
merging into 4-bit weights loses most of the fine-tune. The merged directory loads with
plain transformers (no peft). Parity check: logits of the reloaded merged model vs base +
adapter on a few prompts must agree within ``TOLERANCE``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lorafit.config import ModelSection
from lorafit.errors import LorafitError
from lorafit.inference import chat_prompt, run_settings
from lorafit.model import load_model, load_tokenizer
from lorafit.rundir import ADAPTER_DIR, is_run_dir, write_json
from lorafit.tracking import tracker_for_run

TOLERANCE = 1e-3  # max |logit difference|, fp32
PARITY_PROMPTS = ("What is ATP?", "Explain what you can do.", "What is 2+2?")


def _logits(model, tokenizer, system_prompt):
    import torch

    outs = []
    for q in PARITY_PROMPTS:
        text = tokenizer.apply_chat_template(
            chat_prompt(q, system_prompt), add_generation_prompt=True, tokenize=False
        )
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            outs.append(model(**enc).logits[0].float())
    return outs


def merge(run_dir: str | Path, output: str | Path, overwrite: bool = False) -> dict:
    """Write a standalone merged model to ``output``; return the parity report."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, output = Path(run_dir), Path(output)
    if not is_run_dir(run_dir):
        raise LorafitError(f"{run_dir}: not a finished lorafit run (no run.json + adapter/)")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise LorafitError(f"{output}: already exists; choose another --output or --overwrite")
    base_name, system_prompt = run_settings(run_dir)
    # full precision on CPU, whatever the run trained with (QLoRA included)
    base = load_model(ModelSection(name=base_name, dtype="float32"), device="cpu")
    tokenizer = load_tokenizer(run_dir / ADAPTER_DIR)
    peft_model = PeftModel.from_pretrained(base, run_dir / ADAPTER_DIR).eval()
    expected = _logits(peft_model, tokenizer, system_prompt)
    merged = peft_model.merge_and_unload()
    merged.generation_config.eos_token_id = tokenizer.eos_token_id
    merged.generation_config.pad_token_id = tokenizer.pad_token_id

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        got = _logits(reloaded, tokenizer, system_prompt)
        diff = max(float((a - b).abs().max()) for a, b in zip(expected, got, strict=True))
        report = {
            "run": str(run_dir),
            "base_model": base_name,
            "max_abs_logit_diff": diff,
            "tolerance": TOLERANCE,
            "parity_ok": diff <= TOLERANCE,
            "prompts": list(PARITY_PROMPTS),
            # the system turn the adapter was trained with; `lorafit ask/chat` reuse it
            "system_prompt": system_prompt,
        }
        write_json(tmp / "lorafit_merge.json", report)
        if not report["parity_ok"]:
            raise LorafitError(
                f"merge parity check failed: max |logit diff| {diff:.2e} > {TOLERANCE:.0e}; "
                "the merged model does not reproduce base + adapter, so it was not written"
            )
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(run_dir / "merge.json", {**report, "output": str(output)})
    tracker = tracker_for_run(run_dir)  # lineage: adapter -> merged model
    if tracker is not None:
        tracker.log_metrics({"merge.max_abs_logit_diff": diff})
        tracker.set_tags({"lorafit.merged_dir": str(output.resolve())})
        tracker.log_artifact(output / "lorafit_merge.json", "merge")
    return {**report, "output": str(output)}


def servable_dir(target: str | Path) -> Path:
    """A standalone model directory for ``target``: a run is merged once into RUN/merged."""
    from lorafit.model import resolve_model_dir
    from lorafit.rundir import RUN_FILE

    path = Path(target)
    if path.is_dir() and (path / RUN_FILE).is_file():
        merged = path / "merged"
        if not (merged / "lorafit_merge.json").is_file():
            merge(path, merged, overwrite=True)
        return merged
    return resolve_model_dir(str(target))
