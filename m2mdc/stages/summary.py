"""summary.json: one row per model of the run (teacher, block_kd, inner_slice)."""

from __future__ import annotations

from typing import Any

from m2mdc.artifacts import atomic_write_json, read_json
from m2mdc.pipeline import Context
from m2mdc.ui import console, table

SUMMARY_COLUMNS = ("top1", "params", "macs", "conv_macs", "latency_ms")


def write_summary(ctx: Context) -> dict[str, Any]:
    """Collect top1 (from each stage's metrics) and the profile into ``<run>/summary.json``."""
    prof = read_json(ctx.run_dir / "profile" / "metrics.json")["models"]
    rows: list[dict[str, Any]] = []
    stage_of = {
        "teacher": "teacher",
        "block_pruned": "prune",
        "block_kd": "distill",
        "inner_slice": "slice",
        "teacher_same_epochs": "teacher_same_epochs",
        "peer_torch_pruning": "peer_torch_pruning",
    }
    for name, p in prof.items():
        stage = stage_of.get(name)
        if stage is None:
            continue
        m = read_json(ctx.run_dir / stage / "metrics.json")
        row = {"model": name, "top1": m["top1"], **{k: p.get(k) for k in SUMMARY_COLUMNS[1:]}}
        rows.append(row)
    teacher = rows[0]
    for r in rows:
        for k in ("params", "macs", "conv_macs"):
            r[f"{k}_reduction_pct"] = 100.0 * (1 - r[k] / teacher[k]) if teacher[k] else 0.0
        r["top1_delta"] = r["top1"] - teacher["top1"]
        if r.get("latency_ms") and teacher.get("latency_ms"):
            r["latency_speedup"] = teacher["latency_ms"] / r["latency_ms"]
    summary = {
        "rows": rows,
        "model": ctx.cfg.model.name,
        "dataset": ctx.cfg.dataset.name,
        "num_classes": ctx.num_classes,
        "input_size": int(ctx.cfg.profile.input_size or ctx.cfg.dataset.image_size),
        "seed": int(ctx.cfg.seed),
        "experiment": ctx.cfg.experiment_name,
        "prune_ratio": float(ctx.cfg.prune.ratio),
    }
    atomic_write_json(ctx.run_dir / "summary.json", summary)
    cols = [
        "model",
        "top1",
        "top1_delta",
        "params",
        "params_reduction_pct",
        "macs",
        "macs_reduction_pct",
        "latency_ms",
    ]
    console.print(table(f"summary: {ctx.run_dir}", cols, rows))
    return summary
