"""prune: remove the lowest-scoring free blocks and rebuild the student (sections 3.1, 3.3).

The student keeps the teacher's own modules for every surviving block; BatchNorm statistics
are then re-estimated over ``prune.bn_recal_batches`` forward-only training batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from m2mdc import budget
from m2mdc.arch import get_adapter
from m2mdc.artifacts import atomic_write_json, read_json, save_checkpoint
from m2mdc.data.datasets import class_interleaved_order
from m2mdc.data.loader import Batches
from m2mdc.errors import M2MError
from m2mdc.profiling import count_macs, count_params
from m2mdc.pruning import keep_cfg_from_removals, num_to_remove, parse_keep_cfg, select_removals
from m2mdc.stage import Context, Stage, register_stage
from m2mdc.train.loop import evaluate, recalibrate_bn
from m2mdc.ui import log


def _choose(
    ctx: Context, teacher: nn.Module, blocks: list, scores: dict[str, float], method: str
) -> tuple[nn.Module, dict[str, list[int]], list, str, dict[str, Any] | None]:
    """The blocks to keep, by the MAC-budget allocator, ``prune.keep_cfg`` or the lowest
    scores: ``(student, keep_cfg, removed blocks, source, allocator record or None)``."""
    cfg = ctx.cfg
    adapter = get_adapter(teacher)
    if cfg.budget.macs is not None:
        if cfg.prune.keep_cfg:
            raise M2MError("budget.macs and prune.keep_cfg both choose the blocks; give one")
        choice, budget_doc = allocate(ctx, teacher, blocks, scores)
        keep = choice.keep_cfg
        removed = [b for b in blocks if b.orig_index not in keep[b.stage]]
        source = f"budget.macs={cfg.budget.macs} (allocator, ratio {choice.ratio})"
        return adapter.keep(teacher, keep), keep, removed, source, budget_doc
    if cfg.prune.keep_cfg:
        # the adapter validates protection, empty stages, unknown stages and indices
        student = adapter.keep(teacher, parse_keep_cfg(cfg.prune.keep_cfg))
        keep = {s: list(v) for s, v in adapter.arch(student)["keep"].items()}
        removed = [b for b in blocks if b.orig_index not in keep[b.stage]]
        return student, keep, removed, "prune.keep_cfg", None
    removed = select_removals(blocks, scores, float(cfg.prune.ratio))  # lowest score first
    keep = keep_cfg_from_removals(blocks, removed)
    return adapter.keep(teacher, keep), keep, removed, f"lowest {method} scores", None


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    teacher = ctx.load_model("teacher")
    blocks = get_adapter(teacher).blocks(teacher)
    scores_doc = read_json(ctx.run_dir / "score" / "scores.json")
    scores = {r["name"]: float(r["score"]) for r in scores_doc["blocks"]}
    student, keep, removed, source, budget_doc = _choose(
        ctx, teacher, blocks, scores, scores_doc["method"]
    )
    test = ctx.eval_batches()
    before = evaluate(student, test, cfg.perf)["top1"]
    used = recalibrate_bn(student, ctx.train_batches(), int(cfg.prune.bn_recal_batches))
    after = evaluate(student, test, cfg.perf)["top1"]
    teacher_top1 = read_json(ctx.run_dir / "teacher" / "metrics.json")["top1"]
    size = int(cfg.profile.input_size or cfg.dataset.image_size)
    ratio = float(budget_doc["choice"]["ratio"] if budget_doc else cfg.prune.ratio)
    plan = {
        "keep_cfg": keep,
        "removed": [b.name for b in removed],
        "protected": [b.name for b in blocks if b.protected],
        "k_target": num_to_remove(blocks, ratio),
        "ratio": ratio,
        "source": source,
        "scores": {b.name: scores.get(b.name) for b in blocks},
        **({"budget": budget_doc} if budget_doc is not None else {}),
    }
    metrics = {
        "top1": after,
        "top1_split": ctx.eval_split,
        "top1_teacher": teacher_top1,
        "top1_before_recal": before,
        "top1_after_recal": after,
        "bn_recal_batches": used,
        "params": count_params(student),
        **count_macs(student, size),
        "input_size": size,
        "removed": len(removed),
    }
    out = ctx.stage_dir("prune")
    save_checkpoint(out / "model.pt", student.cpu(), {"stage": "prune", "keep_cfg": keep})
    atomic_write_json(out / "plan.json", plan)
    atomic_write_json(out / "metrics.json", metrics)
    log.info(
        f"prune: removed {plan['removed'] or 'nothing'}; top1 {before:.2f}% -> {after:.2f}% "
        f"after BN recalibration ({used} batches); teacher {teacher_top1:.2f}%"
    )
    return metrics


def allocate(
    ctx: Context, teacher: nn.Module, blocks: list, scores: dict[str, float]
) -> tuple[budget.Candidate, dict[str, Any]]:
    """Run the MAC-budget allocator (:mod:`m2mdc.budget`) and describe it for plan.json."""
    cfg = ctx.cfg
    size = int(cfg.profile.input_size or cfg.dataset.image_size)
    teacher_macs = int(count_macs(teacher, size)["macs"])
    target = budget.target_macs(float(cfg.budget.macs), teacher_macs)
    tol = float(cfg.budget.tolerance)
    found, missed = budget.search(
        teacher.cpu(),
        blocks,
        scores,
        target,
        size,
        ratios=[float(r) for r in cfg.budget.ratios],
        policy=str(cfg.slice.name),
        tolerance=tol,
        round_to=int(cfg.slice.round_to),
        include_first=bool(cfg.slice.include_first_stage),
    )
    if not found:
        raise budget.no_candidate_error(target, tol, missed)
    choice, ranked = budget.choose(found, _proxy(ctx, teacher))
    teacher.to(ctx.device)
    log.info(
        f"prune: budget {target:,} MACs ({target / teacher_macs:.1%} of the teacher): "
        f"{len(found)} candidates; chose ratio {choice.ratio}, {choice.shape}, planes "
        f"{choice.planes_keep:.3f}, mid {choice.mid_keep:.3f} ({choice.macs:,} MACs, proxy "
        f"top1 {choice.proxy_top1:.2f}%)"
    )
    doc = {
        "target_macs": target,
        "teacher_macs": teacher_macs,
        "tolerance": tol,
        "proxy": f"probe top1 after BN recalibration ({int(cfg.budget.proxy_batches)} batches)",
        "choice": budget.as_records([choice])[0],
        "candidates": budget.as_records(ranked),
        "unreachable": missed,
    }
    return choice, doc


def _proxy(ctx: Context, teacher: nn.Module) -> Callable[[budget.Candidate], float]:
    """The allocator's proxy: a candidate's top1 on ``budget.proxy_samples`` class-mixed
    training images after ``budget.proxy_batches`` batches of BN recalibration."""
    cfg = ctx.cfg
    train = ctx.data("train")
    n = min(int(cfg.budget.proxy_samples), len(train))
    probe = Batches(
        train,
        int(cfg.dataset.eval_batch_size),
        int(cfg.dataset.image_size),
        device=ctx.device,
        order=class_interleaved_order(train.labels, seed=int(cfg.seed))[:n],
        augment=str(cfg.dataset.augment),
    )
    recal = ctx.train_batches()

    def proxy(c: budget.Candidate) -> float:
        student = budget.shaped_student(
            teacher,
            c.keep_cfg,
            c.planes_keep,
            c.mid_keep,
            round_to=int(cfg.slice.round_to),
            include_first=bool(cfg.slice.include_first_stage),
        ).to(ctx.device)
        recalibrate_bn(student, recal, int(cfg.budget.proxy_batches))
        return evaluate(student, probe, cfg.perf)["top1"]

    return proxy


def _budget_extra(ctx: Context) -> Any:
    """With a budget, the allocator reads the slicing policy: it joins the fingerprint."""
    if ctx.cfg.budget.macs is None:
        return None
    sc = ctx.cfg.slice
    return {"slice": [str(sc.name), int(sc.round_to), bool(sc.include_first_stage)]}


register_stage(
    Stage(
        name="prune",
        command="prune",
        requires=("score",),
        keys=("prune", "budget", "profile.input_size"),
        run=run,
        extra=_budget_extra,
    )
)
