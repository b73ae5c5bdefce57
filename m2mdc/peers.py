"""Torch-Pruning (DepGraph) as a peer method: uniform channel pruning to a MAC or latency
target.

Torch-Pruning removes one uniform ratio of channels from every prunable group (its
``BasePruner``, not global; the classifier is kept), ranked by an importance (``l1``: filter
L1 norm, ``bn_scale``: |gamma|, ``taylor``: first-order Taylor on batches of CE gradients).
With a uniform ratio the widths, and so the MACs and the latency, depend on the ratio alone,
so the ratio is bisected (:func:`m2mdc.bisection.bisect`) with cheap L1 importance:
:func:`bisect_ratio` until the MACs (counted by m2mdc's own counter) are within a tolerance of
a target, :func:`match_latency` until the measured batch-1 latency is within a tolerance of a
student's. The model is then pruned once with the chosen importance (:func:`prune_uniform`).
The stages that train and report them are ``compare=torch_pruning`` with ``peer.match``
(:mod:`m2mdc.stages.compare`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from m2mdc.arch import get_adapter
from m2mdc.bisection import Trial, bisect, within
from m2mdc.errors import M2MError
from m2mdc.profiling import count_macs, paired_latency

NAME = "peer_torch_pruning"  # matched to the student's MACs
LATENCY_NAME = "peer_torch_pruning_latency"  # matched to the student's measured latency
MAX_RATIO = 0.95
# the last bracket is MAX_RATIO / 2**20 wide: far below one channel of any group
BISECTION_STEPS = 20
LATENCY_STEPS = 12  # timed bisection trials: the last bracket is MAX_RATIO / 4096 wide


def prune_uniform(
    teacher: nn.Module,
    ratio: float,
    input_size: int,
    importance: str = "l1",
    grad_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    """A copy of ``teacher`` (on the CPU) with ``ratio`` of the channels of every prunable
    group removed by Torch-Pruning; the classifier's outputs are kept."""
    model = copy.deepcopy(teacher).cpu().eval()
    if ratio <= 0:
        return model
    imp = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.TaylorImportance(),
    }[importance]()
    example = torch.zeros(1, 3, input_size, input_size)
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=imp,
        pruning_ratio=ratio,
        ignored_layers=[get_adapter(teacher).classifier(model)],
    )
    if importance == "taylor":  # first-order Taylor needs the gradients of the loss
        model.zero_grad()
        for x, y in grad_batches or []:
            F.cross_entropy(model(x.cpu()), y.cpu()).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def bisect_ratio(
    teacher: nn.Module, target_macs: int, input_size: int, tolerance: float
) -> tuple[float, int, list[dict[str, float]]]:
    """The uniform ratio whose pruned MACs are closest to ``target_macs`` (bisection on the
    monotone MACs(ratio) until within ``tolerance``), its MACs and the trials."""
    best, trials = bisect(
        lambda ratio: count_macs(prune_uniform(teacher, ratio, input_size), input_size)["macs"],
        target_macs,
        0.0,
        MAX_RATIO,
        tolerance=tolerance,
        steps=BISECTION_STEPS,
        increasing=False,
    )
    macs = int(best.value)
    if not within(macs, target_macs, tolerance):
        raise M2MError(unreachable_message(target_macs, tolerance, trials))
    return best.x, macs, [{"ratio": t.x, "macs": t.value} for t in trials]


def unreachable_message(target: int, tolerance: float, trials: list[Trial]) -> str:
    """Why no uniform ratio matched ``target`` MACs: the trials' nearest MACs on each side (a
    uniform ratio moves a narrow model's MACs in steps: every group of one width loses a channel
    at the same ratio) and the ``peer.mac_tolerance`` that would accept the nearer one."""
    above = min((t for t in trials if t.value >= target), key=lambda t: t.value, default=None)
    below = max((t for t in trials if t.value < target), key=lambda t: t.value, default=None)
    head = (
        f"{NAME}: no uniform Torch-Pruning ratio in [0, {MAX_RATIO}] reaches {target:,} MACs "
        f"within {tolerance:.0%}"
    )
    if above is None or below is None:
        t = above or below
        assert t is not None
        return f"{head} (closest: {int(t.value):,} at ratio {t.x:.4f}); raise peer.mac_tolerance"
    sides = [
        f"{int(t.value):,} ({t.value / target - 1:+.1%}) at ratio {t.x:.4f}" for t in (above, below)
    ]
    gap = min(abs(t.value / target - 1) for t in (above, below))
    need = math.ceil(gap * 100) / 100
    return (
        f"{head}: the ratio moves this model's MACs in steps, the nearest are {sides[0]} and "
        f"{sides[1]}; set peer.mac_tolerance={need:g} or more"
    )


def match_latency(
    teacher: nn.Module,
    student: nn.Module,
    input_size: int,
    tolerance: float,
    repeats: int,
    device: str = "cpu",
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The uniform ratio at which the pruned teacher's batch-1 latency is within
    ``tolerance`` (relative) of ``student``'s, and every trial.

    Each trial times the pruned teacher and the student interleaved
    (:func:`m2mdc.profiling.paired_latency`, ``repeats`` rounds): the value bisected is the
    median of their per-round latency ratio, which a load change on the machine does not
    move. The fastest peer (``MAX_RATIO``) is timed first; when it is still slower than the
    student the target is out of reach and this raises at once. Otherwise the ratio is
    bisected in ``[0, MAX_RATIO]`` (latency falls as the ratio grows). ``on_trial`` sees every
    trial as it is measured.

    Returns:
        The trial closest to the student's latency and every trial, each with ``ratio``,
        ``macs``, ``latency_ms``, ``student_latency_ms`` and ``latency_ratio`` (peer /
        student).
    """
    trials: list[dict[str, Any]] = []

    def latency_ratio(ratio: float) -> float:
        peer = prune_uniform(teacher, ratio, input_size)
        lat = paired_latency(peer, student, input_size, repeats=repeats, device=device)
        trials.append(
            {
                "ratio": ratio,
                "macs": count_macs(peer, input_size)["macs"],
                "latency_ms": lat["latency_ms"],
                "student_latency_ms": lat["reference_latency_ms"],
                "latency_ratio": lat["latency_ratio"],
            }
        )
        if on_trial is not None:
            on_trial(trials[-1])
        return float(lat["latency_ratio"])

    fastest = latency_ratio(MAX_RATIO)
    if fastest > 1.0 + tolerance:
        t = trials[0]
        raise M2MError(
            f"{LATENCY_NAME}: the inner_slice student ({t['student_latency_ms']:.3g} ms at "
            f"batch 1) is faster than any uniform Torch-Pruning peer (closest: "
            f"{t['latency_ms']:.3g} ms at ratio {MAX_RATIO}, {fastest:.2f}x); no peer runs at "
            f"its latency: drop latency from peer.match"
        )
    if not within(fastest, 1.0, tolerance):
        bisect(
            latency_ratio, 1.0, 0.0, MAX_RATIO, tolerance=tolerance, steps=LATENCY_STEPS,
            increasing=False,
        )  # fmt: skip
    best = min(trials, key=lambda t: abs(t["latency_ratio"] - 1.0))
    if not within(best["latency_ratio"], 1.0, tolerance):
        raise M2MError(
            f"{LATENCY_NAME}: no uniform Torch-Pruning ratio in [0, {MAX_RATIO}] runs within "
            f"{tolerance:.0%} of the inner_slice student's batch-1 latency (closest: "
            f"{best['latency_ratio']:.3f}x at ratio {best['ratio']:.4f}); the timing is too "
            "noisy or the latency jumps there: raise peer.latency_repeats or "
            "peer.latency_tolerance"
        )
    return best, trials
