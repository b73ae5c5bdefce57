"""Group-sparsity penalty on the channel groups a slicing step will rank (``kd.sparsity``).

Added to the KD loss of the distill stage and of the progressive slicing repairs, it pushes the
channels the cut will remove toward zero before they go, so the cut does less damage.

- ``bn_l1``: the L1 norm of the groups' BN scales (Network Slimming): ``sum |gamma_c|`` over
  every producer BN of every group.
- ``group_lasso``: per output channel of a group, the L2 norm of its coupled weights (the conv
  filter of every producer and its BN scale, as in DepGraph's group-norm regulariser), summed
  over channels and groups.

``ramp=linear`` grows the weight with the epoch: ``weight * epoch / epochs``.

Example:
    >>> groups = [g.producers for g in slice_groups(model, 0.5, 0.5, stages=["layer2"])]
    >>> pen = Sparsity(groups, weight=1e-4, kind="group_lasso")
    >>> loss = kd_loss + pen.weight_at(epoch, epochs) * pen.penalty()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

KINDS = ("bn_l1", "group_lasso")
RAMPS = ("none", "linear")

Producers = Sequence[tuple[nn.Conv2d, nn.BatchNorm2d]]


@dataclass
class Sparsity:
    """The penalty over ``groups`` (each a list of the conv/BN pairs producing its channels)."""

    groups: Sequence[Producers]
    weight: float
    kind: str = "bn_l1"
    ramp: str = "none"

    def weight_at(self, epoch: int, epochs: int) -> float:
        """The weight at 1-based ``epoch`` of ``epochs``."""
        if self.ramp == "linear":
            return self.weight * min(epoch / max(epochs, 1), 1.0)
        return self.weight

    def penalty(self) -> torch.Tensor:
        terms = []
        for producers in self.groups:
            if self.kind == "bn_l1":
                terms += [bn.weight.abs().sum() for _, bn in producers]
            else:  # one row per output channel: every producer's filter and BN scale
                rows = [c.weight.flatten(1) for c, _ in producers]
                rows += [bn.weight.unsqueeze(1) for _, bn in producers]
                terms.append(torch.linalg.vector_norm(torch.cat(rows, dim=1), dim=1).sum())
        return torch.stack(terms).sum()

    def parameters(self) -> list[torch.Tensor]:
        """The parameters the penalty reads."""
        out: list[torch.Tensor] = []
        for producers in self.groups:
            out += [bn.weight for _, bn in producers]
            if self.kind == "group_lasso":
                out += [c.weight for c, _ in producers]
        return out


def sparsity_from_config(cfg: Any, groups: Sequence[Producers]) -> Sparsity | None:
    """``kd.sparsity`` over ``groups``; None when its weight is 0 or there is no group (the
    KD loss is then exactly what it is without the penalty)."""
    if cfg is None or float(cfg.weight) == 0 or not groups:
        return None
    return Sparsity(list(groups), float(cfg.weight), str(cfg.kind), str(cfg.ramp))
