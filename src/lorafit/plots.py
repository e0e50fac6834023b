"""Pictures people would rather look at than read: loss curves."""

from __future__ import annotations

from pathlib import Path

from lorafit.data.formats import read_jsonl_lines


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return read_jsonl_lines(path)


def plot_loss(metrics_file: str | Path, out_png: str | Path) -> Path:
    """Train (and eval, when present) loss against optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss (held-out)", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("lorafit training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


def plot_comparison(metrics: dict, out_png: str | Path) -> Path:
    """Base vs tuned bars: held-out accuracy, answers that stop, general ability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [("accuracy", "held-out accuracy"), ("stop_rate", "stops by itself")]
    if "general_accuracy" in metrics["tuned"]:
        labels.append(("general_accuracy", "general ability"))
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    width = 0.38
    for shift, (name, color) in (
        (-width / 2, ("base", "#9e9e9e")),
        (width / 2, ("tuned", "#2e7d32")),
    ):
        values = [metrics[name][key] * 100 for key, _ in labels]
        bars = ax.bar(
            [i + shift for i in range(len(labels))], values, width, label=name, color=color
        )
        ax.bar_label(bars, fmt="%.0f%%", fontsize=8)
    ax.set_xticks(range(len(labels)), [text for _, text in labels])
    ax.set_ylim(0, 110)
    ax.set_ylabel("% of prompts")
    ax.set_title("base vs tuned")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
