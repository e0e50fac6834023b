"""report.html: the evaluation as one self-contained page (pictures inlined, no network)."""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

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


def _png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _mark(ok: bool) -> str:
    return '<span class="ok">✔</span>' if ok else '<span class="bad">✘</span>'


def render(metrics: dict, rows: list[dict], probe_rows: list[dict], run_dir: Path) -> str:
    from lorafit.evaluate import METRIC_COLUMNS, metric_cells  # evaluate imports this module
    from lorafit.plots import plot_comparison

    esc = html.escape
    with tempfile.TemporaryDirectory() as tmp:
        figures = [_png(plot_comparison(metrics, Path(tmp) / "base-vs-tuned.png"))]
    if (run_dir / "loss.png").is_file():
        figures.append(_png(run_dir / "loss.png"))
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>lorafit evaluation: {esc(run_dir.name)}</title><style>{STYLE}</style></head><body>",
        "<h1>lorafit evaluation</h1>",
        f"<p class='sub'>run <code>{esc(str(run_dir))}</code> · {metrics['n']} held-out prompts "
        f"from <code>{esc(str(metrics.get('data', '')))}</code> · judge: {esc(metrics['judge'])}</p>",
        "<table><tr>" + "".join(f"<th>{c}</th>" for c in METRIC_COLUMNS) + "</tr>",
    ]
    for name in ("base", "tuned"):
        model, *cells = metric_cells(name, metrics[name])
        parts.append(
            f"<tr><td>{model}</td>" + "".join(f"<td class='num'>{c}</td>" for c in cells) + "</tr>"
        )
    parts.append("</table><div class='figs'>" + "".join(figures) + "</div>")
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
