"""The report's figures: accuracy vs GMacs with Pareto frontiers, and per-epoch KD curves.

Figures are drawn on a bare :class:`~matplotlib.figure.Figure` with the Agg canvas (no
pyplot, no global backend state, no display needed) and returned as PNG bytes, so the caller
writes them atomically like every other artifact.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

# Row types keep their marker across reports; rows this table does not know get the rest.
_MARKERS = {"teacher": "s", "block_pruned": "v", "block_kd": "o", "inner_slice": "^"}
_SPARE_MARKERS = ("D", "P", "X", "*", "h", "p", "<", ">")
_KD_PANELS = (("top1", "{split} top-1 (%)"), ("ce", "CE"),
              ("logit_align", "logit alignment (1 − cos)"),
              ("feat_align", "feature alignment (1 − cos)"))  # fmt: skip


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


# cost axis -> (row key, unit divisor, axis label, frontier flag set by the report, title)
COSTS = {
    "macs": ("macs_mean", 1e9, "GMacs (convolutions + linear, one image at the run's input size)",
             "pareto", "Accuracy vs compute"),
    "latency": ("latency_ms_mean", 1.0, "batch-1 latency (ms, measured by m2mdc profile)",
                "pareto_latency", "Accuracy vs latency"),
}  # fmt: skip


def pareto_png(
    groups: Sequence[Mapping[str, Any]], names: Mapping[str, str], cost: str = "macs"
) -> bytes | None:
    """Top-1 (mean, error bar = sample std) vs a cost (:data:`COSTS`: GMacs, or batch-1
    latency); colour per series, marker per row type.

    Args:
        groups: aggregated groups (``series``, ``rows`` with the cost's mean, ``top1_mean``,
            ``top1_std`` and the cost's frontier flag set by the aggregation).
        names: display names of row types.
        cost: ``macs`` or ``latency``.

    Returns:
        PNG bytes, or None when no row has both accuracy and the cost.
    """
    key, _, xlabel, _, title = COSTS[cost]
    series = list(dict.fromkeys(g["series"] for g in groups))
    colours = dict(zip(series, _colours(len(series)), strict=True))
    kinds = list(dict.fromkeys(r["model"] for g in groups for r in g["rows"]))
    spare = iter(_SPARE_MARKERS * 4)
    markers = {k: _MARKERS.get(k) or next(spare, "o") for k in kinds}
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    xs_all: list[float] = []
    for s, colour in colours.items():
        rows = [r for g in groups if g["series"] == s for r in g["rows"]]
        rows = [r for r in rows if r.get(key) is not None and r["top1_mean"] is not None]
        xs_all += _draw_series(ax, rows, cost, colour, markers)
    points = int8_points(groups, cost)
    xs_all += _draw_int8(ax, points, colours)
    if not xs_all:
        return None
    if min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:  # sweeps over input sizes
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    split = "/".join(sorted({str(g.get("split", "test")) for g in groups}))
    ax.set_ylabel(f"{split} top-1 (%), mean ± sample std over seeds")
    ax.set_title(f"{title} (step line: Pareto frontier per series)")
    ax.grid(alpha=0.3)
    ax.margins(0.08)
    model_handles = [
        Line2D([], [], color="0.4", marker=markers[k], ls="none", label=names.get(k, k))
        for k in kinds
    ]
    _legends(ax, colours, model_handles + _int8_legend(points, cost))
    return _png(fig)


def _draw_series(
    ax: Any, rows: list[Mapping[str, Any]], cost: str, colour: Any, markers: Mapping[str, str]
) -> list[float]:
    """One series' rows (mean top-1, sample-std error bar; black edge on the frontier) and its
    Pareto frontier as a post-step line; the x values drawn."""
    key, unit, _, flag, _ = COSTS[cost]
    xs: list[float] = []
    for r in rows:
        x = r[key] / unit
        xs.append(x)
        ax.errorbar(
            [x],
            [r["top1_mean"]],
            yerr=[r["top1_std"] or 0.0],
            fmt=markers[r["model"]],
            color=colour,
            ms=7,
            capsize=3,
            alpha=0.85,
            linestyle="none",
            mec="black" if r.get(flag) else colour,
        )
    front = sorted((r[key] / unit, r["top1_mean"]) for r in rows if r.get(flag))
    if front:
        # post-steps: the best accuracy reachable at a cost of at most x
        ax.step(*zip(*front, strict=True), where="post", color=colour, lw=1.3, alpha=0.7)
    return xs


def _legends(ax: Any, colours: Mapping[str, Any], model_handles: list[Any]) -> None:
    """The series legend (colours) and the model legend (markers), outside the axes: points
    sit in every corner of a sweep."""
    first = ax.legend(
        handles=[Line2D([], [], color=c, marker="o", label=s) for s, c in colours.items()],
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=8,
        title="series",
    )
    ax.add_artist(first)
    ax.legend(
        handles=model_handles,
        loc="lower left",
        bbox_to_anchor=(1.02, 0.0),
        fontsize=8,
        title="model (black edge: on the frontier)",
    )


# cost axis -> the group's INT8 aggregate (m2mdc.report) key an INT8 point is placed at: its
# model's MACs (quantization leaves them), or its batch-1 latency in ONNX Runtime
INT8_COSTS = {"macs": "macs_mean", "latency": "int8_latency_ms_mean"}
INT8_MARKER = "x"


def int8_points(groups: Sequence[Mapping[str, Any]], cost: str) -> list[dict[str, Any]]:
    """The INT8 models of a plot (each group's ``int8`` aggregates): series, model, ``x`` (the
    cost, in the axis unit), ``y`` (INT8 top-1 mean) and ``fp32``, the point of the FP32
    model it was quantized from (None when that row has no such cost)."""
    key, unit = COSTS[cost][:2]
    out = []
    for g in groups:
        fp32 = {r["model"]: r for r in g["rows"]}
        for q in g.get("int8") or []:
            x, y = q.get(INT8_COSTS[cost]), q.get("int8_top1_mean")
            if x is None or y is None:
                continue
            r = fp32.get(q["model"], {})
            has = r.get(key) is not None and r.get("top1_mean") is not None
            base = (r[key] / unit, r["top1_mean"]) if has else None
            out.append({"series": g["series"], "model": q["model"], "x": x / unit, "y": y})
            out[-1]["fp32"] = base
    return out


def _draw_int8(ax: Any, points: Sequence[Mapping[str, Any]], colours: Mapping[str, Any]) -> list:
    """INT8 points as crosses in their series' colour, dotted to their FP32 model's point."""
    for p in points:
        colour = colours[p["series"]]
        if p["fp32"] is not None:
            bx, by = p["fp32"]
            ax.plot([bx, p["x"]], [by, p["y"]], ls=":", lw=1, color=colour, alpha=0.7)
        ax.plot([p["x"]], [p["y"]], marker=INT8_MARKER, ms=8, mew=2, color=colour, ls="none")
    return [p["x"] for p in points]


def _int8_legend(points: Sequence[Mapping[str, Any]], cost: str) -> list[Line2D]:
    if not points:
        return []
    where = "its ONNX Runtime latency" if cost == "latency" else "its model's MACs"
    label = f"INT8 in ONNX Runtime, at {where} (dotted: from the FP32 model)"
    return [Line2D([], [], color="0.4", marker=INT8_MARKER, mew=2, ls="none", label=label)]


def kd_curves_png(groups: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Per-epoch top-1 (on each run's reporting split) and KD terms (means over seeds) of
    every group's distill stage.

    Returns:
        PNG bytes, or None when no run has a ``distill/metrics.json`` history.
    """
    with_kd = [g for g in groups if g["kd_curve"]]
    if not with_kd:
        return None
    fig = Figure(figsize=(10, 7 + 0.18 * len(with_kd)), layout="constrained")
    axes = fig.subplots(2, 2, squeeze=False).ravel()
    for g, colour in zip(with_kd, _colours(len(with_kd)), strict=True):
        epochs = [e["epoch"] for e in g["kd_curve"]]
        for ax, (key, _) in zip(axes, _KD_PANELS, strict=True):
            ys = [e.get(key) for e in g["kd_curve"]]
            pts = [(x, y) for x, y in zip(epochs, ys, strict=True) if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, color=colour, label=g["label"])
    split = "/".join(sorted({str(g.get("split", "test")) for g in with_kd}))
    for ax, (_, title) in zip(axes, _KD_PANELS, strict=True):
        ax.set_title(title.format(split=split), fontsize=10)
        ax.set_xlabel("KD epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", fontsize=7, ncol=2 if len(with_kd) > 4 else 1
    )
    fig.suptitle("Staged KD repair (distill stage), means over seeds")
    return _png(fig)
