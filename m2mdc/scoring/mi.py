"""Vectorised discrete mutual information between binned channels and labels (paper §3.1).

The block score of the paper is the mean per-channel MI of quantile-binned pooled activations,

    s_b = 1/C_b * sum_c I(bin(Z_bc); Y),

and the CMI channel selector needs I(X_c; Y | X_s) for every candidate c at once. Everything here
works on all channels in one shot: one ``searchsorted`` bins every channel, one ``bincount`` over
flattened (channel, code, label[, conditioning code]) indices builds every joint histogram, so
there is no Python loop over channels. All MI values are float64 and in nats.

:func:`binned_mi` (the block score) skips the per-sample codes altogether: with the samples
grouped by label and sorted within each label, the number of samples of label y in the first
b bins of channel c is one binary search of the bin's upper edge, so every joint histogram
comes from ``C x classes x (bins - 1)`` searches instead of ``C x N`` codes (the loop is over
classes, never channels). The sorts use NumPy's vectorised sort (several times faster than
``torch.sort`` on a CPU), on float32 rows with the float64 edges rounded down to float32,
which decides every ``edge < value`` exactly as in float64.

Example:
    >>> z = torch.randn(1000, 64)
    >>> y = torch.randint(0, 10, (1000,))
    >>> binned_mi(z, y, bins=10).shape
    torch.Size([64])
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _channel_rows(z: Tensor, order: np.ndarray | None = None) -> np.ndarray:
    """``[N, C]`` -> a contiguous ``[C, N]`` NumPy array (float64 stays float64, every other
    dtype becomes float32, exactly), with the samples in ``order`` when given."""
    zc = z.detach().cpu()
    a = (zc if zc.dtype == torch.float64 else zc.float()).numpy()
    if order is not None:
        a = a[order]  # rows are contiguous: a gather of whole rows
    # NumPy, single-threaded: these memory-bound copies gain nothing from torch's thread pool
    # and suffer from its barriers when another process holds a core
    return np.ascontiguousarray(a.T)


def _quantile_edges(rows: np.ndarray, bins: int) -> np.ndarray:
    """``[C, bins-1]`` quantile edges of every row (see :func:`quantile_bin`), in ``rows``'s
    dtype; float32 edges are the float64 edges rounded *down*, so for any float32 value v,
    ``edge32 < v`` exactly when ``edge64 < v``.

    Raises:
        ValueError: a row holds NaN or inf.
    """
    n = rows.shape[1]
    srt = np.sort(rows, axis=1)  # NaN sorts last, -inf first: the extremes tell finiteness
    if not (np.isfinite(srt[:, 0]).all() and np.isfinite(srt[:, -1]).all()):
        raise ValueError("quantile_bin: activations contain NaN or inf")
    pos = np.arange(1, bins, dtype=np.float64) / bins * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.ceil(pos).astype(np.int64)
    frac = pos - lo
    # float64: an edge interpolated between two equal order statistics equals them exactly, so
    # tied values never straddle an edge.
    lo_v, hi_v = srt[:, lo].astype(np.float64), srt[:, hi].astype(np.float64)
    edges = lo_v + frac * (hi_v - lo_v)  # [C, bins-1], non-decreasing
    if rows.dtype == np.float64:
        return np.ascontiguousarray(edges)
    e32 = edges.astype(np.float32)
    up = e32.astype(np.float64) > edges
    e32[up] = np.nextafter(e32[up], np.float32(-np.inf))
    return np.ascontiguousarray(e32)


def quantile_bin(z: Tensor, bins: int) -> Tensor:
    """Per-channel quantile binning.

    Edges ``e_1 <= ... <= e_{bins-1}`` of channel c are its empirical quantiles at ``j / bins``
    (linear interpolation between order statistics, as ``numpy.quantile``/``torch.quantile``).
    A value's bin is the number of edges *strictly below* it, so bins are right-closed intervals
    ``(e_j, e_{j+1}]`` (the ``pandas.qcut`` convention). Consequences that matter for ReLU
    activations and other tied data: all copies of a value land in the same bin, edges equal to
    each other collapse (a channel with few distinct values uses fewer bins), and a constant
    channel goes entirely to bin 0.

    Args:
        z: ``[N, C]`` real values; must be finite.
        bins: number of quantile bins (>= 1).

    Returns:
        ``[N, C]`` int64 codes in ``[0, bins)``, on the CPU.

    Raises:
        ValueError: on a bad shape, ``bins < 1``, no rows, or a non-finite value.
    """
    if z.dim() != 2:
        raise ValueError(f"quantile_bin expects [N, C], got shape {tuple(z.shape)}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    n, c = z.shape
    if n == 0:
        raise ValueError("quantile_bin needs at least one sample")
    rows = _channel_rows(z)  # [C, N]: searchsorted wants rows
    if bins == 1:
        if not np.isfinite(rows).all():
            raise ValueError("quantile_bin: activations contain NaN or inf")
        return torch.zeros(n, c, dtype=torch.long)
    edges = torch.from_numpy(_quantile_edges(rows, bins))
    codes = torch.searchsorted(edges, torch.from_numpy(rows), right=False)  # edges < value
    return codes.t().contiguous()


def _check_codes(codes: Tensor, labels: Tensor, num_codes: int, num_classes: int) -> None:
    """Shapes and ranges; the histogram functions work on CPU tensors (the probe is small)."""
    if codes.device.type != "cpu" or labels.device.type != "cpu":
        raise ValueError("codes and labels must be CPU tensors")
    if codes.dim() != 2 or labels.dim() != 1 or codes.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected codes [N, C] and labels [N], got {tuple(codes.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if codes.shape[0] == 0:
        raise ValueError("mutual information needs at least one sample")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
        raise ValueError(f"codes must lie in [0, {num_codes})")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")


def _sum_xlogx(counts: Tensor, dims: tuple[int, ...]) -> Tensor:
    """sum n*log(n) over ``dims`` (0*log 0 = 0), float64."""
    n = counts.to(torch.float64)
    return torch.special.xlogy(n, n).sum(dim=dims)


def mutual_information(codes: Tensor, labels: Tensor, num_codes: int, num_classes: int) -> Tensor:
    """I(X_c; Y) in nats for every column c of ``codes``, from one joint histogram.

    With counts n_c(x, y) over N samples (one ``bincount`` over the flattened index
    ``(c * num_codes + x) * num_classes + y``),

        I(X_c; Y) = sum_{x,y} p(x,y) log(p(x,y) / (p(x) p(y))),   p = n / N,

    evaluated as ``(1/N) [sum n log n - sum_x n(x) log n(x) - sum_y n(y) log n(y)] + log N``.
    Equals ``sklearn.metrics.mutual_info_score(labels, codes[:, c])`` (also clipped at 0).

    Args:
        codes: ``[N, C]`` int codes in ``[0, num_codes)``.
        labels: ``[N]`` int labels in ``[0, num_classes)``.
        num_codes: number of possible codes per channel.
        num_classes: number of possible labels.

    Returns:
        ``[C]`` float64 MI values.
    """
    _check_codes(codes, labels, num_codes, num_classes)
    n, c = codes.shape
    ch = torch.arange(c, dtype=torch.long).unsqueeze(0) * num_codes  # [1, C]
    idx = ((codes.long() + ch) * num_classes + labels.long().unsqueeze(1)).reshape(-1)
    joint = torch.bincount(idx, minlength=c * num_codes * num_classes)
    joint = joint.view(c, num_codes, num_classes)
    return _mi_from_joint(joint, torch.bincount(labels.long(), minlength=num_classes), n)


def _mi_from_joint(joint: Tensor, label_counts: Tensor, n: int) -> Tensor:
    """I(X_c; Y) in nats from the joint counts ``[C, codes, classes]`` (see
    :func:`mutual_information`), clipped at 0."""
    h_xy = _sum_xlogx(joint, (1, 2))
    h_x = _sum_xlogx(joint.sum(dim=2), (1,))
    h_y = _sum_xlogx(label_counts, (0,))
    mi = (h_xy - h_x - h_y) / n + torch.log(torch.tensor(float(n), dtype=torch.float64))
    return mi.clamp_min(0.0)


def _count_at_most(block: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``out[r, j]`` = how many entries of the sorted row ``block[r]`` are ``<= values[r, j]``
    (a row-wise ``searchsorted(side="right")``): a vectorised binary search, ``log2(n)`` steps
    over the small ``[rows, j]`` array."""
    n = block.shape[1]
    lo = np.zeros(values.shape, dtype=np.int64)
    hi = np.full(values.shape, n, dtype=np.int64)
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) >> 1
        right = active & (np.take_along_axis(block, np.minimum(mid, n - 1), axis=1) <= values)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)


def binned_joint(z: Tensor, labels: Tensor, bins: int, num_classes: int) -> np.ndarray:
    """Joint counts ``[C, bins, num_classes]`` (int64 NumPy) of (quantile bin of channel c,
    label), equal to the histogram of ``(quantile_bin(z, bins), labels)`` without
    materialising the codes.

    The samples are grouped by label (one gather) and each label's block of every row is
    sorted; since a value's bin is the number of edges strictly below it, the samples of label
    y in bins ``0..b`` of channel c are those ``<= edge_b``: one binary search per
    (channel, label, edge). The loop runs over the labels, never the channels. All of it is
    NumPy: memory-bound work that torch's thread pool does not speed up, and whose barriers
    stall when another process holds a core.

    Args:
        z: ``[N, C]`` finite values.
        labels: ``[N]`` int64 labels in ``[0, num_classes)`` (see :func:`encode_labels`).
        bins: quantile bins (>= 2).
        num_classes: label range.
    """
    c = z.shape[1]
    y = labels.numpy()
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y, minlength=num_classes)
    rows = _channel_rows(z, order)  # [C, N], samples grouped by label
    edges = _quantile_edges(rows, bins)  # [C, bins-1]
    below = np.empty((c, bins, num_classes), dtype=np.int64)  # samples in bins 0..b
    below[:, bins - 1, :] = counts
    start = 0
    for k, n_k in enumerate(counts.tolist()):
        block = np.sort(rows[:, start : start + n_k], axis=1)
        below[:, : bins - 1, k] = _count_at_most(block, edges) if n_k else 0
        start += n_k
    return np.diff(below, axis=1, prepend=0)


def _mi_from_joint_np(joint: np.ndarray, label_counts: np.ndarray, n: int) -> np.ndarray:
    """:func:`_mi_from_joint` in NumPy (float64 nats, clipped at 0)."""

    def sum_xlogx(a: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
        f = a.astype(np.float64)
        return (f * np.log(np.where(f > 0, f, 1.0))).sum(axis=axis)

    h_xy = sum_xlogx(joint, (1, 2))
    h_x = sum_xlogx(joint.sum(axis=2), (1,))
    h_y = sum_xlogx(label_counts, (0,))
    return np.maximum((h_xy - h_x - h_y) / n + np.log(float(n)), 0.0)


def encode_labels(labels: Tensor, num_classes: int | None = None) -> tuple[Tensor, int]:
    """Labels as int64 in ``[0, num_classes)``.

    With ``num_classes=None`` the distinct label values are renumbered densely (so sparse or
    offset label ids cost no histogram space); otherwise labels are checked against the range.
    """
    labels = labels.detach().long().reshape(-1).cpu()
    if num_classes is None:
        uniq, inv = torch.unique(labels, return_inverse=True)
        return inv, int(uniq.numel())
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return labels, num_classes


def binned_mi(z: Tensor, labels: Tensor, bins: int = 10, num_classes: int | None = None) -> Tensor:
    """I(bin(Z_c); Y) per channel: :func:`quantile_bin` then :func:`mutual_information`.

    The paper's block score is ``binned_mi(Z_b, Y).mean()``.

    Args:
        z: ``[N, C]`` pooled activations.
        labels: ``[N]`` labels.
        bins: quantile bins per channel.
        num_classes: label range; None renumbers the distinct labels (see :func:`encode_labels`).

    Returns:
        ``[C]`` float64 MI in nats.
    """
    y, k = encode_labels(labels, num_classes)
    if z.dim() != 2 or z.shape[0] != y.numel() or z.shape[0] == 0 or bins < 2:
        # shape errors and the trivial one-bin case: the plain path raises / answers
        return mutual_information(quantile_bin(z, bins), y, bins, k)
    joint = binned_joint(z, y, bins, k)
    counts = np.bincount(y.numpy(), minlength=k)
    return torch.from_numpy(_mi_from_joint_np(joint, counts, len(y)))


def conditional_mi(
    codes: Tensor, labels: Tensor, cond: Tensor, num_codes: int, num_classes: int
) -> Tensor:
    """I(X_c; Y | S) in nats for every column c of ``codes`` and one conditioning code vector S.

    One ``bincount`` over ``((c * num_codes + x) * num_classes + y) * num_codes + s`` gives
    n_c(x, y, s); in terms of counts,

        I(X; Y | S) = H(X,S) + H(Y,S) - H(X,Y,S) - H(S)
                    = (1/N) [sum n(x,y,s) log n(x,y,s) + sum n(s) log n(s)
                             - sum n(x,s) log n(x,s) - sum n(y,s) log n(y,s)],

    i.e. ``sum p(x,y,s) log(p(x,y,s) p(s) / (p(x,s) p(y,s)))``. Clipped at 0.

    Args:
        codes: ``[N, C]`` codes in ``[0, num_codes)``.
        labels: ``[N]`` labels in ``[0, num_classes)``.
        cond: ``[N]`` conditioning codes in ``[0, num_codes)`` (e.g. ``codes[:, s]``).
        num_codes: code range of both ``codes`` and ``cond``.
        num_classes: label range.

    Returns:
        ``[C]`` float64 conditional MI.
    """
    _check_codes(codes, labels, num_codes, num_classes)
    n, c = codes.shape
    if cond.shape != (n,) or int(cond.min()) < 0 or int(cond.max()) >= num_codes:
        raise ValueError(f"cond must be [N] codes in [0, {num_codes})")
    labels, cond = labels.long(), cond.long()
    tab = _xlogx_table(n)
    xyk = ((codes.long().t() * num_classes + labels) * num_codes).contiguous()
    const = _cond_constant(labels, cond, num_codes, num_classes, tab)
    return _cmi_rows(xyk, cond.expand(c, n), const.expand(c), num_codes, num_classes, tab)


def _xlogx_table(n: int) -> Tensor:
    """``t[m] = m log m`` for counts m in ``[0, n]`` (a gather is cheaper than a log per cell)."""
    m = torch.arange(n + 1, dtype=torch.float64)
    return torch.special.xlogy(m, m)


def _cond_constant(
    labels: Tensor, cond: Tensor, num_codes: int, num_classes: int, tab: Tensor
) -> Tensor:
    """Candidate-independent part of N * I(X; Y | S): sum n(s) log n(s) - sum n(y,s) log n(y,s)."""
    ys = torch.bincount(labels * num_codes + cond, minlength=num_classes * num_codes)
    return tab[torch.bincount(cond, minlength=num_codes)].sum() - tab[ys].sum()


def _cmi_rows(
    xyk: Tensor, cond: Tensor, const: Tensor, num_codes: int, num_classes: int, tab: Tensor
) -> Tensor:
    """Row-wise I(X_r; Y | S_r) in nats, one bincount for all rows.

    Args:
        xyk: ``[R, N]`` int ``(x * num_classes + y) * num_codes`` per sample (the candidate's
            code/label cell, pre-scaled so adding the conditioning code finishes the index).
        cond: ``[R, N]`` conditioning codes.
        const: ``[R]`` float64 :func:`_cond_constant` of each row's conditioning channel.
    """
    rows, n = xyk.shape
    size = num_codes * num_classes * num_codes
    idx = xyk + cond  # fresh tensor: in-place adds below are safe
    idx += torch.arange(0, rows * size, size, dtype=idx.dtype).unsqueeze(1)
    joint = torch.bincount(idx.reshape(-1), minlength=rows * size)
    joint = joint.view(rows, num_codes, num_classes, num_codes)  # [r, x, y, s]
    h_xys = tab[joint].view(rows, -1).sum(dim=1)
    h_xs = tab[joint.sum(dim=2)].view(rows, -1).sum(dim=1)
    return ((h_xys - h_xs + const) / n).clamp_min(0.0)


def _index_dtype(size: int) -> torch.dtype:
    # int32 halves the memory traffic of the per-sample index arithmetic (the hot loop).
    return torch.int32 if size < 2**31 else torch.long


def cmim_select(
    codes: Tensor,
    labels: Tensor,
    k: int,
    num_codes: int,
    num_classes: int,
    *,
    batch: int = 32,
    chunk: int = 8,
) -> list[int]:
    """Greedy conditional-MI channel selection (Fleuret's CMIM); indices in pick order.

    "Keep the channel carrying the most information about Y given those already kept" is
    intractable beyond a few kept channels (the joint histogram of the kept set explodes). CMIM
    is its standard tractable form: bound the information given the set by the worst case over
    single kept channels,

        first = argmax_c I(X_c; Y),
        score_c = min(I(X_c; Y), min_{s picked} I(X_c; Y | X_s)),   next = argmax_c score_c.

    A copy of a picked channel has I(X_c; Y | X_s) = 0 and is deferred behind any channel with
    new information about Y. Ties go to the lowest index.

    Implementation: Fleuret's lazy evaluation, vectorised. Scores only decrease as channels
    are picked (and never below 0), so a candidate whose partial score (the min over the picked
    channels it has been checked against) is below the best fully-updated score can never win
    and is left alone. Each round updates the ``batch`` highest-scoring open candidates against
    up to ``chunk`` of their pending picked channels with one histogram (:func:`_cmi_rows`).
    The picks equal the eager algorithm's.

    Args:
        codes: ``[N, C]`` codes in ``[0, num_codes)``.
        labels: ``[N]`` labels in ``[0, num_classes)``.
        k: number of channels to pick, ``1 <= k <= C``.
        num_codes: code range.
        num_classes: label range.
        batch: candidates updated per round (speed only).
        chunk: pending conditionings per candidate per round (speed only).

    Returns:
        The ``k`` picked channel indices, in pick order.
    """
    _check_codes(codes, labels, num_codes, num_classes)
    n, c = codes.shape
    if not 1 <= k <= c:
        raise ValueError(f"k must be in [1, {c}], got {k}")
    labels = labels.long()
    tab = _xlogx_table(n)
    dt = _index_dtype(batch * chunk * num_codes * num_classes * num_codes)
    codes_t = codes.t().to(dt).contiguous()  # [C, N]
    xyk = (codes_t * num_classes + labels.to(dt)) * num_codes  # [C, N]
    score = mutual_information(codes, labels, num_codes, num_classes)  # partial scores
    done = torch.zeros(c, dtype=torch.long)  # picked channels each candidate was checked against
    alive = torch.ones(c, dtype=torch.bool)
    picks = torch.empty(k, dtype=torch.long)
    consts = torch.empty(k, dtype=torch.float64)
    ninf = torch.tensor(float("-inf"), dtype=torch.float64)
    for t in range(k):
        while True:  # lazy rounds until the best fully-updated candidate is certain
            full = alive & ((done == t) | (score <= 0))  # a zero partial score is final
            best_full = score[full].max() if bool(full.any()) else ninf
            act = (alive & ~full & (score >= best_full)).nonzero().squeeze(1)
            if act.numel() == 0:
                break
            act = act[torch.sort(-score[act], stable=True).indices[:batch]]
            take = (t - done[act]).clamp(max=chunk)
            row_c = act.repeat_interleave(take)
            first = torch.cumsum(take, 0) - take
            row_j = done[act].repeat_interleave(take) + (
                torch.arange(row_c.numel()) - first.repeat_interleave(take)
            )
            cmi = _cmi_rows(
                xyk[row_c], codes_t[picks[row_j]], consts[row_j], num_codes, num_classes, tab
            )
            score.scatter_reduce_(0, row_c, cmi, reduce="amin")
            done[act] += take
        full = alive & ((done == t) | (score <= 0))
        best = int(torch.argmax(torch.where(full, score, ninf)))
        picks[t] = best
        alive[best] = False
        consts[t] = _cond_constant(labels, codes_t[best].long(), num_codes, num_classes, tab)
    return picks.tolist()
