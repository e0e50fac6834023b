"""Evaluate stage: base vs tuned model on held-out prompts.

    lorafit eval runs/demo --data data/generated/eval.jsonl

How ``accuracy`` is judged: lorafit.judge (key-word recall against the reference answer).
``rouge_l`` is the ROUGE-L F1 (longest common subsequence of words).
``stop_rate`` is the share of answers that ended with the end-of-turn token by themselves.
``refusal_rate`` is the share of held-out answers that decline ("I don't know that term"):
over-refusal, the risk of teaching refusals for made-up terms.

General ability (``general_accuracy``): the shipped probe set ``lorafit:probes/general.jsonl``
(arithmetic, geography, units, common sense, science, simple instructions) is answered by
both models; a probe is right when one of its accepted answers appears as a whole word or
phrase. Probes the base model got right and the tuned model got wrong are listed as
regressions: the forgetting a fine-tune caused.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from lorafit.answer_cache import cached_answers, model_key
from lorafit.config import EvalSection
from lorafit.data.formats import jsonl_lines, read_dataset, write_jsonl
from lorafit.data.kinds import KINDS
from lorafit.data.tokenize import with_system
from lorafit.errors import LorafitError
from lorafit.inference import (
    applied_precision,
    chat_prompt,
    generate,
    is_quantized,
    load_for_inference,
)
from lorafit.judge import KEY_RECALL, judge, judge_kind, probe_correct, refuses, rouge_l
from lorafit.model import resolve_precision
from lorafit.report import render as render_html
from lorafit.report import report_md
from lorafit.rundir import RunDir, write_json
from lorafit.shipped import PROBES, resolve
from lorafit.tracking import flatten, tracker_for_run

PROBE_MAX_NEW_TOKENS = 32  # probe answers are a word or a short sentence
DEFAULT_PROBES = PROBES


def unknown_rows(examples, base, tuned):
    rows = [
        {
            "prompt": e.prompt[-1]["content"],
            "base": b,
            "tuned": t,
            "base_refused": refuses(b),
            "tuned_refused": refuses(t),
        }
        for e, (b, _), (t, _) in zip(examples, base, tuned, strict=True)
    ]
    n = max(len(rows), 1)
    return (
        rows,
        1 - sum(r["base_refused"] for r in rows) / n,
        1 - sum(r["tuned_refused"] for r in rows) / n,
    )


def read_probes(path: str | Path) -> list[dict]:
    rows = []
    path = resolve(path)
    for lineno, line in enumerate(jsonl_lines(path.read_text(encoding="utf-8")), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str) or not isinstance(row.get("answers"), list):
                raise LorafitError(f"{path}:{lineno}: a probe needs 'prompt' and 'answers' (list)")
            rows.append(row)
    return rows


def answer_sets(
    loaded,
    jobs: list[tuple[list, int]],
    batch_size: int,
    progress=None,
    base_record=None,
    precision: str = "fp32",
    sources=None,
):
    """[(base answers, tuned answers)] for each (prompts, max_new_tokens) job, computed in
    ``precision`` (lorafit.inference.autocast_for).

    ``progress(done, total)`` is called after every generated batch; ``sources`` (a Counter)
    counts where the base answers came from: shipped, cached or computed.

    Every base answer comes first (adapter disabled), from lorafit.answer_cache where an
    earlier run on the same base already gave it, or lorafit ships it for this machine kind (``base_record``: run.json's
    base_model; None: no cache). The tuned answers then run with the adapter merged into the
    weights, which generates faster than LoRA's extra matmuls per layer. Quantized bases keep
    the adapter separate (merging into 4/8-bit weights is lossy).
    """
    model, tok = loaded.model, loaded.tokenizer
    if progress is not None:  # progress(answers done, answers in all): base and tuned
        total, done = 2 * sum(len(p) for p, _ in jobs), [0]

        def advance(n: int, report=progress) -> None:
            done[0] += n
            report(done[0], total)

        progress = advance
    with model.disable_adapter():
        key = model_key(base_record, model, precision) if base_record else None
        base = [
            cached_answers(
                key,
                p,
                n,
                lambda todo, n=n: generate(
                    model, tok, todo, n, batch_size, progress, precision=precision
                ),
                progress,
                sources,
            )
            for p, n in jobs
        ]
    merge = not is_quantized(model)
    if merge:
        model.merge_adapter()
    try:
        tuned = [
            generate(model, tok, p, n, batch_size, progress, precision=precision) for p, n in jobs
        ]
    finally:
        if merge:
            model.unmerge_adapter()
    return list(zip(base, tuned, strict=True))


def probe_rows(probes: list[dict], base, tuned):
    rows = []
    for p, (b, _), (t, _) in zip(probes, base, tuned, strict=True):
        rows.append(
            {
                "prompt": p["prompt"],
                "accepted": p["answers"],
                "category": p.get("category"),
                "base": b,
                "tuned": t,
                "base_correct": probe_correct(b, p["answers"]),
                "tuned_correct": probe_correct(t, p["answers"]),
            }
        )
    n = max(len(rows), 1)
    return (
        rows,
        sum(r["base_correct"] for r in rows) / n,
        sum(r["tuned_correct"] for r in rows) / n,
    )


def score(rows: list[dict], key: str) -> dict:
    """Accuracy and the other measures of ``key``'s answers (base or tuned), overall and, where
    rows have a kind, per kind (``by_kind``)."""
    n = max(len(rows), 1)
    right = [r.get(f"{key}_correct", judge(r["prompt"], r["reference"], r[key])) for r in rows]
    out: dict = {
        "accuracy": sum(right) / n,
        "rouge_l": sum(rouge_l(r["reference"], r[key]) for r in rows) / n,
        "stop_rate": sum(r[f"{key}_stopped"] for r in rows) / n,
        # over-refusal: "I don't know that term" for a term the model was taught
        "refusal_rate": sum(refuses(r[key]) for r in rows) / n,
    }
    kinds = sorted({r["kind"] for r in rows if r.get("kind")}, key=_kind_order)
    if kinds:
        out["by_kind"] = {}
        for kind in kinds:
            marks = [ok for r, ok in zip(rows, right, strict=True) if r.get("kind") == kind]
            out["by_kind"][kind] = {"accuracy": sum(marks) / len(marks), "n": len(marks)}
    return out


def _kind_order(kind: str) -> tuple[int, str]:
    return (KINDS.index(kind) if kind in KINDS else len(KINDS), kind)


def evaluate(
    run_dir: str | Path,
    data: str | Path,
    output: str | Path | None = None,
    settings: EvalSection | None = None,
    progress=None,
    probes: str | Path | None = DEFAULT_PROBES,
    unknown: str | Path | None = None,
    store: str | None = None,
) -> dict:
    """Answer every prompt with the base and the tuned model; write predictions/metrics/report.

    ``settings`` is the config's eval section (answer length, batch, limit); ``store`` the
    tracking store to log into (lorafit.tracking.tracker_for_run).
    """
    settings = settings or EvalSection()
    run = RunDir.existing(run_dir)
    loaded = load_for_inference(run.path)
    examples = read_dataset(data).examples[: settings.limit or None]
    probes_path = probes
    probes = read_probes(probes) if probes is not None else None
    unknown_examples = read_dataset(unknown).examples if unknown is not None else None
    system = loaded.system_prompt
    jobs = [([with_system(e, system) for e in examples], settings.max_new_tokens)]
    if probes:
        jobs.append(([chat_prompt(p["prompt"], system) for p in probes], PROBE_MAX_NEW_TOKENS))
    if unknown_examples:
        jobs.append(([with_system(e, system) for e in unknown_examples], settings.max_new_tokens))
    base_record = run.info().get("base_model") if settings.cache_base_answers else None
    device = str(next(loaded.model.parameters()).device)
    precision = applied_precision(loaded.model, resolve_precision(settings.precision, device))
    sources: Counter = Counter()
    answers = answer_sets(
        loaded, jobs, settings.batch_size, progress, base_record, precision, sources
    )
    rows = prediction_rows(examples, *answers.pop(0))
    metrics = {
        "base": score(rows, "base"),
        "tuned": score(rows, "tuned"),
        "n": len(rows),
        "data": str(data),
        "judge": f"key-word recall >= {KEY_RECALL}; per kind: lorafit.judge.judge_kind",
        "precision": precision,
        # where the base model's answers came from (lorafit.answer_cache); tuned: computed
        "base_answers": {k: sources[k] for k in ("shipped", "cached", "computed")},
    }
    out = Path(output) if output else run.eval_dir
    out.mkdir(parents=True, exist_ok=True)
    written = [out / n for n in ("predictions.jsonl", "metrics.json", "report.md", "report.html")]
    probe_table: list[dict] = []
    if probes:
        probe_table, base_general, tuned_general = probe_rows(probes, *answers.pop(0))
        metrics["base"]["general_accuracy"] = base_general
        metrics["tuned"]["general_accuracy"] = tuned_general
        metrics["general_regressions"] = [
            r["prompt"] for r in probe_table if r["base_correct"] and not r["tuned_correct"]
        ]
        metrics["probes"] = str(probes_path)
        write_jsonl(out / "probe_predictions.jsonl", probe_table)
        written.append(out / "probe_predictions.jsonl")
    if unknown_examples:
        unknown_table, base_invented, tuned_invented = unknown_rows(
            unknown_examples, *answers.pop(0)
        )
        metrics["base"]["invented_rate"] = base_invented
        metrics["tuned"]["invented_rate"] = tuned_invented
        metrics["unknown"] = {"data": str(unknown), "n": len(unknown_table)}
        write_jsonl(out / "unknown_predictions.jsonl", unknown_table)
        written.append(out / "unknown_predictions.jsonl")
    write_jsonl(out / "predictions.jsonl", rows)
    write_json(out / "metrics.json", metrics)
    (out / "report.md").write_text(report_md(metrics, rows, probe_table))
    (out / "report.html").write_text(render_html(metrics, rows, probe_table, run.path))
    _track(run, metrics, out, written, store)
    metrics["output"] = str(out)
    return metrics


def prediction_rows(examples, base, tuned) -> list[dict]:
    """One row per held-out question: both models' answers, each judged by its kind's rule."""
    rows = []
    for e, (b, b_stop), (t, t_stop) in zip(examples, base, tuned, strict=True):
        question = e.prompt[-1]["content"]
        row = {"prompt": question, "reference": e.answer, "base": b, "tuned": t}
        if e.kind:
            row["kind"] = e.kind
        if len(e.prompt) > 1 and e.prompt[-2]["role"] == "assistant":  # a follow-up
            row["history"] = [turn for turn in e.prompt if turn["role"] != "system"][:-1]
        row.update(
            base_stopped=b_stop,
            tuned_stopped=t_stop,
            base_correct=judge_kind(e.kind, question, e.answer, b, e.judge),
            tuned_correct=judge_kind(e.kind, question, e.answer, t, e.judge),
        )
        rows.append(row)
    return rows


def _track(run: RunDir, metrics: dict, out: Path, written: list[Path], store) -> None:
    """Evaluation joins the training run in MLflow (lineage: adapter -> evaluation): its
    metrics, and the files this evaluation wrote (never the rest of its output folder)."""
    tracker = tracker_for_run(run.path, store)
    if tracker is None:
        return
    flat = {
        f"eval.{k}": v
        for k, v in flatten({"base": metrics["base"], "tuned": metrics["tuned"]}).items()
    }
    tracker.log_metrics(
        {**flat, "heldout_accuracy": metrics["tuned"]["accuracy"], "eval.n": metrics["n"]}
    )
    tracker.set_tags(
        {"lorafit.eval.data": metrics["data"], "lorafit.eval.output": str(out.resolve())}
    )
    for path in written:
        tracker.log_artifact(path, "eval")
