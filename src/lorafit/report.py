"""The evaluation as people read it: report.md, report.html (one self-contained page,
pictures inlined, no network) and the metrics table the CLI prints."""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

from lorafit.rundir import RunDir

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;width:100%;margin:1rem 0;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.45rem .6rem;text-align:left;vertical-align:top}
th{background:#f4f6f8} tr:nth-child(even) td{background:#fafafa}
.ok{color:#2e7d32;font-weight:600} .bad{color:#c62828;font-weight:600}
.figs{display:flex;gap:1rem;flex-wrap:wrap} .figs img{max-width:100%;border:1px solid #eee}
.num{text-align:right;font-variant-numeric:tabular-nums}
"""


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


KIND_COLUMNS = ("question kind", "prompts", "base", "tuned")


def kind_cells(metrics: dict) -> list[list[str]]:
    """One row per question kind: held-out prompts and each model's accuracy (empty when the
    data has no kinds)."""
    base, tuned = metrics["base"].get("by_kind", {}), metrics["tuned"].get("by_kind", {})
    return [
        [
            kind,
            str(tuned[kind]["n"]),
            f"{base[kind]['accuracy']:.1%}",
            f"{tuned[kind]['accuracy']:.1%}",
        ]
        for kind in tuned
    ]


def answers_source(metrics: dict) -> str:
    """Where the base model's answers came from (lorafit.answer_cache), in words."""
    src = metrics.get("base_answers")
    if not src:
        return ""
    return (
        f"Base model's answers: {src['shipped']} shipped with lorafit for this kind of machine, "
        f"{src['cached']} from this machine's cache, {src['computed']} computed now; "
        "the tuned model's are all computed now."
    )


def report_md(metrics: dict, rows: list[dict], probe_rows: list[dict], limit: int = 30) -> str:
    lines = [
        "# lorafit evaluation",
        "",
        f"{metrics['n']} held-out prompts. {answers_source(metrics)}".rstrip(),
        "",
        "| " + " | ".join(METRIC_COLUMNS) + " |",
        "|---" * len(METRIC_COLUMNS) + "|",
    ]
    for name in ("base", "tuned"):
        lines.append("| " + " | ".join(metric_cells(name, metrics[name])) + " |")
    if kind_cells(metrics):
        lines += ["", "## Accuracy by question kind", ""]
        lines += ["| " + " | ".join(KIND_COLUMNS) + " |", "|---" * len(KIND_COLUMNS) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in kind_cells(metrics)]
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


def _png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _mark(ok: bool) -> str:
    return '<span class="ok">✔</span>' if ok else '<span class="bad">✘</span>'


def render(metrics: dict, rows: list[dict], probe_rows: list[dict], run_dir: Path) -> str:
    from lorafit.plots import plot_comparison

    esc = html.escape
    with tempfile.TemporaryDirectory() as tmp:
        figures = [_png(plot_comparison(metrics, Path(tmp) / "base-vs-tuned.png"))]
    loss_plot = RunDir(run_dir).loss_plot
    if loss_plot.is_file():
        figures.append(_png(loss_plot))
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>lorafit evaluation: {esc(run_dir.name)}</title><style>{STYLE}</style></head><body>",
        "<h1>lorafit evaluation</h1>",
        f"<p class='sub'>run <code>{esc(str(run_dir))}</code> · {metrics['n']} held-out prompts "
        f"from <code>{esc(str(metrics.get('data', '')))}</code> · judge: {esc(metrics['judge'])}"
        f"<br>{esc(answers_source(metrics))}</p>",
        "<table><tr>" + "".join(f"<th>{c}</th>" for c in METRIC_COLUMNS) + "</tr>",
    ]
    for name in ("base", "tuned"):
        model, *cells = metric_cells(name, metrics[name])
        parts.append(
            f"<tr><td>{model}</td>" + "".join(f"<td class='num'>{c}</td>" for c in cells) + "</tr>"
        )
    parts.append("</table>")
    if kind_cells(metrics):
        parts.append("<h2>Accuracy by question kind</h2><table><tr>")
        parts.append("".join(f"<th>{c}</th>" for c in KIND_COLUMNS) + "</tr>")
        for kind, *cells in kind_cells(metrics):
            parts.append(
                f"<tr><td>{esc(kind)}</td>"
                + "".join(f"<td class='num'>{c}</td>" for c in cells)
                + "</tr>"
            )
        parts.append("</table>")
    parts.append("<div class='figs'>" + "".join(figures) + "</div>")
    regressed = [r for r in probe_rows if r["base_correct"] and not r["tuned_correct"]]
    if probe_rows:
        parts.append(
            f"<h2>General-ability regressions: {len(regressed)} of {len(probe_rows)} probes</h2>"
        )
        if regressed:
            parts.append("<table><tr><th>probe</th><th>base</th><th>tuned</th></tr>")
            parts += [
                f"<tr><td>{esc(r['prompt'])}</td><td>{esc(r['base'])}</td>"
                f"<td>{esc(r['tuned'])}</td></tr>"
                for r in regressed
            ]
            parts.append("</table>")
    right = sum(r["tuned_correct"] for r in rows)
    parts.append(
        f"<h2>Answers side by side ({right} of {len(rows)} right after tuning)</h2>"
        "<table><tr><th>question</th><th>base</th><th>tuned</th><th>reference</th></tr>"
    )
    for r in rows:
        parts.append(
            f"<tr><td>{esc(r['prompt'])}</td>"
            f"<td>{_mark(r['base_correct'])} {esc(r['base'])}</td>"
            f"<td>{_mark(r['tuned_correct'])} {esc(r['tuned'])}</td>"
            f"<td>{esc(r['reference'])}</td></tr>"
        )
    parts.append("</table></body></html>")
    return "\n".join(parts)
