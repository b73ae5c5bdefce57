"""The slicing plan: which channel groups a slicing step ranks, how many channels each keeps,
and which channels it keeps; plus soft masks that decay those channels to zero in place.

One rule for the slice stage (every schedule), the MAC-budget allocator and the sparsity
penalty: a step over ``stages`` ranks every stage's planes (the outputs of
``adapter.plane_producers``) and then the mid channels of each of their blocks
(``adapter.mid_producers``), each with ``round_keep`` channels at its keep fraction; a group
whose keep rounds to its full width is left alone. Every selection reads the same model.

Example:
    >>> groups = slice_groups(student, 0.5, 0.5, stages=["layer2", "layer3"])
    >>> plan = plan_slice(student, 0.5, 0.5, stages=["layer2", "layer3"])
    >>> sliced = get_adapter(student).slice(student, plan)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m2mdc.arch import SlicePlan, get_adapter
from m2mdc.errors import M2MError
from m2mdc.fileio import read_json
from m2mdc.scoring.channels import round_keep, select_channels

Producers = list[tuple[nn.Conv2d, nn.BatchNorm2d]]


def fraction(value: Any, stage: str, key: str) -> float:
    """A keep fraction: one number for every stage, or a per-stage mapping (missing = 1.0)."""
    v = value.get(stage, 1.0) if isinstance(value, Mapping) else value
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise M2MError(
            f"{key} must be a number in (0, 1] or a mapping stage -> number; got {v!r}"
        ) from None
    if not 0 < f <= 1:
        raise M2MError(f"{key}={f} for {stage} is out of range; allowed: > 0 and <= 1")
    return f


@dataclass
class Group:
    """One channel group a slicing step ranks.

    Attributes:
        kind: ``"planes"`` (``name`` is a stage) or ``"mid"`` (``name`` is a block).
        producers: the conv/BN pairs whose outputs are the group's channels.
        module: the module whose output carries the channels (activation-based selectors).
        keep: how many channels the cut keeps (``< width``).
    """

    kind: str
    name: str
    producers: Producers
    module: nn.Module
    keep: int

    @property
    def width(self) -> int:
        return self.producers[0][0].out_channels


SelectFn = Callable[[Group], list[int]]


def slice_groups(
    model: nn.Module,
    planes_keep: Any,
    mid_keep: Any,
    *,
    stages: Sequence[str],
    round_to: int = 1,
) -> list[Group]:
    """The groups a step over ``stages`` cuts: planes first (stage order), then mid channels
    (block order; a block may hold several, ``adapter.mid_groups``). ``planes_keep`` /
    ``mid_keep``: a fraction, a mapping stage -> fraction, or None (that kind is not sliced)."""
    adapter = get_adapter(model)
    groups: list[Group] = []
    for stage in stages if planes_keep is not None else []:
        producers = adapter.plane_producers(model, stage)
        c = producers[0][0].out_channels
        k = round_keep(c, fraction(planes_keep, stage, "slice.planes_keep"), round_to)
        if k < c:
            groups.append(Group("planes", stage, producers, adapter.stage_output(model, stage), k))
    for b in adapter.blocks(model) if mid_keep is not None else []:
        for key in adapter.mid_groups(model, b.name) if b.stage in stages else []:
            prod = adapter.mid_producers(model, key)
            assert prod is not None, f"{key} has no mid producers"
            c = prod[0].out_channels
            k = round_keep(c, fraction(mid_keep, b.stage, "slice.mid_keep"), round_to)
            if k < c:
                groups.append(Group("mid", key, [prod], prod[1], k))
    return groups


def mid_block(model: nn.Module, key: str) -> str:
    """The block a mid group belongs to: the block named ``key``, or the block whose module
    holds the layer ``key`` (the generic adapter keys a group by its producing conv)."""
    for b in get_adapter(model).blocks(model):
        if key == b.name or key.startswith(b.name + "."):
            return b.name
    raise ValueError(f"{key} is not a mid group of a block of this model")


def plan_slice(
    model: nn.Module,
    planes_keep: Any,
    mid_keep: Any,
    *,
    stages: Sequence[str],
    round_to: int = 1,
    selector: str = "bn_l1",
    select_fn: SelectFn | None = None,
) -> SlicePlan:
    """The :class:`SlicePlan` of one step over ``stages`` (see :func:`slice_groups`); channels
    chosen by ``select_fn(group)`` or, without it, by the data-free ``selector``."""
    plan = SlicePlan(planes={}, mid={})
    for g in slice_groups(model, planes_keep, mid_keep, stages=stages, round_to=round_to):
        keep = select_fn(g) if select_fn else select_channels(selector, g.producers, g.keep)
        (plan.planes if g.kind == "planes" else plan.mid)[g.name] = keep
    return plan


def head_keep(model: nn.Module, plan: SlicePlan) -> list[int] | None:
    """The classifier inputs ``plan`` keeps when it cuts the planes that feed the classifier
    (the last stage's, when they are its inputs); None when the classifier keeps its width."""
    adapter = get_adapter(model)
    last = adapter.plane_stages(model, include_first=True)[-1]
    width = adapter.plane_producers(model, last)[0][0].out_channels
    keep = plan.planes.get(last)
    return keep if keep is not None and width == adapter.classifier(model).in_features else None


def _mid_bns(model: nn.Module, block: str, bn: nn.BatchNorm2d) -> list[nn.BatchNorm2d]:
    """The BNs whose outputs carry a block's mid channels: the producer's, and the BN after
    each depthwise conv that follows it (MobileNetV2), up to the first channel-mixing conv."""
    mods = list(get_adapter(model).block_module(model, block).modules())
    out, depthwise = [bn], False
    for m in mods[next(i for i, x in enumerate(mods) if x is bn) + 1 :]:
        if isinstance(m, nn.Conv2d):
            c = bn.num_features
            if not m.groups == m.in_channels == m.out_channels == c:
                break
            depthwise = True
        elif isinstance(m, nn.BatchNorm2d) and depthwise:
            out.append(m)
            depthwise = False
    return out


DECAY_SHAPES = ("cosine", "linear")


class ChannelDecay(nn.Module):
    """Soft masks for a :class:`SlicePlan`: the outputs of the removed channels at every BN
    that carries them (all plane producers of a stage, so the residual stream channel is zero
    through the whole stage; each block's mid BN) are multiplied by a factor that decays from 1
    to 0 over ``total_steps`` training steps (:meth:`advance` before each step's forward).

    The factor is a function of the step counter, a buffer saved with the training state, so a
    resumed training continues the same schedule. At factor 0 the removed channels are exactly
    zero, and ``adapter.slice(model, plan)`` leaves the outputs unchanged.
    ``feature_keep``: the kept penultimate features when the last stage's planes are cut.
    """

    def __init__(
        self, model: nn.Module, plan: SlicePlan, total_steps: int, shape: str = "cosine"
    ) -> None:
        super().__init__()
        if shape not in DECAY_SHAPES:
            raise M2MError(f"slice.decay={shape!r}; choose one of {', '.join(DECAY_SHAPES)}")
        adapter = get_adapter(model)
        self.total, self.shape = max(int(total_steps), 1), shape
        self.step: torch.Tensor
        self.factor: torch.Tensor
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("factor", torch.ones(()))
        targets: list[tuple[nn.BatchNorm2d, list[int]]] = []
        for stage, keep in plan.planes.items():
            targets += [(bn, keep) for _, bn in adapter.plane_producers(model, stage)]
        for block, keep in plan.mid.items():
            prod = adapter.mid_producers(model, block)
            assert prod is not None, f"{block} has no mid channels"
            targets += [(bn, keep) for bn in _mid_bns(model, mid_block(model, block), prod[1])]
        self._handles = [bn.register_forward_hook(self._hook(bn, keep)) for bn, keep in targets]
        self.feature_keep = head_keep(model, plan)

    def _hook(self, bn: nn.BatchNorm2d, keep: list[int]):
        kept = torch.zeros(bn.num_features, dtype=torch.bool)
        kept[keep] = True

        def hook(module: nn.Module, inputs: object, out: torch.Tensor) -> torch.Tensor:
            k = kept.to(out.device).view(1, -1, 1, 1)
            return torch.where(k, out, out * self.factor.to(out.dtype))

        return hook

    def value_at(self, step: int) -> float:
        """The factor after ``step`` training steps (1 at 0, exactly 0 from ``total_steps``)."""
        t = min(step / self.total, 1.0)
        return 0.5 * (1 + math.cos(math.pi * t)) if self.shape == "cosine" else 1.0 - t

    def advance(self) -> None:
        """One training step: the factor its forward pass uses (the last step uses 0)."""
        self.step += 1
        self.factor.fill_(0.0 if int(self.step) >= self.total else self.value_at(int(self.step)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# slice.name -> (slices the planes, slices the mid channels)
POLICIES = {
    "planes_mid": (True, True),
    "planes": (True, False),
    "mid": (False, True),
    "none": (False, False),
}


def slice_fractions(cfg: Any, run_dir: Path) -> tuple[Any, Any]:
    """(planes_keep, mid_keep) of the slice stage: None for a kind its policy does not slice;
    the allocator's fractions (``prune/plan.json`` in ``run_dir``) when ``budget.macs`` is set."""
    sc = cfg.slice
    planes_keep, mid_keep = sc.planes_keep, sc.mid_keep
    if cfg.budget.macs is not None:
        choice = read_json(run_dir / "prune" / "plan.json")["budget"]["choice"]
        planes_keep, mid_keep = float(choice["planes_keep"]), float(choice["mid_keep"])
    do_planes, do_mid = POLICIES[sc.name]
    return (planes_keep if do_planes else None), (mid_keep if do_mid else None)


def slice_stages(cfg: Any, model: nn.Module) -> list[str]:
    """The stages the slice stage cuts (none when its policy slices nothing)."""
    sc = cfg.slice
    if sc.name == "none":
        return []
    return get_adapter(model).plane_stages(model, include_first=bool(sc.include_first_stage))
