"""The optimizer of a training section (``teacher.optim``, ``kd.optim``): Adam, or SGD with
momentum, Nesterov and weight decay.

``adam`` (the default) is the Adam m2mdc has always trained with (fused as ``perf.fused_adam``
says), without weight decay unless ``weight_decay`` is given (then Adam's own L2 form, added
to the gradient). ``sgd`` is the field's standard recipe for CIFAR and ImageNet ResNets:
momentum 0.9, Nesterov, weight decay 5e-4 unless given (PyTorch's SGD, the per-parameter loop
on a CPU). Weight decay never applies to biases and normalisation weights (the
one-dimensional parameters), as is standard (Goyal et al. 2017): the parameters are split
into two groups, the decayed ones first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from m2mdc.config import OPTIMIZERS
from m2mdc.train import perf as perf_mod

SGD_WEIGHT_DECAY = 5e-4  # weight_decay=null under sgd


@dataclass(frozen=True)
class Optim:
    """A section's optimizer settings (``momentum`` and ``nesterov``: ``sgd`` only)."""

    name: str = "adam"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float | None = None  # None: SGD_WEIGHT_DECAY under sgd, 0 under adam

    @classmethod
    def of(cls, section: Any) -> Optim:
        """The settings of a config section (``teacher``, ``kd``)."""
        wd = section.weight_decay
        return cls(
            name=str(section.optim),
            momentum=float(section.momentum),
            nesterov=bool(section.nesterov),
            weight_decay=None if wd is None else float(wd),
        )

    @property
    def decay(self) -> float:
        """The weight decay applied to the decayed group."""
        if self.weight_decay is not None:
            return self.weight_decay
        return SGD_WEIGHT_DECAY if self.name == "sgd" else 0.0


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: the weights of convolutions and linear layers (two or more dimensions) with
    ``weight_decay``; biases and normalisation weights (one dimension) without. Empty groups
    are left out."""
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make(params: list[nn.Parameter], lr: float, optim: Optim, perf: Any) -> torch.optim.Optimizer:
    """The optimizer of ``params`` at ``lr``. Adam without weight decay takes the parameters
    as one group, exactly as before these settings existed."""
    if optim.name not in OPTIMIZERS:
        raise ValueError(f"optim={optim.name!r}: choose one of {', '.join(OPTIMIZERS)}")
    decay = optim.decay
    groups: list[Any] = param_groups(params, decay) if decay else params
    if optim.name == "adam":
        return perf_mod.adam(groups, lr, perf)
    return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov)
