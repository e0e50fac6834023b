"""The app's pages (GET): each renders what lorafit's stages wrote in the workspace."""

from __future__ import annotations

import json
import statistics

from fastapi import Request

from lorafit.data.formats import read_jsonl_lines
from lorafit.data.generate import MANIFEST
from lorafit.data.glossary import check_glossary
from lorafit.errors import LorafitError
from lorafit.report import KIND_COLUMNS, METRIC_COLUMNS, kind_cells, metric_cells
from lorafit.rundir import read_json
from lorafit.ui.workspace import safe_name


def knowledge(ui, request: Request):
    glossaries = ui.ws.glossaries()
    name = request.query_params.get("glossary") or (glossaries[0] if glossaries else None)
    values = {"glossaries": glossaries, "name": None, "max_mb": 2}
    if not name:
        return ui.page("knowledge", "Knowledge", request, **values)
    name = safe_name(name, "glossary")
    path = ui.ws.glossary_path(name)
    if not path.is_file():
        raise LorafitError(f"no glossary {name!r} in this workspace")
    glossary, problems = check_glossary(path)
    rows, domain = _rows_as_written(path), glossary.domain if glossary else None
    for problem in problems:
        if 0 <= problem.index < len(rows):
            rows[problem.index]["problem"] = problem.message.split(": ", 1)[-1]
    file_problem = next((p.message for p in problems if p.index < 0), None)
    data = ui.ws.data_dir(name)
    counts = read_json(data / MANIFEST) if (data / MANIFEST).is_file() else None
    examples = []
    if counts and (data / "train.jsonl").is_file():
        seen = set()
        for row in read_jsonl_lines(data / "train.jsonl"):
            if row.get("kind") not in seen:
                seen.add(row.get("kind"))
                examples.append(row)
    values.update(
        name=name,
        rows=rows,
        domain=domain,
        problems=[p for p in problems if p.index >= 0],
        file_problem=file_problem,
        counts=counts,
        examples=examples,
    )
    return ui.page("knowledge", "Knowledge", request, **values)


def _rows_as_written(path) -> list[dict]:
    """The glossary's entries as text fields for the editable table (even invalid ones)."""
    from lorafit.data.glossary import _entries, _read_text

    try:
        _, entries = _entries(path, _read_text(path))
    except LorafitError:
        return []
    rows = []
    for entry in entries:
        entry = entry if isinstance(entry, dict) else {}
        rows.append(
            {
                k: "" if entry.get(k) is None else str(entry.get(k))
                for k in ("term", "expansion", "definition", "category")
            }
        )
    return rows


def plan(ui, request: Request):
    from lorafit.config import load_config

    glossary = request.query_params.get("glossary")
    if not glossary:
        ready = [g for g in ui.ws.glossaries() if (ui.ws.data_dir(g) / MANIFEST).is_file()]
        glossary = ready[0] if ready else None
    values = {"glossary": None}
    if glossary:
        data = ui.ws.data_dir(safe_name(glossary, "glossary"))
        if (data / MANIFEST).is_file():
            manifest = read_json(data / MANIFEST)
            config = load_config("demo")
            rate = _measured_rate(ui)
            tokens = manifest.get("tokens")
            values.update(
                glossary=glossary,
                rows=manifest["train"],
                tokens=tokens,
                config=config,
                run_name=f"{data.name}-{len(ui.ws.runs()) + 1}",
                verdict="Not checked yet: memory depends on the model and the settings.",
                expected=_expected(tokens, config, rate),
            )
    return ui.page("plan", "Plan", request, **values)


def _measured_rate(ui) -> float | None:
    """Median training tokens/s of the runs this workspace finished (this machine)."""
    rates = []
    for name in ui.ws.runs():
        info = ui.ws.run_dir(name).info()
        rate = (info.get("results") or {}).get("tokens_per_s")
        if info.get("status") == "completed" and rate:
            rates.append(rate)
    return statistics.median(rates) if rates else None


def _expected(tokens: int | None, config, rate: float | None) -> str:
    if not tokens:
        return ""
    if not rate:
        return "Expected training time: known after the first run on this machine."
    total = tokens * config.train.epochs / (1 - config.data.replay)
    return (
        f"Expected training time on this machine: about {total / rate / 60:.0f} min "
        f"({total:,.0f} tokens at the {rate:.0f} tokens/s earlier runs here measured)."
    )


def train(ui, request: Request):
    run = ui.run_name(request)
    status = "-"
    if run:  # the training process writes run.json a few seconds after it starts
        status = ui.ws.train_status(run)[0]
    return ui.page("train", "Train", request, run=run, status=status, runs=ui.ws.runs())


def results(ui, request: Request):
    run = ui.run_name(request)
    values = {"run": run, "metrics": None, "job": None}
    if run:
        values["job"] = next((j for j in ui.ws.running("eval") if j.run == run), None)
        metrics_file = ui.ws.run_dir(run).eval_dir / "metrics.json"
        if metrics_file.is_file() and not values["job"]:
            metrics = json.loads(metrics_file.read_text())
            values.update(
                metrics=metrics,
                columns=METRIC_COLUMNS,
                metric_rows=[metric_cells(n, metrics[n]) for n in ("base", "tuned")],
                kind_columns=KIND_COLUMNS,
                kinds=kind_cells(metrics),
                rows=read_jsonl_lines(metrics_file.parent / "predictions.jsonl"),
            )
    return ui.page("results", "Results", request, **values)


def try_it(ui, request: Request):
    run = ui.run_name(request)
    ready = run and ui.ws.run_dir(run).adapter_dir.is_dir()
    return ui.page("try", "Try it", request, run=run if ready else None)


def ship(ui, request: Request):
    from lorafit.export import modelfile_path, report_path

    run = ui.run_name(request)
    values = {"run": run, "workspace": ui.ws.root, "exports": [], "job": None}
    if run:
        values["job"] = next((j for j in ui.ws.running("export") if j.run == run), None)
        for gguf in sorted((ui.ws.root / "exports").glob(f"{run}-*.gguf")):
            if report_path(gguf).is_file():
                values["exports"].append(
                    {
                        "name": gguf.name,
                        "gguf": f"exports/{gguf.name}",
                        "modelfile": f"exports/{modelfile_path(gguf).name}",
                        "modelfile_name": modelfile_path(gguf).name,
                        "report": read_json(report_path(gguf)),
                    }
                )
    return ui.page("ship", "Ship", request, **values)


def runs(ui, request: Request):
    from lorafit.tracking import compare_runs, list_runs, redact_uri

    uri = ui.ws.tracking_uri()
    values = {"store": redact_uri(uri), "rows": [], "compare": None, "error": None}

    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    try:
        for r in list_runs(uri, 100):
            r.update(
                heldout=pct(r["heldout_accuracy"]),
                base=pct(r["base_accuracy"]),
                loss="-" if r["final_loss"] is None else f"{r['final_loss']:.3f}",
            )
            values["rows"].append(r)
        a, b = request.query_params.get("a"), request.query_params.get("b")
        if a and b:
            values["compare"] = compare_runs(uri, a, b)
    except LorafitError as e:
        values["error"] = str(e)
    return ui.page("runs", "Runs", request, **values)
