"""The one bisection every ratio/fraction search uses (m2mdc.bisection)."""

from __future__ import annotations

import pytest

from m2mdc.bisection import Trial, bisect, within


def test_increasing_function_stops_at_the_first_value_within_the_tolerance():
    # 100 x, target 30 within 5% (28.5..31.5): 50 high, 25 low, 37.5 high, 31.25 inside
    best, trials = bisect(lambda x: 100 * x, 30, 0.0, 1.0, tolerance=0.05, steps=10)
    assert trials == [Trial(0.5, 50.0), Trial(0.25, 25.0), Trial(0.375, 37.5), Trial(0.3125, 31.25)]
    assert best == Trial(0.3125, 31.25) and within(best.value, 30, 0.05)


def test_decreasing_function_moves_the_other_way():
    # 100 (1 - x), target 70: 50 is low, so the ratio must shrink; 75 high, 62.5 low, 68.75 in
    best, trials = bisect(
        lambda x: 100 * (1 - x), 70, 0.0, 1.0, tolerance=0.05, steps=10, increasing=False
    )
    assert [t.x for t in trials] == [0.5, 0.25, 0.375, 0.3125]
    assert best == Trial(0.3125, 68.75)


def test_unreachable_target_ends_at_the_bracket_edge_after_the_steps():
    best, trials = bisect(lambda x: 100 * x, 200, 0.0, 1.0, tolerance=0.02, steps=5)
    assert [t.x for t in trials] == [0.5, 0.75, 0.875, 0.9375, 0.96875]
    assert best == Trial(0.96875, 96.875) and not within(best.value, 200, 0.02)


def test_a_noisy_value_shrinks_the_bracket_but_never_reopens_it():
    # the first value reads low (10 instead of 50): the bracket becomes [0.5, 1] and every
    # later trial stays inside it, approaching its lower edge, however far the target is
    values = {0.5: 10.0}
    best, trials = bisect(
        lambda x: values.get(x, 100 * x), 30, 0.0, 1.0, tolerance=0.02, steps=5
    )  # fmt: skip
    assert [t.x for t in trials] == [0.5, 0.75, 0.625, 0.5625, 0.53125]
    # the best is by measured value: the noisy 10 (20 away) beats 53.125 (23.1 away)
    assert best == Trial(0.5, 10.0)


def test_ties_keep_the_earliest_trial_and_steps_must_be_positive():
    values = {0.5: 40.0, 0.75: 60.0}  # both 10 from the target, outside 10%
    best, trials = bisect(values.__getitem__, 50, 0.0, 1.0, tolerance=0.1, steps=2)
    assert [t.x for t in trials] == [0.5, 0.75] and best == Trial(0.5, 40.0)
    with pytest.raises(ValueError, match="steps >= 1"):
        bisect(lambda x: x, 1, 0.0, 1.0, tolerance=0.1, steps=0)
