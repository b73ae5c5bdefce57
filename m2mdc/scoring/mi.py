"""Vectorised discrete mutual information between binned channels and labels (paper §3.1).

The block score of the paper is the mean per-channel MI of quantile-binned pooled activations,

    s_b = 1/C_b * sum_c I(bin(Z_bc); Y),

and the CMI channel selector needs I(X_c; Y | X_s) for every candidate c at once. Everything here
works on all channels in one shot: one ``searchsorted`` bins every channel, one ``bincount`` over
flattened (channel, code, label[, conditioning code]) indices builds every joint histogram, so
there is no Python loop over channels. All MI values are float64 and in nats.

Example:
    >>> z = torch.randn(1000, 64)
    >>> y = torch.randint(0, 10, (1000,))
    >>> binned_mi(z, y, bins=10).shape
    torch.Size([64])
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    # float64: an edge interpolated between two equal order statistics equals them exactly, so
    # tied values never straddle an edge.
    zt = z.detach().to("cpu", torch.float64).t().contiguous()  # [C, N]: searchsorted wants rows
    if not bool(torch.isfinite(zt).all()):
        raise ValueError("quantile_bin: activations contain NaN or inf")
    if bins == 1:
        return torch.zeros(n, c, dtype=torch.long)
    srt = zt.sort(dim=1).values
    # Sort-based quantiles (torch.quantile caps its input at 2**24 elements).
    pos = torch.arange(1, bins, dtype=torch.float64) / bins * (n - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = pos - lo.to(torch.float64)
    edges = srt[:, lo] + frac * (srt[:, hi] - srt[:, lo])  # [C, bins-1], non-decreasing
    codes = torch.searchsorted(edges.contiguous(), zt, right=False)  # count of edges < value
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
    h_xy = _sum_xlogx(joint, (1, 2))
    h_x = _sum_xlogx(joint.sum(dim=2), (1,))
    h_y = _sum_xlogx(torch.bincount(labels.long(), minlength=num_classes), (0,))
    mi = (h_xy - h_x - h_y) / n + torch.log(torch.tensor(float(n), dtype=torch.float64))
    return mi.clamp_min(0.0)


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
    return mutual_information(quantile_bin(z, bins), y, bins, k)


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
