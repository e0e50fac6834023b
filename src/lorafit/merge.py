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

from lorafit.errors import LorafitError
from lorafit.inference import chat_prompt, run_base
from lorafit.model import load_model, load_tokenizer
from lorafit.paths import check_replaceable, refuse_unsafe_target, replace_dir
from lorafit.rundir import MERGE_INFO, RunDir, write_json
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


def merge(
    run_dir: str | Path, output: str | Path, overwrite: bool = False, store: str | None = None
) -> dict:
    """Write a standalone merged model to ``output``; return the parity report.

    ``output`` is written whole in a temp folder and swapped in only after the parity check;
    ``overwrite`` replaces only a merged model lorafit wrote (it holds lorafit_merge.json),
    never the working or home directory or a folder that holds the run.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, output = RunDir.existing(run_dir), Path(output)
    refuse_unsafe_target(output, "--output", (run.path,))
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not overwrite:
            raise LorafitError(f"{output}: already exists; choose another --output or --overwrite")
        check_replaceable(output, MERGE_INFO, "--output", (run.path,))
    base, system_prompt = run_base(run)
    # full precision on CPU, whatever the run trained with (QLoRA included)
    model = load_model(base.section(dtype="float32"), base.dir, device="cpu")
    tokenizer = load_tokenizer(run.adapter_dir)
    peft_model = PeftModel.from_pretrained(model, run.adapter_dir).eval()
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
            "run": str(run.path.resolve()),
            "base_model": base.name,
            "max_abs_logit_diff": diff,
            "tolerance": TOLERANCE,
            "parity_ok": diff <= TOLERANCE,
            "prompts": list(PARITY_PROMPTS),
            # the system turn the adapter was trained with; `lorafit ask/chat` reuse it
            "system_prompt": system_prompt,
        }
        write_json(tmp / MERGE_INFO, report)
        if not report["parity_ok"]:
            raise LorafitError(
                f"merge parity check failed: max |logit diff| {diff:.2e} > {TOLERANCE:.0e}; "
                "the merged model does not reproduce base + adapter, so it was not written"
            )
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(run.merge_report, {**report, "output": str(output)})
    tracker = tracker_for_run(run.path, store)  # lineage: adapter -> merged model
    if tracker is not None:
        tracker.log_metrics({"merge.max_abs_logit_diff": diff})
        tracker.set_tags({"lorafit.merged_dir": str(output.resolve())})
        tracker.log_artifact(output / MERGE_INFO, "merge")
    return {**report, "output": str(output)}


def servable_dir(target: str | Path) -> Path:
    """A standalone model directory for ``target``: a run is merged once into RUN/merged."""
    from lorafit.sources import resolve_model_dir

    if RunDir.holds_run(target):
        run = RunDir.existing(target)
        if not (run.merged_dir / MERGE_INFO).is_file():
            merge(run.path, run.merged_dir, overwrite=True)
        return run.merged_dir
    return resolve_model_dir(str(target))
