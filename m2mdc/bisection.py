"""Bisection of a monotone scalar function to a target within a relative tolerance.

One rule for every search of a knob whose measured effect grows (or shrinks) with it: the MAC
budget's keep fraction (:mod:`m2mdc.budget`), the Torch-Pruning peer's channel ratio to a MAC
count or to a measured latency (:mod:`m2mdc.peers`).

Example:
    >>> best, trials = bisect(lambda x: 100 * x, 30, 0.0, 1.0, tolerance=0.05, steps=10)
    >>> best.x, [t.x for t in trials]
    (0.3125, [0.5, 0.25, 0.375, 0.3125])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Trial:
    """One evaluation: the point ``x`` and the value measured there."""

    x: float
    value: float


def within(value: float, target: float, tolerance: float) -> bool:
    """``value`` is within ``tolerance`` (relative to ``target``) of ``target``."""
    return abs(value - target) <= tolerance * target


def bisect(
    fn: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    *,
    tolerance: float,
    steps: int,
    increasing: bool = True,
) -> tuple[Trial, list[Trial]]:
    """Bisect ``x`` in ``[lo, hi]`` until ``fn(x)`` is :func:`within` ``tolerance`` of
    ``target``, for ``fn`` monotone in ``x`` (``increasing``, or decreasing).

    Every step evaluates ``fn`` once, at the middle of the bracket, and keeps the half on the
    target's side of the value measured there: the bracket only shrinks, so a noisy value can
    misplace it but never sends the search back over points it has left. The search stops at
    the first value within the tolerance, or after ``steps`` evaluations.

    Returns:
        The trial closest to ``target`` (the earliest on ties), which the caller checks with
        :func:`within`, and every trial in the order evaluated.
    """
    if steps < 1:
        raise ValueError("bisect needs steps >= 1")
    trials: list[Trial] = []
    best: Trial | None = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        trial = Trial(mid, fn(mid))
        trials.append(trial)
        if best is None or abs(trial.value - target) < abs(best.value - target):
            best = trial
        if within(trial.value, target, tolerance):
            break
        if (trial.value > target) == increasing:
            hi = mid
        else:
            lo = mid
    assert best is not None
    return best, trials
