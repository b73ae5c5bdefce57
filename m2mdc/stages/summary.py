"""summary.json: one row per model of the run (teacher, students, comparisons).

It is rewritten after every successful command on a run directory that has a teacher, so a
run made stage by stage (``m2mdc finetune-teacher``, ..., ``m2mdc compare``) keeps a complete
record too. Compute columns come from the profile when it is current for every model of the
run; otherwise parameters and MACs are counted here and latency is left empty (``profiled``
is false) until ``m2mdc profile`` runs. The INT8 columns (``int8_top1``, ``int8_bytes``,
``int8_latency_ms``, ... and their FP32 ONNX Runtime counterparts ``fp32_ort_*``) come from
the quantize stage, in the rows of the models it quantized that are still the run's.
"""

from __future__ import annotations

from typing import Any

from m2mdc.artifacts import atomic_write_json, load_checkpoint, read_json
from m2mdc.profiling import count_macs, count_params
from m2mdc.rows import finished_models
from m2mdc.stage import STAGES, Context
from m2mdc.stages.quantize import COLUMN_PREFIXES
from m2mdc.stages.quantize import NAME as QUANTIZE
from m2mdc.ui import console, log, table

SUMMARY_COLUMNS = ("top1", "params", "macs", "conv_macs", "latency_ms")


def _compute_columns(ctx: Context, models: dict[str, str], size: int) -> dict[str, dict]:
    """Row -> params/MACs/latency: the profile's when it is current, else counted here."""
    profile = ctx.run_dir / "profile" / "metrics.json"
    if ctx.is_done("profile") and profile.is_file():
        prof = read_json(profile)["models"]
        if all(name in prof for name in models):
            return {name: dict(prof[name]) for name in models}
    log.info("summary: the profile is missing or out of date; latency left empty (m2mdc profile)")
    out = {}
    for name, st in models.items():
        model = ctx.load_model(st, expect=False)
        out[name] = {"params": count_params(model), **count_macs(model, size)}
    return out


def _int8_columns(ctx: Context) -> dict[str, dict[str, Any]]:
    """Row -> the quantize stage's INT8 and FP32 ONNX Runtime columns, for the rows whose
    quantized model is the one the run holds now (the model's fingerprint is unchanged)."""
    done, path = ctx.run_dir / QUANTIZE / "done.json", ctx.run_dir / QUANTIZE / "metrics.json"
    if not done.is_file() or not path.is_file():
        return {}
    current = ctx.model_fingerprints()
    return {
        row: {k: v for k, v in m.items() if k.startswith(COLUMN_PREFIXES)}
        for row, m in read_json(path)["models"].items()
        if m.get("model_fingerprint") is not None and m["model_fingerprint"] == current.get(row)
    }


def _num_classes(ctx: Context) -> int:
    """The class count the run's models were built for (the teacher's)."""
    teacher, _ = load_checkpoint(ctx.run_dir / "teacher" / "model.pt")
    return int(getattr(teacher, "m2mdc_arch")["num_classes"])  # noqa: B009


def write_summary(ctx: Context, config: dict[str, Any]) -> dict[str, Any]:
    """Collect top1 (from each stage's metrics) and compute columns into ``<run>/summary.json``.

    ``config`` is the run's config of record (:func:`m2mdc.pipeline.recorded_config`): it is
    stored whole, and the summary's own fields (ratio, input size, seed) are read from it.
    """
    models = finished_models(ctx.run_dir)
    size = int(config["profile"].get("input_size") or config["dataset"]["image_size"])
    columns = _compute_columns(ctx, models, size)
    int8_columns = _int8_columns(ctx)
    rows: list[dict[str, Any]] = []
    splits: set[str] = set()
    for name, stage in models.items():
        m = read_json(ctx.run_dir / stage / "metrics.json")
        splits.add(m.get("top1_split", "test"))
        p = columns[name]
        rows.append(
            {"model": name, "top1": m["top1"], **{k: p.get(k) for k in SUMMARY_COLUMNS[1:]}}
            | int8_columns.get(name, {})
        )
    teacher = rows[0]
    for r in rows:
        for k in ("params", "macs", "conv_macs"):
            r[f"{k}_reduction_pct"] = 100.0 * (1 - r[k] / teacher[k]) if teacher[k] else 0.0
        r["top1_delta"] = r["top1"] - teacher["top1"]
        if r.get("latency_ms") and teacher.get("latency_ms"):
            r["latency_speedup"] = teacher["latency_ms"] / r["latency_ms"]
    summary = {
        "rows": rows,
        "model": config["model"]["name"],
        "dataset": config["dataset"]["name"],
        "num_classes": _num_classes(ctx),
        "input_size": size,
        # the split every row's top1 was measured on: "test", or "val" for a dataset without a
        # test split (the validation split stands in for it)
        "top1_split": "/".join(sorted(splits)),
        "seed": int(config["seed"]),
        "experiment": config["experiment_name"],
        "prune_ratio": float(config["prune"]["ratio"]),
        "profiled": all(r.get("latency_ms") is not None for r in rows),
        "fingerprints": {
            name: read_json(ctx.run_dir / name / "done.json").get("fingerprint")
            for name in STAGES
            if (ctx.run_dir / name / "done.json").is_file()
        },
        "config": config,
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
    cols += ["int8_top1", "int8_latency_ms"] if int8_columns else []
    console.print(table(f"summary ({summary['top1_split']} top1): {ctx.run_dir}", cols, rows))
    return summary
