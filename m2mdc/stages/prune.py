"""prune: remove the lowest-scoring free blocks and rebuild the student (sections 3.1, 3.3).

The student keeps the teacher's own modules for every surviving block; BatchNorm statistics
are then re-estimated over ``prune.bn_recal_batches`` forward-only training batches.
"""

from __future__ import annotations

from typing import Any

from m2mdc.arch import get_adapter
from m2mdc.artifacts import atomic_write_json, read_json, save_checkpoint
from m2mdc.pipeline import Context, Stage, register_stage
from m2mdc.profiling import count_macs, count_params
from m2mdc.pruning import keep_cfg_from_removals, num_to_remove, parse_keep_cfg, select_removals
from m2mdc.train.loop import evaluate, recalibrate_bn
from m2mdc.ui import log


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    teacher = ctx.load_model("teacher")
    adapter = get_adapter(teacher)
    blocks = adapter.blocks(teacher)
    scores_doc = read_json(ctx.run_dir / "score" / "scores.json")
    scores = {r["name"]: float(r["score"]) for r in scores_doc["blocks"]}
    if cfg.prune.keep_cfg:
        # the adapter validates protection, empty stages, unknown stages and indices
        student = adapter.keep(teacher, parse_keep_cfg(cfg.prune.keep_cfg))
        keep = {s: list(v) for s, v in adapter.arch(student)["keep"].items()}
        removed = [b for b in blocks if b.orig_index not in keep[b.stage]]
        source = "prune.keep_cfg"
    else:
        removed = select_removals(blocks, scores, float(cfg.prune.ratio))
        keep = keep_cfg_from_removals(blocks, removed)
        student = adapter.keep(teacher, keep)
        source = f"lowest {scores_doc['method']} scores"
    test = ctx.test_batches()
    before = evaluate(student, test, cfg.perf)["top1"]
    used = recalibrate_bn(student, ctx.train_batches(), int(cfg.prune.bn_recal_batches))
    after = evaluate(student, test, cfg.perf)["top1"]
    teacher_top1 = read_json(ctx.run_dir / "teacher" / "metrics.json")["top1"]
    size = int(cfg.profile.input_size or cfg.dataset.image_size)
    plan = {
        "keep_cfg": keep,
        "removed": [b.name for b in removed],
        "protected": [b.name for b in blocks if b.protected],
        "k_target": num_to_remove(blocks, float(cfg.prune.ratio)),
        "ratio": float(cfg.prune.ratio),
        "source": source,
        "scores": {b.name: scores.get(b.name) for b in blocks},
    }
    out = ctx.stage_dir("prune")
    metrics = {
        "top1": after,
        "top1_teacher": teacher_top1,
        "top1_before_recal": before,
        "top1_after_recal": after,
        "bn_recal_batches": used,
        "params": count_params(student),
        **count_macs(student, size),
        "input_size": size,
        "removed": len(removed),
    }
    save_checkpoint(out / "model.pt", student.cpu(), {"stage": "prune", "keep_cfg": keep})
    atomic_write_json(out / "plan.json", plan)
    atomic_write_json(out / "metrics.json", metrics)
    log.info(
        f"prune: removed {plan['removed'] or 'nothing'}; top1 {before:.2f}% -> {after:.2f}% "
        f"after BN recalibration ({used} batches); teacher {teacher_top1:.2f}%"
    )
    return metrics


register_stage(Stage(name="prune", command="prune", requires=("score",), keys=("prune",), run=run))
