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

from m2mdc.arch import get_adapter
from m2mdc.arch.zoo import create_model
from m2mdc.artifacts import atomic_write_json, load_checkpoint
from m2mdc.pipeline import Context, Stage, register_stage
from m2mdc.profiling import count_macs, count_params, measure_latency
from m2mdc.ui import console, table

# summary row name -> stage directory holding its model.pt, in pipeline order
MODEL_ROWS: tuple[tuple[str, str], ...] = (
    ("teacher", "teacher"),
    ("block_pruned", "prune"),
    ("block_kd", "distill"),
    ("inner_slice", "slice"),
)


def run_models(ctx: Context) -> dict[str, str]:
    """Row name -> stage for every finished stage of this run that saved a model.

    ``block_pruned`` (before KD) is listed only when no distilled student exists, since both
    have the same architecture.
    """
    found = {
        row: st
        for row, st in MODEL_ROWS
        if (ctx.run_dir / st / "model.pt").is_file() and (ctx.run_dir / st / "done.json").is_file()
    }
    if "block_kd" in found:
        found.pop("block_pruned", None)
    return found


def input_size(ctx: Context) -> int:
    return int(ctx.cfg.profile.input_size or ctx.cfg.dataset.image_size)


def profile_one(model: nn.Module, ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg.profile
    size = input_size(ctx)
    row: dict[str, Any] = {
        "params": count_params(model),
        **count_macs(model, size),
        "input_size": size,
    }
    if cfg.latency:
        for bs in cfg.batch_sizes:
            lat = measure_latency(
                model,
                size,
                batch_size=int(bs),
                warmup=int(cfg.latency_warmup),
                repeats=int(cfg.latency_repeats),
                device=str(ctx.device),
            )
            key = "latency_ms" if bs == 1 else f"latency_ms_b{bs}"
            row[key] = lat["latency_ms"]
            row["threads"] = lat["threads"]
            row["device"] = lat["device"]
    return row


def _fingerprint_extra(ctx: Context) -> Any:
    from m2mdc.artifacts import read_json

    return {
        row: read_json(ctx.run_dir / st / "done.json").get("fingerprint")
        for row, st in run_models(ctx).items()
    }


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    models: dict[str, nn.Module] = {}
    found = run_models(ctx)
    if found:
        mode = "run"
        for row, st in found.items():
            models[row] = ctx.load_model(st)
    elif cfg.checkpoint:
        mode = "checkpoint"
        model, _ = load_checkpoint(cfg.checkpoint)
        models["checkpoint"] = model.to(ctx.device)
    else:
        mode = "architecture"
        classes = int(cfg.dataset.num_classes or ctx.num_classes)
        base = create_model(cfg.model.name, classes).to(ctx.device)
        models[cfg.model.name] = base
        if cfg.prune.keep_cfg:
            keep = {str(k): [int(i) for i in v] for k, v in cfg.prune.keep_cfg.items()}
            models["keep_cfg"] = get_adapter(cfg.model.name).keep(base, keep)
    rows = {}
    with torch.inference_mode():
        for name, model in models.items():
            rows[name] = profile_one(model.eval(), ctx)
    base_row = next(iter(rows.values()))
    for r in rows.values():
        r["params_reduction_pct"] = 100.0 * (1 - r["params"] / base_row["params"])
        r["macs_reduction_pct"] = 100.0 * (1 - r["macs"] / base_row["macs"])
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
        requires=(),
        keys=(
            "profile",
            "checkpoint",
            "model.name",
            "dataset.num_classes",
            "dataset.image_size",
            "prune.keep_cfg",
        ),
        run=run,
        extra=_fingerprint_extra,
    )
)
