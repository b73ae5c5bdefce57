"""Plane / mid channel selectors and round_keep."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from m2mdc.errors import M2MError
from m2mdc.scoring.channels import (
    CHANNEL_SELECTORS,
    channel_scores,
    round_keep,
    select_channels,
)
from m2mdc.scoring.mi import binned_mi


def _pair(cin: int, cout: int, k: int = 3, seed: int = 0) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, bias=False), nn.BatchNorm2d(cout)


def _probe(n: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ch0 encodes bit A, ch1 an exact copy of ch0, ch2 encodes bit B (noisier), ch3 noise;
    the label is 2A + B."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 2, (n,), generator=g)
    b = torch.randint(0, 2, (n,), generator=g)
    ch0 = a + 0.1 * torch.randn(n, generator=g)
    flip = torch.rand(n, generator=g) < 0.1  # B is only 90% readable from ch2
    ch2 = torch.where(flip, 1 - b, b) + 0.1 * torch.randn(n, generator=g)
    z = torch.stack([ch0, ch0.clone(), ch2, torch.randn(n, generator=g)], dim=1)
    return z.float(), 2 * a + b


@pytest.mark.parametrize("name", ["bn_gamma", "l1", "bn_l1", "random", "cmi"])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_selectors_return_k_sorted_distinct_indices(name: str, k: int) -> None:
    producers = [_pair(3, 4), _pair(2, 4, k=1, seed=1)]
    pooled, labels = _probe(300)
    keep = select_channels(name, producers, k, pooled=pooled, labels=labels, seed=5)
    assert len(keep) == k and keep == sorted(set(keep))
    assert all(0 <= i < 4 for i in keep)


def test_bn_gamma_keeps_largest_mean_abs_gamma() -> None:
    p1, p2 = _pair(3, 6), _pair(3, 6, seed=1)
    p1[1].weight.data = torch.tensor([0.1, -5.0, 0.2, 0.3, 3.0, 0.0])
    p2[1].weight.data = torch.tensor([0.1, 1.0, 0.2, 4.0, -3.0, 0.0])
    # means of |gamma|: [.1, 3, .2, 2.15, 3, 0] -> top-3 = {1, 4, 3}
    assert select_channels("bn_gamma", [p1, p2], 3) == [1, 3, 4]
    assert not CHANNEL_SELECTORS.get("bn_gamma").needs_activations


def test_l1_is_fan_in_normalised_and_bn_l1_averages_unit_max_signals() -> None:
    conv3, bn3 = _pair(2, 3, k=3)
    conv1, bn1 = _pair(2, 3, k=1)
    conv3.weight.data = torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1).expand(3, 2, 3, 3) * 1
    conv1.weight.data = -torch.tensor([3.0, 2.0, 1.0]).reshape(3, 1, 1, 1).expand(3, 2, 1, 1) * 1
    l1 = channel_scores("l1", [(conv3, bn3), (conv1, bn1)])
    torch.testing.assert_close(l1, torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))
    bn3.weight.data = torch.tensor([1.0, 2.0, 4.0])
    bn1.weight.data = torch.tensor([1.0, 2.0, 4.0])
    conv1.weight.data.zero_()  # l1 = [0.5, 1, 1.5] -> unit max [1/3, 2/3, 1]
    got = channel_scores("bn_l1", [(conv3, bn3), (conv1, bn1)])
    want = (torch.tensor([0.25, 0.5, 1.0]) + torch.tensor([1 / 3, 2 / 3, 1.0])) / 2
    torch.testing.assert_close(got, want.double())


def test_random_is_deterministic_per_seed() -> None:
    producers = [_pair(2, 64)]
    a = select_channels("random", producers, 20, seed=7)
    assert a == select_channels("random", producers, 20, seed=7)
    assert a != select_channels("random", producers, 20, seed=8)


def test_cmi_picks_informative_then_complementary_not_duplicate() -> None:
    pooled, labels = _probe()
    producers = [_pair(2, 4)]
    mi = binned_mi(pooled, labels)
    # plain MI ranking would keep the duplicate pair {0, 1}
    assert set(torch.topk(mi, 2).indices.tolist()) == {0, 1}
    keep = select_channels("cmi", producers, 2, pooled=pooled, labels=labels)
    assert keep in ([0, 2], [1, 2])
    assert select_channels("cmi", producers, 1, pooled=pooled, labels=labels) in ([0], [1])
    assert CHANNEL_SELECTORS.get("cmi").needs_activations


def test_cmi_requires_activations() -> None:
    with pytest.raises(ValueError, match="pooled activations"):
        select_channels("cmi", [_pair(2, 4)], 2)


def test_select_channels_validates_inputs() -> None:
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        select_channels("l1", [_pair(2, 4)], 5)
    with pytest.raises(ValueError, match="disagree"):
        select_channels("l1", [_pair(2, 4), _pair(2, 5)], 2)
    with pytest.raises(M2MError, match=r"slice\.selector"):
        select_channels("magic", [_pair(2, 4)], 2)


def test_cmi_scales_to_512_channels() -> None:
    # a smoke check of the vectorised path at full width (timing is left to scripts/bench.py)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (1000,), generator=g)
    z = torch.randn(10, 8, generator=g)[y] @ torch.randn(8, 512, generator=g)
    z = z + torch.randn(1000, 512, generator=g)
    keep = select_channels("cmi", [_pair(1, 512, k=1)], 64, pooled=z, labels=y)
    assert len(keep) == 64


@pytest.mark.parametrize(
    ("c", "fraction", "round_to", "want"),
    [
        (64, 0.5, 8, 32),
        (64, 0.5, 1, 32),
        (100, 0.3, 8, 32),  # 30 -> nearest multiple of 8
        (10, 0.25, 1, 3),  # 2.5 rounds half up
        (4, 0.1, 8, 4),  # at least one group, at most c
        (64, 0.01, 8, 8),
        (60, 1.0, 8, 60),
        (3, 0.1, 1, 1),
    ],
)
def test_round_keep(c: int, fraction: float, round_to: int, want: int) -> None:
    assert round_keep(c, fraction, round_to) == want


@settings(max_examples=200, deadline=None)
@given(c=st.integers(1, 2048), fraction=st.floats(0.001, 1.0), round_to=st.integers(1, 64))
def test_round_keep_properties(c: int, fraction: float, round_to: int) -> None:
    k = round_keep(c, fraction, round_to)
    assert min(round_to, c) <= k <= c
    assert k % round_to == 0 or k == c
    assert abs(k - fraction * c) <= round_to / 2 + 1e-6 or k in (c, round_to)


def test_round_keep_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError):
        round_keep(10, 0.0, 1)
    with pytest.raises(ValueError):
        round_keep(10, 1.5, 1)
