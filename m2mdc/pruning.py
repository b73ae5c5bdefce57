"""Constrained block selection (paper section 3.1).

Given block scores and a ratio ``r``, remove ``k = floor(r * |free blocks|)`` blocks by
ascending score, skipping protected (transition) blocks and any removal that would leave a
stage empty. Works on :class:`~m2mdc.arch.base.BlockRef` only, so it is family-agnostic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from m2mdc.arch.base import BlockRef
from m2mdc.errors import M2MError


def num_to_remove(blocks: Sequence[BlockRef], ratio: float) -> int:
    """``floor(ratio * |free blocks|)``; the tiny epsilon keeps 0.3 * 10 from flooring to 2."""
    free = sum(not b.protected for b in blocks)
    return math.floor(ratio * free + 1e-9)


def select_removals(
    blocks: Sequence[BlockRef], scores: Mapping[str, float], ratio: float
) -> list[BlockRef]:
    """The blocks to remove, lowest score first (ties broken by forward order).

    Protected blocks are never chosen and no stage loses its last block, so fewer than ``k``
    blocks are removed when the constraints leave too few candidates.
    """
    k = num_to_remove(blocks, ratio)
    remaining = {b.stage: 0 for b in blocks}
    for b in blocks:
        remaining[b.stage] += 1
    order = sorted(range(len(blocks)), key=lambda i: (scores[blocks[i].name], i))
    removed: list[BlockRef] = []
    for i in order:
        if len(removed) >= k:
            break
        b = blocks[i]
        if b.protected or remaining[b.stage] <= 1:
            continue
        removed.append(b)
        remaining[b.stage] -= 1
    return removed


def keep_cfg_from_removals(
    blocks: Sequence[BlockRef], removed: Sequence[BlockRef]
) -> dict[str, list[int]]:
    """The keep configuration (teacher numbering) that leaves out ``removed``."""
    gone = {b.name for b in removed}
    keep: dict[str, list[int]] = {}
    for b in blocks:
        keep.setdefault(b.stage, [])
        if b.name not in gone:
            keep[b.stage].append(b.orig_index)
    return keep


def parse_keep_cfg(raw: Any) -> dict[str, list[int]]:
    """Normalise a user ``prune.keep_cfg`` (mapping stage -> list of ints) or fail clearly."""
    if not isinstance(raw, Mapping):
        raise M2MError(
            f"prune.keep_cfg must map stage names to index lists, e.g. "
            f"{{layer1:[0],layer2:[0,1]}}; got {raw!r}"
        )
    out: dict[str, list[int]] = {}
    for stage, idx in raw.items():
        values = [idx] if isinstance(idx, int) else idx
        try:
            out[str(stage)] = sorted({int(i) for i in values})
        except (TypeError, ValueError):
            raise M2MError(
                f"prune.keep_cfg.{stage} must be a list of block indices; got {idx!r}"
            ) from None
    return out
