"""Channel selectors for planes and mid slicing (registry ``slice.selector``, paper §3.2).

A selector decides which channels of one plane group (or one block's mid width) survive. Its
inputs are the ``producers``: the ``(Conv2d, BatchNorm2d)`` pairs whose outputs are these
channels (ResNet planes of a stage: every block's ``conv2/bn2`` plus the downsample conv/BN; a
mid width: ``conv1/bn1``), the number ``k`` to keep and, for activation-based selectors, the
channels' pooled probe activations ``[N, C]`` with labels.

Example:
    >>> keep = select_channels("bn_gamma", [(blk.conv2, blk.bn2) for blk in model.layer3], k=128)
    >>> len(keep), keep == sorted(keep)
    (128, True)
    >>> CHANNEL_SELECTORS.get("cmi").needs_activations
    True

Score-based selectors (``bn_gamma``, ``l1``, ``bn_l1``, ``random``) keep the top-k scores, ties
to the lower index; ``cmi`` selects greedily (:func:`~m2mdc.scoring.mi.cmim_select`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from m2mdc.registry import Registry
from m2mdc.scoring.mi import binned_mi, cmim_select, encode_labels, quantile_bin

Producers = Sequence[tuple[nn.Conv2d, nn.BatchNorm2d]]
ScoreFn = Callable[..., Tensor]
SelectFn = Callable[..., list[int]]


@dataclass(frozen=True)
class ChannelSelector:
    """A registered selector.

    Attributes:
        score: ``score(producers, pooled, labels, *, seed, bins) -> Tensor[C]`` per-channel
            scores (higher = keep); what ``scores.json`` reports.
        needs_activations: whether ``pooled``/``labels`` are required.
        pick: optional ``pick(producers, k, pooled, labels, *, seed, bins) -> list[int]`` for
            selectors that are not top-k of ``score``.
    """

    score: ScoreFn
    needs_activations: bool
    pick: SelectFn | None = None


CHANNEL_SELECTORS: Registry[ChannelSelector] = Registry("slice.selector")
SELECTORS = CHANNEL_SELECTORS  # short alias used by the slice stage


def _width(producers: Producers, pooled: Tensor | None) -> int:
    """Channel count C shared by every producer (and the pooled activations)."""
    if not producers:
        raise ValueError("a channel selector needs at least one (conv, bn) producer")
    widths = {c.out_channels for c, _ in producers} | {b.num_features for _, b in producers}
    if pooled is not None:
        if pooled.dim() != 2:
            raise ValueError(f"pooled must be [N, C], got {tuple(pooled.shape)}")
        widths.add(int(pooled.shape[1]))
    if len(widths) != 1:
        raise ValueError(f"producers/pooled disagree on the channel count: {sorted(widths)}")
    return widths.pop()


def _gamma(producers: Producers) -> Tensor:
    """mean over producers of |gamma_c|."""
    out = []
    for _, bn in producers:
        if bn.weight is None:
            raise ValueError("bn_gamma needs affine BatchNorm2d producers")
        out.append(bn.weight.detach().abs().to(torch.float64).cpu())
    return torch.stack(out).mean(dim=0)


def _l1(producers: Producers) -> Tensor:
    """mean over producers of ||W_c||_1 / fan_in: the filter L1 norm of output channel c divided
    by its element count (in/groups * kh * kw), so a 1x1 downsample and a 3x3 conv2 weigh
    equally in the average instead of the wider filter dominating."""
    out = []
    for conv, _ in producers:
        w = conv.weight.detach().to(torch.float64).cpu()
        out.append(w.abs().flatten(1).sum(dim=1) / w[0].numel())
    return torch.stack(out).mean(dim=0)


def _unit_max(v: Tensor) -> Tensor:
    m = v.max()
    return v / m if float(m) > 0 else v


def _register(
    name: str, needs_activations: bool, pick: SelectFn | None = None
) -> Callable[[ScoreFn], ScoreFn]:
    def deco(fn: ScoreFn) -> ScoreFn:
        CHANNEL_SELECTORS.add(name, ChannelSelector(fn, needs_activations, pick))
        return fn

    return deco


@_register("bn_gamma", needs_activations=False)
def bn_gamma_scores(
    producers: Producers,
    pooled: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    seed: int = 0,
    bins: int = 10,
) -> Tensor:
    """s_c = mean_p |gamma_{p,c}| over the producers' BatchNorms (network slimming)."""
    _width(producers, None)
    return _gamma(producers)


@_register("l1", needs_activations=False)
def l1_scores(
    producers: Producers,
    pooled: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    seed: int = 0,
    bins: int = 10,
) -> Tensor:
    """s_c = mean_p ||W_{p,c}||_1 / fan_in_p (filter-norm pruning, fan-in normalised)."""
    _width(producers, None)
    return _l1(producers)


@_register("bn_l1", needs_activations=False)
def bn_l1_scores(
    producers: Producers,
    pooled: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    seed: int = 0,
    bins: int = 10,
) -> Tensor:
    """s_c = (g_c / max g + l_c / max l) / 2 with g = bn_gamma and l = l1 scores.

    Each signal is divided by its maximum so both lie in [0, 1] and neither dominates because
    of its units (|gamma| ~ 1 vs mean |w| ~ 1e-2); an all-zero signal is left at zero.
    """
    _width(producers, None)
    return (_unit_max(_gamma(producers)) + _unit_max(_l1(producers))) / 2


@_register("random", needs_activations=False)
def random_scores(
    producers: Producers,
    pooled: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    seed: int = 0,
    bins: int = 10,
) -> Tensor:
    """Uniform scores from ``torch.Generator().manual_seed(seed)``: top-k of them is a uniformly
    random k-subset, identical for the same seed and width (a baseline for ablations)."""
    c = _width(producers, None)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(c, generator=gen, dtype=torch.float64)


def _probe(producers: Producers, pooled: Tensor | None, labels: Tensor | None) -> int:
    if pooled is None or labels is None:
        raise ValueError("the cmi selector needs pooled activations and labels of the channels")
    if labels.reshape(-1).shape[0] != pooled.shape[0]:
        raise ValueError(f"pooled has {pooled.shape[0]} rows but labels {labels.numel()}")
    return _width(producers, pooled)


def cmi_pick(
    producers: Producers,
    k: int,
    pooled: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    seed: int = 0,
    bins: int = 10,
) -> list[int]:
    """Greedy conditional-MI selection (CMIM) on quantile-binned pooled activations.

    First the channel with the largest I(X_c; Y), then repeatedly the channel maximising
    min_{s picked} I(X_c; Y | X_s): Fleuret's tractable stand-in for "most information about
    the label given the channels already picked" (see :func:`~m2mdc.scoring.mi.cmim_select`).
    """
    c = _probe(producers, pooled, labels)
    assert pooled is not None and labels is not None  # checked by _probe
    if k == c:  # everything survives; skip the O(k^2 N) greedy pass
        return list(range(c))
    y, num_classes = encode_labels(labels)
    return cmim_select(quantile_bin(pooled, bins), y, k, bins, num_classes)


@_register("cmi", needs_activations=True, pick=cmi_pick)
def cmi_scores(
    producers: Producers,
    pooled: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    seed: int = 0,
    bins: int = 10,
) -> Tensor:
    """Per-channel I(bin(X_c); Y) in nats, for reporting (selection itself is :func:`cmi_pick`)."""
    _probe(producers, pooled, labels)
    assert pooled is not None and labels is not None
    return binned_mi(pooled, labels, bins=bins)


def channel_scores(
    name: str,
    producers: Producers,
    pooled: Tensor | None = None,
    labels: Tensor | None = None,
    seed: int = 0,
    bins: int = 10,
) -> Tensor:
    """Per-channel ``[C]`` float64 scores of selector ``name`` (higher = more worth keeping)."""
    return CHANNEL_SELECTORS.get(name).score(producers, pooled, labels, seed=seed, bins=bins)


def select_channels(
    name: str,
    producers: Producers,
    k: int,
    pooled: Tensor | None = None,
    labels: Tensor | None = None,
    seed: int = 0,
    bins: int = 10,
) -> list[int]:
    """Indices of the ``k`` channels selector ``name`` keeps: sorted, distinct, in ``[0, C)``.

    Raises:
        M2MError: unknown selector name.
        ValueError: ``k`` outside ``[1, C]``, inconsistent producers, or missing activations
            for a selector with ``needs_activations``.
    """
    sel = CHANNEL_SELECTORS.get(name)
    c = _width(producers, pooled)
    if not 1 <= k <= c:
        raise ValueError(f"k must be in [1, {c}], got {k}")
    if sel.pick is not None:
        keep = sel.pick(producers, k, pooled, labels, seed=seed, bins=bins)
    else:
        scores = sel.score(producers, pooled, labels, seed=seed, bins=bins)
        # Stable descending sort: equal scores keep the lower channel index.
        keep = torch.sort(scores, descending=True, stable=True).indices[:k].tolist()
    out = sorted(int(i) for i in keep)
    if len(set(out)) != k or out[0] < 0 or out[-1] >= c:
        raise RuntimeError(f"selector '{name}' returned an invalid selection for k={k}, C={c}")
    return out


def round_keep(c: int, fraction: float, round_to: int = 1) -> int:
    """Channels to keep out of ``c`` for a keep ``fraction``.

    k is the multiple of ``round_to`` nearest to ``fraction * c`` (halves round up; rounding
    once avoids the double-rounding drift of rounding to an integer first), then clamped to
    ``[min(round_to, c), c]``: at least one ``round_to`` group (at least 1 channel), never more
    than ``c`` (so ``c`` itself may be returned even if it is not a multiple).

    Example:
        >>> round_keep(64, 0.5, 8), round_keep(100, 0.3, 8), round_keep(4, 0.1, 8)
        (32, 32, 4)

    Raises:
        ValueError: ``c < 1``, ``fraction`` outside ``(0, 1]`` or ``round_to < 1``.
    """
    if c < 1 or round_to < 1 or not 0 < fraction <= 1:
        raise ValueError(
            f"round_keep needs c >= 1, 0 < fraction <= 1, round_to >= 1; got {c}, {fraction}, "
            f"{round_to}"
        )
    # The epsilon keeps products like 0.35 * 10 = 3.4999999999999996 on the intended side.
    k = math.floor(fraction * c / round_to + 0.5 + 1e-9) * round_to
    return min(max(k, round_to), c)
