"""A progress bar for answer generation (evaluation runs base and tuned model over every prompt)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


def progress_bar(label: str, info: bool = False, transient: bool = False):
    """The rich bar lorafit shows for long work: label, bar, n/total, [info], elapsed, left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn()]
    if info:  # a free-text field per task (training shows loss and tokens/s there)
        columns.append(TextColumn("{task.fields[info]}"))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, transient=transient)


@contextlib.contextmanager
def answer_progress(label: str = "answering") -> Iterator[Callable[[int, int], None]]:
    """Yield ``progress(done, total)``; shows a rich bar with elapsed and remaining time."""
    bar = progress_bar(label, transient=True)
    task = bar.add_task(label, total=None)

    def progress(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield progress
