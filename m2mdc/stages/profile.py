"""profile: parameters, MACs, convolution MACs and measured latency.

Three modes, chosen by what exists:

* in a run directory holding models: every model the pipeline saved (teacher, block_kd, ...);
* ``checkpoint=PATH``: that one checkpoint;
* otherwise the bare architecture of ``model=...`` (with ``dataset.num_classes``), plus the
  architecture after block removal when ``prune.keep_cfg`` is given: a budget planner that
  needs no data and no training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from m2mdc.arch import get_adapter, model_id
from m2mdc.arch.zoo import create_model
from m2mdc.artifacts import atomic_write_json, load_checkpoint
from m2mdc.profiling import batch_schedule, count_macs, count_params, measure_latencies
from m2mdc.pruning import parse_keep_cfg
from m2mdc.rows import finished_models
from m2mdc.stage import Context, Stage, register_stage
from m2mdc.ui import console, table


def input_size(ctx: Context) -> int:
    return int(ctx.cfg.profile.input_size or ctx.cfg.dataset.image_size)


def profile_one(model: nn.Module, ctx: Context) -> dict[str, Any]:
    """Parameters and MACs of one model (latency: :func:`measure_all`)."""
    size = input_size(ctx)
    return {"params": count_params(model), **count_macs(model, size), "input_size": size}


def latency_key(batch_size: int, name: str = "latency_ms") -> str:
    """``latency_ms`` for batch 1, ``latency_ms_b64`` for batch 64 (same for speedups)."""
    return name if batch_size == 1 else f"{name}_b{batch_size}"


def measure_all(
    models: dict[str, nn.Module], rows: dict[str, dict[str, Any]], ctx: Context
) -> None:
    """Latency of every model at every ``profile.batch_sizes``, into ``rows``.

    The models are timed interleaved (one forward of each per round), so their latency
    ratios are robust to load changes on a shared machine. Batches beyond 1 use fewer
    repeats and warm-up passes (:func:`~m2mdc.profiling.batch_schedule`), which keeps
    ResNet-34 at 224 on a CPU from taking minutes per model.
    """
    cfg = ctx.cfg.profile
    for bs in (int(b) for b in cfg.batch_sizes):
        repeats, warmup = batch_schedule(bs, int(cfg.latency_repeats), int(cfg.latency_warmup))
        lats = measure_latencies(
            models,
            input_size(ctx),
            batch_size=bs,
            warmup=warmup,
            repeats=repeats,
            device=str(ctx.device),
        )
        for name, lat in lats.items():
            rows[name][latency_key(bs)] = lat["latency_ms"]
            rows[name]["threads"] = lat["threads"]
            rows[name]["device"] = lat["device"]


def add_ratios(rows: dict[str, dict[str, Any]], batch_sizes: list[int]) -> None:
    """Reductions and realised speedups of every model against the first (the teacher):
    ``params/macs_reduction_pct``; for the others also ``mac_ratio`` (base MACs / model
    MACs), ``latency_speedup`` (base / model batch-1 latency), ``latency_speedup_b<N>`` for
    the other batch sizes, and ``speedup_over_mac_ratio`` (how much of the MAC reduction
    the batch-1 latency realises; 1 = all of it)."""
    base_name, base = next(iter(rows.items()))
    for name, r in rows.items():
        r["params_reduction_pct"] = 100.0 * (1 - r["params"] / base["params"])
        r["macs_reduction_pct"] = 100.0 * (1 - r["macs"] / base["macs"])
        if name == base_name:
            continue
        r["mac_ratio"] = base["macs"] / r["macs"] if r["macs"] else None
        for bs in batch_sizes:
            key = latency_key(int(bs))
            if r.get(key) and base.get(key):
                r[latency_key(int(bs), "latency_speedup")] = base[key] / r[key]
        if r.get("latency_speedup") and r.get("mac_ratio"):
            r["speedup_over_mac_ratio"] = r["latency_speedup"] / r["mac_ratio"]


def _models(ctx: Context) -> tuple[str, dict[str, nn.Module]]:
    """What to profile: a run's finished models, ``checkpoint=``, or the bare architecture
    (and its ``prune.keep_cfg`` student); the mode's name and the models by row."""
    cfg = ctx.cfg
    found = finished_models(ctx.run_dir)
    if found:
        return "run", {row: ctx.load_model(st, expect=False) for row, st in found.items()}
    if cfg.checkpoint:
        model, _ = load_checkpoint(cfg.checkpoint)
        return "checkpoint", {"checkpoint": model.to(ctx.device)}
    classes = int(cfg.dataset.num_classes or ctx.num_classes)
    base = create_model(model_id(cfg.model), classes).to(ctx.device)
    models = {model_id(cfg.model): base}
    if cfg.prune.keep_cfg:
        keep = parse_keep_cfg(cfg.prune.keep_cfg)
        models["keep_cfg"] = get_adapter(model_id(cfg.model)).keep(base, keep)
    return "architecture", models


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    mode, models = _models(ctx)
    rows = {}
    with torch.inference_mode():
        for name, model in models.items():
            rows[name] = profile_one(model.eval(), ctx)
        if cfg.profile.latency:
            measure_all(models, rows, ctx)
    add_ratios(rows, [int(b) for b in cfg.profile.batch_sizes] if cfg.profile.latency else [])
    metrics = {
        "mode": mode,
        "input_size": input_size(ctx),
        "models": rows,
        "threads": torch.get_num_threads(),
    }
    if mode == "checkpoint":
        metrics["checkpoint"] = str(cfg.checkpoint)
    atomic_write_json(ctx.stage_dir("profile") / "metrics.json", metrics)
    cols = [
        "model",
        "params",
        "macs",
        "conv_macs",
        "latency_ms",
        "params_reduction_pct",
        "macs_reduction_pct",
        "latency_speedup",
        "speedup_over_mac_ratio",
    ]
    console.print(
        table(
            f"profile ({mode}, input {input_size(ctx)}x{input_size(ctx)}, "
            f"{torch.get_num_threads()} threads)",
            cols,
            [{"model": k, **v} for k, v in rows.items()],
        )
    )
    return metrics


register_stage(
    Stage(
        name="profile",
        command="profile",
        derived=True,
        requires=(),
        keys=(
            "profile",
            "checkpoint",
            "model.name",
            "model.source",
            "dataset.num_classes",
            "dataset.image_size",
            "prune.keep_cfg",
        ),
        run=run,
        extra=Context.model_fingerprints,
    )
)
