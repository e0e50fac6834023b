"""`lorafit data check`: validate data files and report what training would see.

lorafit data check data/generated/train.jsonl data/generated/eval.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorafit.data.formats import read_dataset
from lorafit.data.tokenize import tokenize_all


@dataclass
class FileReport:
    path: str
    format: str
    rows: int
    min_tokens: int
    mean_tokens: float
    max_tokens: int
    duplicates: int
    over_length: int
    warnings: list[str] = field(default_factory=list)


def check_files(files: list[Path], model_name: str, max_length: int) -> list[FileReport]:
    """Validate every file first (errors name file:line:field), then count tokens."""
    datasets = [read_dataset(f) for f in files]  # all-or-nothing: fail before heavy work
    from lorafit.model import load_tokenizer
    from lorafit.sources import resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir(model_name))
    reports = []
    for ds in datasets:
        _rows, rep = tokenize_all(tokenizer, ds.examples, max_length=10**9)
        lengths = rep.lengths or [0]
        over = sum(n > max_length for n in lengths)
        warnings = list(ds.warnings)
        if over:
            warnings.append(
                f"{ds.path}: {over} row(s) longer than {max_length} tokens will be truncated"
            )
        reports.append(
            FileReport(
                ds.path,
                ds.format,
                len(ds.examples),
                min(lengths),
                sum(lengths) / len(lengths),
                max(lengths),
                ds.duplicates,
                over,
                warnings,
            )
        )
    return reports
