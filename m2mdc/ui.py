"""Console output: one rich console, progress bars for long work, tables for results."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(highlight=False)
if not console.is_terminal:  # logs and CI: wide enough that tables are not truncated
    console = Console(highlight=False, width=160)
log = logging.getLogger("m2mdc")


# ui.progress_every_s: seconds between the progress lines printed when stdout is not a terminal
PROGRESS_EVERY_S = 30.0


def configure(progress_every_s: float) -> None:
    """Apply the ``ui`` settings of a command (called once per command by the pipeline)."""
    global PROGRESS_EVERY_S
    PROGRESS_EVERY_S = float(progress_every_s)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    info: str
    unit: str  # what one step counts (for the rate): "img", "step", ...
    per_step: float  # units per step (a training step of batch 128 is 128 images)
    start_completed: float = 0.0
    started: float = field(default_factory=time.monotonic)


class HeadlessProgress:
    """What :func:`progress` gives when stdout is not a terminal (SLURM, nohup, CI): no bars,
    but a log line every ``every_s`` seconds while work goes on, for each running task from
    the outermost in: ``done/total``, the rate (``unit``/s) and the remaining time.

    The subset of :class:`rich.progress.Progress` that m2mdc uses: ``add_task``, ``update``,
    ``remove_task`` and the context manager; extra fields ``unit`` and ``per_step`` name what
    a step counts (``update(..., completed=step)`` with ``per_step=batch_size`` gives img/s).
    """

    def __init__(self, every_s: float, clock: Any = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self.tasks: dict[TaskID, _Task] = {}
        self._next_id = 0
        self._last = clock()

    def __enter__(self) -> HeadlessProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.tasks.clear()

    def add_task(
        self,
        description: str,
        total: float | None = None,
        completed: float = 0,
        info: str = "",
        unit: str = "step",
        per_step: float = 1.0,
        **_: Any,
    ) -> TaskID:
        self._next_id += 1
        task_id = TaskID(self._next_id)
        now = self.clock()
        self.tasks[task_id] = _Task(
            description.strip(), total, completed, info, unit, per_step, completed, now
        )
        return task_id

    def update(
        self, task_id: TaskID, completed: float | None = None, info: str | None = None, **_: Any
    ) -> None:
        task = self.tasks[task_id]
        if completed is not None:
            task.completed = completed
        if info is not None:
            task.info = info
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            log.info(self.line(now))

    def remove_task(self, task_id: TaskID) -> None:
        self.tasks.pop(task_id, None)

    def line(self, now: float) -> str:
        """One progress line: every running task, outermost first."""
        return " | ".join(_describe(t, now) for t in self.tasks.values())


def _describe(t: _Task, now: float) -> str:
    done = f"{t.completed:,.0f}" + (f"/{t.total:,.0f}" if t.total is not None else "")
    parts = [f"{t.description} {done}"]
    elapsed, moved = now - t.started, t.completed - t.start_completed
    if elapsed > 0 and moved > 0:
        rate = moved / elapsed
        parts.append(f"{rate * t.per_step:,.1f} {t.unit}/s")
        if t.total is not None:
            left = max(t.total - t.completed, 0) / rate
            parts.append(f"ETA {timedelta(seconds=round(left))}")
    if t.info:
        parts.append(t.info)
    return ", ".join(parts)


def progress() -> Progress | HeadlessProgress:
    """Progress bars on a terminal (description, bar, done/total, elapsed, remaining, live
    metrics); elsewhere a :class:`HeadlessProgress` line every ``ui.progress_every_s``."""
    if not console.is_terminal:
        return HeadlessProgress(PROGRESS_EVERY_S)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
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
