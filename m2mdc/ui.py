"""Console output: one rich console, progress bars for long work, tables for results."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(highlight=False)
if not console.is_terminal:  # logs and CI: wide enough that tables are not truncated
    console = Console(highlight=False, width=160)
log = logging.getLogger("m2mdc")


def progress() -> Progress:
    """Progress bars: description, bar, done/total, elapsed, remaining, live metrics."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=not console.is_terminal,  # in logs and CI keep output to the summary lines
        disable=not console.is_terminal,
    )


def plural(n: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``, ``0 epochs``: a count with its noun (regular plurals)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def fmt(value: Any, column: str = "") -> str:
    """Human-readable cell: counts in M, percentages with one decimal."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if column in ("params", "macs", "conv_macs"):
            return f"{value / 1e6:,.3f}M"
        if column.endswith("_pct") or column.startswith("top1") or column.endswith("delta"):
            return f"{value:+.1f}" if column.endswith(("delta", "_pct")) else f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def table(
    title: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any] | Sequence[Any]]
) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c in (columns[0],) else "right")
    for r in rows:
        values = [r.get(c) for c in columns] if isinstance(r, Mapping) else list(r)
        t.add_row(*(fmt(v, c) for v, c in zip(values, columns, strict=False)))
    return t
