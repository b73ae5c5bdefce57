"""MAC-budget allocator: the block ratio and keep fractions that meet ``budget.macs``.

The paper leaves the pruning ratio and the per-stage keep fractions as hand-set knobs and
names "an allocator for budgets" as future work. Given a target (absolute MACs, or a
fraction of the teacher's), the allocator searches without training:

1. for every block ratio in ``budget.ratios``: the blocks the prune stage would remove (the
   same MI-ranked, constraint-respecting selection);
2. for every *shape* the slicing policy allows (``planes_mid``: planes and mid channels at one
   fraction f, mid only, or planes only), the fraction f in (0, 1] whose MACs, counted on the
   student the slice stage would build (the same ``round_keep`` widths and ``round_to``), are
   within ``budget.tolerance`` of the target: MACs grow monotonically with f, so f is bisected;
3. every candidate that meets the budget is ranked by a cheap *measured* proxy: the top1 on
   the probe set (training images, never the test split) of the candidate built from the
   teacher's weights (channels kept by the data-free ``bn_l1`` selector), after BatchNorm
   recalibration on ``budget.proxy_batches`` training batches. The best proxy wins (ties: the
   fewer MACs).

Uniform fractions across stages keep the search small and the result easy to read; the
candidates and the choice go to ``prune/plan.json``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from torch import nn

from m2mdc.arch import get_adapter
from m2mdc.arch.base import BlockRef
from m2mdc.bisection import bisect, within
from m2mdc.errors import M2MError
from m2mdc.profiling import count_macs
from m2mdc.pruning import keep_cfg_from_removals, select_removals
from m2mdc.slicing import plan_slice
from m2mdc.ui import progress

# (planes fraction follows f?, mid fraction follows f?) per shape; the other part stays at 1
SHAPES: dict[str, tuple[bool, bool]] = {
    "planes_mid": (True, True),
    "mid": (False, True),
    "planes": (True, False),
}
POLICY_SHAPES: dict[str, tuple[str, ...]] = {
    "planes_mid": ("planes_mid", "mid", "planes"),
    "planes": ("planes",),
    "mid": ("mid",),
    "none": (),
}
MIN_FRACTION = 0.02
BISECTION_STEPS = 20


@dataclass
class Candidate:
    ratio: float
    shape: str  # "blocks" when no slicing is involved
    planes_keep: float
    mid_keep: float
    macs: int
    keep_cfg: dict[str, list[int]]
    proxy_top1: float | None = None


def target_macs(budget: float, teacher_macs: int) -> int:
    """``budget.macs``: a fraction of the teacher's MACs when <= 1, else absolute MACs."""
    return round(budget * teacher_macs) if budget <= 1 else round(budget)


def shaped_student(
    teacher: nn.Module,
    keep_cfg: Mapping[str, Sequence[int]],
    planes_keep: float,
    mid_keep: float,
    *,
    round_to: int = 1,
    include_first: bool = False,
) -> nn.Module:
    """The student the prune and slice stages would build for these settings (block removal,
    then every sliceable stage's planes and its blocks' mid channels at the given uniform
    fractions, widths by :func:`round_keep`); channels chosen by the data-free ``bn_l1``."""
    student = get_adapter(teacher).keep(teacher, {k: list(v) for k, v in keep_cfg.items()})
    return slice_uniform(
        student, planes_keep, mid_keep, round_to=round_to, include_first=include_first
    )


def slice_uniform(
    student: nn.Module,
    planes_keep: float,
    mid_keep: float,
    *,
    round_to: int = 1,
    include_first: bool = False,
) -> nn.Module:
    """A copy of ``student`` sliced as :func:`shaped_student` describes (``student`` itself
    when nothing is sliced)."""
    adapter = get_adapter(student)
    plan = plan_slice(
        student,
        planes_keep if planes_keep < 1 else None,
        mid_keep if mid_keep < 1 else None,
        stages=adapter.plane_stages(student, include_first=include_first),
        round_to=round_to,
    )
    if not plan.planes and not plan.mid:
        return student
    return adapter.slice(student, plan)


def fractions(shape: str, f: float) -> tuple[float, float]:
    """``(planes_keep, mid_keep)`` of ``shape`` at the fraction ``f`` (the other part stays 1)."""
    use_p, use_m = SHAPES[shape]
    return (f if use_p else 1.0), (f if use_m else 1.0)


def search(
    teacher: nn.Module,
    blocks: Sequence[BlockRef],
    scores: Mapping[str, float],
    target: int,
    input_size: int,
    *,
    ratios: Sequence[float],
    policy: str,
    tolerance: float = 0.02,
    round_to: int = 1,
    include_first: bool = False,
) -> tuple[list[Candidate], list[dict[str, Any]]]:
    """Every (ratio, shape) candidate within ``tolerance`` of ``target`` MACs, and a record
    of the ones that cannot reach it (their closest MACs)."""
    found: list[Candidate] = []
    missed: list[dict[str, Any]] = []

    def macs_of(kept: nn.Module, p: float, m: float) -> int:
        s = slice_uniform(kept, p, m, round_to=round_to, include_first=include_first)
        return int(count_macs(s, input_size)["macs"])

    def shaped_macs(kept: nn.Module, shape: str, f: float) -> int:
        return macs_of(kept, *fractions(shape, f))

    def one_ratio(ratio: float) -> None:
        keep = keep_cfg_from_removals(blocks, select_removals(blocks, scores, float(ratio)))
        kept = get_adapter(teacher).keep(teacher, keep)  # once per ratio
        full = macs_of(kept, 1.0, 1.0)
        if within(full, target, tolerance):
            found.append(Candidate(float(ratio), "blocks", 1.0, 1.0, full, keep))
        for shape in POLICY_SHAPES[policy]:
            best, _ = bisect(
                partial(shaped_macs, kept, shape),
                target,
                MIN_FRACTION,
                1.0,
                tolerance=tolerance,
                steps=BISECTION_STEPS,
            )
            macs = int(best.value)
            if within(macs, target, tolerance):
                found.append(Candidate(float(ratio), shape, *fractions(shape, best.x), macs, keep))
            else:
                missed.append({"ratio": float(ratio), "shape": shape, "closest_macs": macs})

    with progress() as bar:
        task = bar.add_task("budget search", total=len(ratios), unit="ratio")
        for i, ratio in enumerate(ratios):
            one_ratio(ratio)
            bar.update(task, completed=i + 1)
    return found, missed


def choose(
    candidates: list[Candidate], proxy: Callable[[Candidate], float]
) -> tuple[Candidate, list[Candidate]]:
    """Measure ``proxy`` (higher is better) for every candidate; the best, ties by fewer MACs."""
    if not candidates:
        raise ValueError("no candidates")
    with progress() as bar:
        task = bar.add_task("budget proxy", total=len(candidates), unit="candidate")
        for i, c in enumerate(candidates):
            c.proxy_top1 = float(proxy(c))
            bar.update(task, completed=i + 1)
    ranked = sorted(candidates, key=lambda c: (-(c.proxy_top1 or 0.0), c.macs))
    return ranked[0], ranked


def no_candidate_error(target: int, tolerance: float, missed: list[dict[str, Any]]) -> M2MError:
    closest = min(missed, key=lambda r: abs(r["closest_macs"] - target), default=None)
    hint = (
        f"; closest: {closest['closest_macs']:,} MACs (ratio {closest['ratio']}, "
        f"{closest['shape']})"
        if closest
        else ""
    )
    return M2MError(
        f"budget.macs: no candidate reaches {target:,} MACs within {tolerance:.0%}{hint}; "
        "change budget.ratios, budget.tolerance, the slice policy or the budget"
    )


def as_records(candidates: list[Candidate]) -> list[dict[str, Any]]:
    return [asdict(c) for c in candidates]
