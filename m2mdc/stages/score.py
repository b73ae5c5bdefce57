"""score: rank blocks by label mutual information of their pooled activations (section 3.1).

The probe set is ``score.probe_samples`` training examples in a fixed order seeded by
``seed`` that visits the classes round robin (image folders list files class by class, so the
first N files would be a handful of classes), without augmentation.
"""

from __future__ import annotations

from typing import Any

from m2mdc.arch import get_adapter
from m2mdc.artifacts import atomic_write_json
from m2mdc.data.datasets import class_interleaved_order
from m2mdc.data.loader import Batches
from m2mdc.scoring.activations import collect_pooled
from m2mdc.scoring.blocks import BLOCK_SCORERS, rank, score_blocks
from m2mdc.scoring.mi import binned_mi
from m2mdc.stage import Context, Stage, register_stage
from m2mdc.ui import console, log, progress, table


def probe_batches(ctx: Context) -> Batches:
    """The fixed, class-mixed, unaugmented probe set (in the evaluation view)."""
    cfg = ctx.cfg
    train = ctx.data("train")
    n = min(int(cfg.score.probe_samples), len(train))
    order = class_interleaved_order(train.labels, seed=int(cfg.seed))[:n]
    return Batches(
        train,
        int(cfg.score.probe_batch_size),
        int(cfg.dataset.image_size),
        device=ctx.device,
        order=order,
        augment=str(cfg.dataset.augment),
    )


def _probe_pass(
    ctx: Context, teacher: Any, wanted: dict[str, Any]
) -> tuple[dict[str, Any], Any, int]:
    """One pass of the probe set through ``teacher``: the spatially pooled outputs of the
    ``wanted`` modules, the labels, and the number of probe examples."""
    probe = probe_batches(ctx)
    with progress() as bar:
        task = bar.add_task("score probe", total=probe.num_examples, info="", unit="img")
        pooled, labels = collect_pooled(
            teacher,
            wanted,
            probe.epoch(0),
            probe.num_examples,
            lambda done, _: bar.update(task, completed=done),
        )
    return pooled, labels, probe.num_examples


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    teacher = ctx.load_model("teacher")
    adapter = get_adapter(teacher)
    blocks = adapter.blocks(teacher)
    modules = {b.name: adapter.block_module(teacher, b.name) for b in blocks}
    # per-stage channel MI of the stage output (the planes): the signal slicing can reuse
    stage_out = {s: adapter.stage_output(teacher, s) for s in adapter.stages(teacher)}
    # one probe pass for the stage outputs and (when the method needs them) the blocks
    wanted = {f"stage:{s}": m for s, m in stage_out.items()}
    if BLOCK_SCORERS.get(cfg.score.method).needs_activations:
        wanted.update({f"block:{n}": m for n, m in modules.items()})
    pooled, labels, n_probe = _probe_pass(ctx, teacher, wanted)
    scores = score_blocks(
        teacher,
        modules,
        cfg.score.method,
        bins=int(cfg.score.bins),
        seed=int(cfg.seed),
        pooled={n: pooled[f"block:{n}"] for n in modules if f"block:{n}" in pooled},
        labels=labels,
    )
    ranks = rank(scores)
    channels = {
        s: binned_mi(
            pooled[f"stage:{s}"], labels, bins=int(cfg.score.bins), num_classes=ctx.num_classes
        ).tolist()
        for s in stage_out
    }
    rows = [
        {
            "name": b.name,
            "stage": b.stage,
            "protected": b.protected,
            "score": float(scores[b.name]),
            "rank": ranks[b.name],
        }
        for b in blocks
    ]
    return _write(ctx, rows, channels, n_probe)


def _write(
    ctx: Context, rows: list[dict[str, Any]], channels: dict[str, Any], n_probe: int
) -> dict[str, Any]:
    """Write ``scores.json`` and ``metrics.json``, print the ranking; the stage's result."""
    method = ctx.cfg.score.method
    result = {
        "method": method,
        "bins": int(ctx.cfg.score.bins),
        "probe_samples": n_probe,
        "blocks": rows,
        "stage_channel_mi": channels,
        "units": "nats" if method == "mi" else None,
    }
    atomic_write_json(ctx.stage_dir("score") / "scores.json", result)
    atomic_write_json(
        ctx.stage_dir("score") / "metrics.json",
        {"method": method, "probe_samples": n_probe, "num_blocks": len(rows)},
    )
    console.print(
        table(
            f"block scores ({method}, {n_probe} probe samples)",
            ["name", "stage", "protected", "score", "rank"],
            rows,
        )
    )
    lowest = min(rows, key=lambda r: r["score"])["name"]
    log.info(f"score: ranked {len(rows)} blocks; lowest {lowest}")
    return result


register_stage(
    Stage(
        name="score",
        command="score",
        requires=("teacher",),
        keys=("score",),
        run=run,
        cacheable=True,
    )
)
