"""Constrained block selection (section 3.1): never a protected block, never an empty stage."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from m2mdc.arch.base import BlockRef
from m2mdc.pruning import keep_cfg_from_removals, num_to_remove, select_removals


def resnet18_blocks() -> list[BlockRef]:
    return [
        BlockRef(f"layer{s}.{i}", f"layer{s}", i, i, s > 1 and i == 0)
        for s in range(1, 5)
        for i in range(2)
    ]


def mobilenet_blocks() -> list[BlockRef]:
    groups = {"c16": 1, "c24": 2, "c32": 3, "c64": 4, "c96": 3, "c160": 3, "c320": 1}
    out, k = [], 1
    for g, n in groups.items():
        for i in range(n):
            out.append(BlockRef(f"features.{k}", g, i, i, i == 0))
            k += 1
    return out


def test_k_is_floor_of_ratio_times_free_blocks():
    blocks = resnet18_blocks()  # 5 free blocks
    assert [num_to_remove(blocks, r) for r in (0.0, 0.1, 0.25, 0.4, 0.5, 0.99)] == [
        0,
        0,
        1,
        2,
        2,
        4,
    ]
    mb = mobilenet_blocks()  # 10 free blocks
    assert num_to_remove(mb, 0.3) == 3


def test_lowest_scores_go_first_and_protected_are_skipped():
    blocks = resnet18_blocks()
    scores = {b.name: float(i) for i, b in enumerate(blocks)}
    scores["layer2.0"] = -10.0  # protected: never removed even though lowest
    removed = select_removals(blocks, scores, 0.4)
    # layer1.1 (score 1) is skipped: removing it too would empty layer1
    assert [b.name for b in removed] == ["layer1.0", "layer2.1"]
    keep = keep_cfg_from_removals(blocks, removed)
    assert keep == {"layer1": [1], "layer2": [0], "layer3": [0, 1], "layer4": [0, 1]}


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.floats(-5, 5, allow_nan=False), min_size=17, max_size=17),
    ratio=st.floats(0, 0.999),
    family=st.sampled_from(["resnet18", "mobilenet_v2"]),
)
def test_pruning_respects_the_constraints(scores, ratio, family):
    blocks = resnet18_blocks() if family == "resnet18" else mobilenet_blocks()
    s = {b.name: scores[i] for i, b in enumerate(blocks)}
    removed = select_removals(blocks, s, ratio)
    free = [b for b in blocks if not b.protected]
    assert len(removed) <= math.floor(ratio * len(free) + 1e-9)
    assert not any(b.protected for b in removed)
    keep = keep_cfg_from_removals(blocks, removed)
    assert all(len(v) >= 1 for v in keep.values())
    # greedy by ascending score: a free block that survives although it scores below a
    # removed one was skipped to keep its stage alive, so it is its stage's only survivor
    if removed:
        top_removed = max(s[b.name] for b in removed)
        for b in free:
            if b not in removed and s[b.name] < top_removed:
                assert keep[b.stage] == [b.orig_index]
    # and as many blocks as asked are removed whenever the constraints allow it
    removable = sum(
        sum(not b.protected for b in blocks if b.stage == g)
        - (all(not b.protected for b in blocks if b.stage == g))
        for g in keep
    )
    assert len(removed) == min(num_to_remove(blocks, ratio), removable)
