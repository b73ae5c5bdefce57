"""Torch-Pruning (DepGraph) as a peer method: uniform channel pruning to a MAC target.

Torch-Pruning removes one uniform ratio of channels from every prunable group (its
``BasePruner``, not global; the classifier is kept), ranked by an importance (``l1``: filter
L1 norm, ``bn_scale``: |gamma|, ``taylor``: first-order Taylor on batches of CE gradients).
With a uniform ratio the widths, and so the MACs, depend on the ratio alone, so
:func:`bisect_ratio` finds the ratio whose MACs (counted by m2mdc's own counter) are within a
tolerance of a target using cheap L1 importance; the model is then pruned once with the chosen
importance (:func:`prune_uniform`). The stage that trains and reports it is
``compare=torch_pruning`` (:mod:`m2mdc.stages.compare`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m2mdc.arch import get_adapter
from m2mdc.errors import M2MError
from m2mdc.profiling import count_macs

NAME = "peer_torch_pruning"
MAX_RATIO = 0.95
BISECTION_STEPS = 30


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError:
        raise M2MError(
            "compare=torch_pruning needs the torch-pruning package: pip install 'm2mdc[peers]'"
        ) from None
    return torch_pruning


def prune_uniform(
    teacher: nn.Module,
    ratio: float,
    input_size: int,
    importance: str = "l1",
    grad_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    """A copy of ``teacher`` (on the CPU) with ``ratio`` of the channels of every prunable
    group removed by Torch-Pruning; the classifier's outputs are kept."""
    tp = _torch_pruning()
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
    lo, hi = 0.0, MAX_RATIO
    trials: list[dict[str, float]] = []
    best: tuple[float, int] | None = None
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        macs = count_macs(prune_uniform(teacher, mid, input_size), input_size)["macs"]
        trials.append({"ratio": mid, "macs": macs})
        if best is None or abs(macs - target_macs) < abs(best[1] - target_macs):
            best = (mid, macs)
        if abs(macs - target_macs) <= tolerance * target_macs:
            break
        lo, hi = (mid, hi) if macs > target_macs else (lo, mid)
    assert best is not None
    if abs(best[1] - target_macs) > tolerance * target_macs:
        raise M2MError(
            f"{NAME}: no uniform Torch-Pruning ratio in [0, {MAX_RATIO}] reaches "
            f"{target_macs:,} MACs within {tolerance:.0%} (closest: {best[1]:,} at ratio "
            f"{best[0]:.4f}); raise peer.mac_tolerance"
        )
    return best[0], best[1], trials
