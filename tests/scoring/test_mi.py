"""Vectorised MI against scikit-learn, quantile binning, conditional MI and lazy CMIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import mutual_info_score

from m2mdc.scoring.mi import (
    binned_mi,
    cmim_select,
    conditional_mi,
    encode_labels,
    mutual_information,
    quantile_bin,
)


def _sk_mi(labels: torch.Tensor, codes: torch.Tensor) -> list[float]:
    return [mutual_info_score(labels.numpy(), codes[:, c].numpy()) for c in range(codes.shape[1])]


def _np_cmi(x: np.ndarray, y: np.ndarray, s: np.ndarray) -> float:
    """I(X; Y | S) = sum_s p(s) I(X; Y | S=s), straight from the definition."""
    return sum((s == v).mean() * mutual_info_score(y[s == v], x[s == v]) for v in np.unique(s))


@pytest.mark.parametrize(
    ("n", "c", "codes", "classes"), [(200, 7, 10, 10), (50, 3, 2, 5), (1000, 16, 16, 3)]
)
def test_mi_matches_sklearn(n: int, c: int, codes: int, classes: int) -> None:
    g = torch.Generator().manual_seed(n + c)
    x = torch.randint(0, codes, (n, c), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x[:, 0] = 3 % codes  # constant channel: MI 0
    x[:, 1] = y % codes  # label-determined channel
    got = mutual_information(x, y, codes, classes)
    assert got.dtype == torch.float64 and got.shape == (c,)
    np.testing.assert_allclose(got.numpy(), _sk_mi(y, x), atol=1e-9, rtol=0)
    assert got[0] == 0


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 120),
    c=st.integers(1, 6),
    bins=st.integers(1, 12),
    classes=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_binned_mi_matches_sklearn_property(
    n: int, c: int, bins: int, classes: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    # few distinct values -> heavy ties; one constant channel
    z = torch.randint(0, 4, (n, c), generator=g).float() * torch.rand(c, generator=g)
    z[:, 0] = 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    codes = quantile_bin(z, bins)
    assert int(codes.min()) >= 0 and int(codes.max()) < bins
    assert (codes[:, 0] == 0).all()  # constant channel -> a single bin
    got = binned_mi(z, y, bins=bins)
    np.testing.assert_allclose(got.numpy(), _sk_mi(y, codes), atol=1e-9, rtol=0)


def test_quantile_bins_equal_population_on_continuous_data() -> None:
    z = torch.randn(5000, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor(
        [1.0, 10.0, 0.01, 3.0]
    )
    codes = quantile_bin(z, 10)
    for c in range(4):
        counts = torch.bincount(codes[:, c], minlength=10)
        assert counts.min() >= 495 and counts.max() <= 505, counts


def test_quantile_bin_ties_share_a_bin_and_match_qcut_convention() -> None:
    # 60% zeros (a ReLU channel): all zeros in bin 0; values are binned by edges strictly below
    z = torch.cat([torch.zeros(60), torch.arange(1, 41).float()]).unsqueeze(1)
    codes = quantile_bin(z, 10)[:, 0]
    assert (codes[:60] == 0).all()
    assert (codes[60:] > 0).all()
    assert codes[60:].diff().ge(0).all()  # monotone in the value
    # value equal to an edge goes to the lower bin (right-closed intervals)
    v = torch.arange(10.0).unsqueeze(1)  # quantile edges at 0.9, 1.8, ... not hitting values
    w = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0]).unsqueeze(1)  # edge at 1.0 (q=0.5, bins=2)
    assert quantile_bin(w, 2)[:, 0].tolist() == [0, 0, 0, 0, 1]
    assert quantile_bin(v, 10)[:, 0].tolist() == list(range(10))


def test_quantile_bin_rejects_non_finite() -> None:
    with pytest.raises(ValueError, match="NaN"):
        quantile_bin(torch.tensor([[0.0], [float("nan")]]), 2)


def test_binned_mi_perfect_predictor_equals_label_entropy() -> None:
    y = torch.arange(1000) % 4
    z = torch.stack([y.float() + 0.1 * torch.rand(1000), torch.rand(1000)], dim=1)
    mi = binned_mi(z, y, bins=4)
    assert mi[0] == pytest.approx(math.log(4), abs=1e-12)
    assert mi[1] < 0.05


def test_encode_labels_renumbers_sparse_ids() -> None:
    y, k = encode_labels(torch.tensor([7, 3, 7, 100]))
    assert k == 3 and y.tolist() == [1, 0, 1, 2]
    with pytest.raises(ValueError):
        encode_labels(torch.tensor([0, 5]), num_classes=5)


@pytest.mark.parametrize(("codes", "classes"), [(4, 3), (10, 10)])
def test_conditional_mi_matches_definition(codes: int, classes: int) -> None:
    g = torch.Generator().manual_seed(codes)
    n = 400
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randint(0, codes, (n, 5), generator=g)
    x[:, 1] = (y + x[:, 0]) % codes  # informative only jointly with channel 0
    x[:, 2] = x[:, 0]  # copy of the conditioning channel: I(X;Y|X) = 0
    got = conditional_mi(x, y, x[:, 0], codes, classes)
    want = [_np_cmi(x[:, c].numpy(), y.numpy(), x[:, 0].numpy()) for c in range(5)]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9, rtol=0)
    assert got[2] == pytest.approx(0.0, abs=1e-12)


def _eager_cmim(codes: torch.Tensor, y: torch.Tensor, k: int, nc: int, ny: int) -> list[int]:
    """Reference CMIM without lazy evaluation."""
    score = mutual_information(codes, y, nc, ny).clone()
    picked: list[int] = []
    while True:
        best = int(torch.argmax(score))
        picked.append(best)
        if len(picked) == k:
            return picked
        score = torch.minimum(score, conditional_mi(codes, y, codes[:, best], nc, ny))
        score[picked] = float("-inf")


@pytest.mark.parametrize("seed", [0, 1])
def test_lazy_cmim_equals_eager_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, c, classes = 600, 40, 5
    y = torch.randint(0, classes, (n,), generator=g)
    lat = torch.randn(classes, 6, generator=g)[y] + 0.7 * torch.randn(n, 6, generator=g)
    z = torch.relu(lat @ torch.randn(6, c, generator=g) + torch.randn(n, c, generator=g))
    z[:, 5] = z[:, 3]  # duplicates and a constant produce exact ties
    z[:, 7] = 0.0
    codes = quantile_bin(z, 8)
    assert cmim_select(codes, y, c, 8, classes, batch=4, chunk=3) == _eager_cmim(
        codes, y, c, 8, classes
    )
    assert cmim_select(codes, y, 12, 8, classes) == _eager_cmim(codes, y, 12, 8, classes)
