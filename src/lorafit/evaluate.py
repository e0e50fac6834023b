"""Evaluate stage: base vs tuned model on held-out prompts.

    lorafit eval runs/demo --data data/generated/eval.jsonl

How ``accuracy`` is judged (``judge``): take the reference answer's key words — lower-cased
words of 2+ characters that are not stop words and do not already occur in the prompt (so
echoing the question earns nothing). An answer is correct when it contains at least 60% of
them (KEY_RECALL). When the reference has no key words left, the answer must contain the
whole reference. ``rouge_l`` is the ROUGE-L F1 (longest common subsequence of words).
``stop_rate`` is the share of answers that ended with the end-of-turn token by themselves.
``refusal_rate`` is the share of held-out answers that decline ("I don't know that term"):
over-refusal, the risk of teaching refusals for made-up terms.

General ability (``general_accuracy``): the shipped probe set ``data/probes/general.jsonl``
(arithmetic, geography, units, common sense, science, simple instructions) is answered by
both models; a probe is right when one of its accepted answers appears as a whole word or
phrase. Probes the base model got right and the tuned model got wrong are listed as
regressions: the forgetting a fine-tune caused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lorafit.data.formats import read_dataset, write_jsonl
from lorafit.data.tokenize import with_system
from lorafit.errors import LorafitError
from lorafit.inference import chat_prompt, generate, load_for_inference
from lorafit.report import render as render_html
from lorafit.rundir import write_json
from lorafit.tracking import flatten, tracker_for_run

KEY_RECALL = 0.6
PROBE_MAX_NEW_TOKENS = 32  # probe answers are a word or a short sentence
DEFAULT_PROBES = Path(__file__).resolve().parents[2] / "data" / "probes" / "general.jsonl"
STOP_WORDS = frozenset(
    """a an the and or of to in on for at by with from as is are was were be been being it its
    this that these those which who whom what when where why how than then so such can could
    may might must shall should will would do does did done has have had not no nor but if
    into onto out over under up down about after before between both each few more most other
    some any all only own same too very just also there their them they we you your our us
    he she his her him i me my one two per via used use uses using""".split()  # noqa: SIM905
)
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def words(text: str) -> list[str]:
    # "Shakespeare's play" names Shakespeare: a possessive is the word itself
    return [w.removesuffix("'s") for w in _WORD.findall(text.lower().replace("’", "'"))]


def key_words(reference: str, prompt: str = "") -> set[str]:
    asked = set(words(prompt))
    return {w for w in words(reference) if len(w) > 1 and w not in STOP_WORDS and w not in asked}


def judge(prompt: str, reference: str, answer: str) -> bool:
    """Is ``answer`` a correct answer to ``prompt``, given the ``reference``? (see module doc)"""
    keys = key_words(reference, prompt)
    got = set(words(answer))
    if not keys:
        return " ".join(words(reference)) in " ".join(words(answer))
    return len(keys & got) / len(keys) >= KEY_RECALL


def rouge_l(reference: str, answer: str) -> float:
    """ROUGE-L F1 over words."""
    ref, hyp = words(reference), words(answer)
    if not ref or not hyp:
        return 0.0
    prev = [0] * (len(hyp) + 1)
    for r in ref:
        cur = [0]
        for j, h in enumerate(hyp):
            cur.append(prev[j] + 1 if r == h else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(hyp), lcs / len(ref)
    return 2 * p * rec / (p + rec)


def probe_correct(answer: str, accepted: list[str]) -> bool:
    """Does ``answer`` contain one of the ``accepted`` answers as a whole word/phrase?"""
    text = f" {' '.join(words(answer))} "
    return any(f" {' '.join(words(a))} " in text for a in accepted if words(a))


REFUSAL_MARKERS = (
    "don't know",
    "do not know",
    "not familiar",
    "unfamiliar",
    "not aware of",
    "no information",
    "not sure what",
    "won't guess",
    "not in the",
    "can't find",
    "cannot find",
    "never heard",
)


def refuses(answer: str) -> bool:
    """Does the answer decline to define the term (instead of inventing an entry)?"""
    text = answer.casefold().replace("’", "'")
    return any(marker in text for marker in REFUSAL_MARKERS)


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
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str) or not isinstance(row.get("answers"), list):
                raise LorafitError(f"{path}:{lineno}: a probe needs 'prompt' and 'answers' (list)")
            rows.append(row)
    return rows


def answer_sets(loaded, jobs: list[tuple[list, int]], batch_size: int, progress=None):
    """[(base answers, tuned answers)] for each (prompts, max_new_tokens) job.

    ``progress(done, total)`` is called after every generated batch.

    Every base answer comes first (adapter disabled); the tuned answers then run with the
    adapter merged into the weights, which generates faster than LoRA's extra matmuls per
    layer. Quantized bases keep the adapter separate (merging into 4/8-bit weights is lossy).
    """
    model, tok = loaded.model, loaded.tokenizer
    if progress is not None:  # progress(answers done, answers in all): base and tuned
        total, done = 2 * sum(len(p) for p, _ in jobs), [0]

        def advance(n: int, report=progress) -> None:
            done[0] += n
            report(done[0], total)

        progress = advance
    with model.disable_adapter():
        base = [generate(model, tok, p, n, batch_size, progress) for p, n in jobs]
    inner = model.get_base_model()
    quantized = getattr(inner, "hf_quantizer", None) is not None or any(
        getattr(inner, f"is_loaded_in_{bits}bit", False) for bits in (4, 8)
    )
    merge = not quantized
    if merge:
        model.merge_adapter()
    try:
        tuned = [generate(model, tok, p, n, batch_size, progress) for p, n in jobs]
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


def score(rows: list[dict], key: str) -> dict[str, float]:
    n = max(len(rows), 1)
    return {
        "accuracy": sum(judge(r["prompt"], r["reference"], r[key]) for r in rows) / n,
        "rouge_l": sum(rouge_l(r["reference"], r[key]) for r in rows) / n,
        "stop_rate": sum(r[f"{key}_stopped"] for r in rows) / n,
        # over-refusal: "I don't know that term" for a term the model was taught
        "refusal_rate": sum(refuses(r[key]) for r in rows) / n,
    }


METRIC_COLUMNS = (
    "model",
    "held-out accuracy",
    "ROUGE-L",
    "stops by itself",
    "general ability",
    "invents unknown terms",
    "declines real terms",
)


def metric_cells(name: str, m: dict) -> list[str]:
    """One model's row of the metrics table (report.md, report.html and the CLI share it)."""

    def pct(key: str) -> str:
        return f"{m[key]:.1%}" if key in m else "not run"

    return [name, pct("accuracy"), f"{m['rouge_l']:.3f}", pct("stop_rate")] + [
        pct("general_accuracy"),
        pct("invented_rate"),
        pct("refusal_rate"),
    ]


def _report_md(metrics: dict, rows: list[dict], probe_rows: list[dict], limit: int = 30) -> str:
    lines = [
        "# lorafit evaluation",
        "",
        f"{metrics['n']} held-out prompts.",
        "",
        "| " + " | ".join(METRIC_COLUMNS) + " |",
        "|---" * len(METRIC_COLUMNS) + "|",
    ]
    for name in ("base", "tuned"):
        lines.append("| " + " | ".join(metric_cells(name, metrics[name])) + " |")
    if probe_rows:
        regressed = [r for r in probe_rows if r["base_correct"] and not r["tuned_correct"]]
        lines += ["", f"## General-ability regressions: {len(regressed)} of {len(probe_rows)}", ""]
        lines += [
            f"- {r['prompt']} — base: {r['base'][:80]!r}; tuned: {r['tuned'][:80]!r}"
            for r in regressed
        ] or ["None: every probe the base model answered right, the tuned model did too."]
    lines += [
        "",
        f"## Answers (first {min(limit, len(rows))})",
        "",
        "| prompt | base | tuned | reference |",
        "|---|---|---|---|",
    ]

    def cell(text: str, ok: bool | None = None) -> str:
        mark = "" if ok is None else ("✅ " if ok else "❌ ")
        return mark + text.replace("|", "\\|").replace("\n", " ")[:200]

    for r in rows[:limit]:
        lines.append(
            f"| {cell(r['prompt'])} | {cell(r['base'], r['base_correct'])} | "
            f"{cell(r['tuned'], r['tuned_correct'])} | {cell(r['reference'])} |"
        )
    return "\n".join(lines) + "\n"


def evaluate(
    run_dir: str | Path,
    data: str | Path,
    output: str | Path | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 48,
    limit: int | None = None,
    progress=None,
    probes: str | Path | None = DEFAULT_PROBES,
    unknown: str | Path | None = None,
) -> dict:
    """Answer every prompt with the base and the tuned model; write predictions/metrics/report."""
    run_dir = Path(run_dir)
    loaded = load_for_inference(run_dir)
    if not loaded.has_adapter:
        raise LorafitError(f"{run_dir}: not a training run directory (no run.json/adapter)")
    dataset = read_dataset(data)
    examples = dataset.examples[:limit] if limit else dataset.examples
    prompts = [with_system(e, loaded.system_prompt) for e in examples]
    jobs = [(prompts, max_new_tokens)]
    probes_path = probes
    probes = read_probes(probes) if probes is not None and Path(probes).is_file() else None
    if probes:
        jobs.append(
            ([chat_prompt(p["prompt"], loaded.system_prompt) for p in probes], PROBE_MAX_NEW_TOKENS)
        )
    unknown_examples = read_dataset(unknown).examples if unknown is not None else None
    if unknown_examples:
        jobs.append(
            ([with_system(e, loaded.system_prompt) for e in unknown_examples], max_new_tokens)
        )
    answers = answer_sets(loaded, jobs, batch_size, progress)
    base, tuned = answers.pop(0)
    rows = []
    for e, (b, b_stop), (t, t_stop) in zip(examples, base, tuned, strict=True):
        question = e.prompt[-1]["content"]
        rows.append(
            {
                "prompt": question,
                "reference": e.answer,
                "base": b,
                "tuned": t,
                "base_stopped": b_stop,
                "tuned_stopped": t_stop,
                "base_correct": judge(question, e.answer, b),
                "tuned_correct": judge(question, e.answer, t),
            }
        )
    metrics = {
        "base": score(rows, "base"),
        "tuned": score(rows, "tuned"),
        "n": len(rows),
        "data": str(data),
        "judge": f"key-word recall >= {KEY_RECALL}",
    }
    out = Path(output) if output else run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
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
    if unknown_examples:
        unknown_table, base_invented, tuned_invented = unknown_rows(
            unknown_examples, *answers.pop(0)
        )
        metrics["base"]["invented_rate"] = base_invented
        metrics["tuned"]["invented_rate"] = tuned_invented
        metrics["unknown"] = {"data": str(unknown), "n": len(unknown_table)}
        write_jsonl(out / "unknown_predictions.jsonl", unknown_table)
    write_jsonl(out / "predictions.jsonl", rows)
    write_json(out / "metrics.json", metrics)
    (out / "report.md").write_text(_report_md(metrics, rows, probe_table))
    (out / "report.html").write_text(render_html(metrics, rows, probe_table, run_dir))
    _track(run_dir, metrics, out)
    metrics["output"] = str(out)
    return metrics


def _track(run_dir: Path, metrics: dict, out: Path) -> None:
    """Evaluation joins the training run in MLflow (lineage: adapter -> evaluation)."""
    tracker = tracker_for_run(run_dir)
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
    tracker.log_artifact(out, "eval")
