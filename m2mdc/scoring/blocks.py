"""Block scorers (registry ``score.method``): how informative is each prunable block?

A higher score means a more useful block; pruning removes the lowest-scoring free blocks
(paper §3.1). Every scorer has the signature

    scorer(block, pooled, labels, *, bins, seed, name) -> float

where ``pooled`` is the block's ``[N, C]`` spatially pooled output on the probe set and
``labels`` the probe labels; both are None for scorers that do not need activations
(``needs_activations`` is False), so :func:`score_blocks` only runs the probe when needed.

Example:
    >>> scores = score_blocks(model, {b.name: model.get_submodule(b.name) for b in blocks},
    ...                       "mi", probe_loader, probe_samples=5000, bins=10, seed=0)
    >>> rank(scores)  # {"layer4.1": 1, ...}: rank 1 = most informative

Add a scorer with ``@register_block_scorer("name", needs_activations=...)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from m2mdc.registry import Registry
from m2mdc.scoring.activations import ProgressFn, collect_pooled
from m2mdc.scoring.mi import binned_mi

ScoreFn = Callable[..., float]


@dataclass(frozen=True)
class BlockScorer:
    """A registered block score function and whether it needs probe activations."""

    fn: ScoreFn
    needs_activations: bool

    def __call__(
        self,
        block: nn.Module,
        pooled: Tensor | None,
        labels: Tensor | None,
        *,
        bins: int = 10,
        seed: int = 0,
        name: str = "",
    ) -> float:
        return float(self.fn(block, pooled, labels, bins=bins, seed=seed, name=name))


BLOCK_SCORERS: Registry[BlockScorer] = Registry("score.method")


def register_block_scorer(name: str, needs_activations: bool) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator adding ``fn`` to :data:`BLOCK_SCORERS` under ``name``."""

    def deco(fn: ScoreFn) -> ScoreFn:
        BLOCK_SCORERS.add(name, BlockScorer(fn, needs_activations))
        return fn

    return deco


@register_block_scorer("mi", needs_activations=True)
def mi_score(
    block: nn.Module,
    pooled: Tensor | None,
    labels: Tensor | None,
    *,
    bins: int,
    seed: int,
    name: str,
) -> float:
    """Paper eq. (§3.1): s_b = 1/C_b sum_c I(bin(Z_bc); Y), quantile bins, in nats."""
    if pooled is None or labels is None:
        raise ValueError(f"block '{name}': the mi score needs pooled activations and labels")
    return float(binned_mi(pooled, labels, bins=bins).mean())


def _conv_weights(block: nn.Module) -> list[Tensor]:
    return [m.weight for m in block.modules() if isinstance(m, nn.Conv2d)]


@register_block_scorer("l1", needs_activations=False)
def l1_score(
    block: nn.Module,
    pooled: Tensor | None,
    labels: Tensor | None,
    *,
    bins: int,
    seed: int,
    name: str,
) -> float:
    """Mean absolute conv weight: sum_W ||W||_1 / sum_W numel(W) over every Conv2d in the block.

    Dividing the L1 norm by the element count makes the score a per-weight magnitude, so a
    512-wide block does not outscore a 64-wide one merely for having more weights.
    """
    weights = _conv_weights(block)
    if not weights:
        raise ValueError(f"block '{name}' has no Conv2d; the l1 score needs conv weights")
    with torch.no_grad():
        total = sum(float(w.detach().abs().sum()) for w in weights)
    return total / sum(w.numel() for w in weights)


# Shortcut paths are not part of the residual branch whose usefulness a block score measures.
_SHORTCUT_NAMES = ("downsample", "shortcut")


def last_batchnorm(block: nn.Module) -> nn.BatchNorm2d | None:
    """The last BatchNorm2d of ``block``'s main branch in registration order (ResNet: ``bn2``,
    skipping ``downsample``; MobileNetV2: the projection BN), or None."""
    last = None
    for mod_name, m in block.named_modules():
        if isinstance(m, nn.BatchNorm2d) and mod_name.split(".")[0] not in _SHORTCUT_NAMES:
            last = m
    return last


@register_block_scorer("bn_gamma", needs_activations=False)
def bn_gamma_score(
    block: nn.Module,
    pooled: Tensor | None,
    labels: Tensor | None,
    *,
    bins: int,
    seed: int,
    name: str,
) -> float:
    """Mean |gamma| of the block's last main-branch BatchNorm2d (see :func:`last_batchnorm`)."""
    bn = last_batchnorm(block)
    if bn is None or bn.weight is None:
        raise ValueError(f"block '{name}' has no affine BatchNorm2d; bn_gamma cannot score it")
    return float(bn.weight.detach().abs().mean())


@register_block_scorer("random", needs_activations=False)
def random_score(
    block: nn.Module,
    pooled: Tensor | None,
    labels: Tensor | None,
    *,
    bins: int,
    seed: int,
    name: str,
) -> float:
    """Uniform [0, 1) drawn from a generator seeded by ``(seed, name)``: the same seed gives the
    same scores whatever the order blocks are scored in (a baseline for ablations)."""
    # random.Random seeds strings through SHA-512, so this is stable across processes
    # (unlike hash(), which is salted per process).
    return random.Random(f"{seed}:{name}").random()


def score_blocks(
    model: nn.Module,
    block_modules: Mapping[str, nn.Module],
    method: str,
    batches: Iterable[tuple[Tensor, Tensor]] | None = None,
    probe_samples: int = 5000,
    bins: int = 10,
    seed: int = 0,
    progress: ProgressFn | None = None,
    pooled: Mapping[str, Tensor] | None = None,
    labels: Tensor | None = None,
) -> dict[str, float]:
    """Score every block with the registered ``method``.

    Activations are collected (one probe pass for all blocks, see
    :func:`~m2mdc.scoring.activations.collect_pooled`) only when the method needs them.

    Args:
        model: the network containing the blocks.
        block_modules: block name -> block module, in forward order.
        method: a name in :data:`BLOCK_SCORERS` (unknown names raise M2MError).
        batches: probe ``(inputs, labels)`` batches; required by activation-based methods.
        probe_samples: maximum probe samples.
        bins: quantile bins for MI.
        seed: seed for stochastic methods.
        progress: optional ``progress(done, total)`` callback for the probe pass.
        pooled, labels: activations already collected for ``block_modules`` (name -> ``[N, C]``)
            and their labels; the probe pass is then skipped (e.g. the score stage collects
            the blocks and the stage outputs in one pass).

    Returns:
        block name -> score, in ``block_modules`` order.
    """
    scorer = BLOCK_SCORERS.get(method)
    if not scorer.needs_activations:
        pooled, labels = {}, None
    elif pooled is None or labels is None:
        if batches is None:
            raise ValueError(f"score method '{method}' needs probe batches")
        pooled, labels = collect_pooled(model, block_modules, batches, probe_samples, progress)
    return {
        name: scorer(block, pooled.get(name), labels, bins=bins, seed=seed, name=name)
        for name, block in block_modules.items()
    }


def rank(scores: Mapping[str, float]) -> dict[str, int]:
    """Ranks 1..n by descending score (rank 1 = most informative); ties broken by name, NaN
    scores ranked last, so the ranking is deterministic."""

    def key(item: tuple[str, float]) -> tuple[bool, float, str]:
        name, s = item
        nan = math.isnan(s)
        return (nan, 0.0 if nan else -s, name)

    return {name: i for i, (name, _) in enumerate(sorted(scores.items(), key=key), start=1)}
