"""Fair baselines beside the compressed students (``compare=...``, ``m2mdc compare``).

``teacher_same_epochs``: the paper's students "beat the teacher" after a 5-epoch teacher
fine-tune plus 5 KD epochs and more repair epochs of their own, so part of their gain is
simply more training. This stage trains the teacher on for exactly as many epochs as the
students received after pruning (``kd.epochs`` plus ``slice.repair_epochs`` per slicing step
that ran), with the teacher's own recipe (``teacher.unfreeze``, Adam at ``teacher.lr``,
``teacher.grad_clip``; a fresh optimizer, as the finished teacher keeps no optimizer state),
and reports it as the ``teacher_same_epochs`` row. Its batch order continues the teacher's
(epochs ``teacher.epochs + 1 ...``), so it sees new shuffles and flips, not a replay.
"""

from __future__ import annotations

from typing import Any

from m2mdc.arch.zoo import apply_unfreeze
from m2mdc.artifacts import atomic_write_json, read_json, save_checkpoint
from m2mdc.config import comparisons
from m2mdc.pipeline import Context, Stage, register_stage
from m2mdc.train.loop import ce_loss, fit
from m2mdc.ui import log

NAME = "teacher_same_epochs"


def student_epochs(ctx: Context) -> dict[str, int]:
    """The epochs the students trained after pruning: distillation and every slicing repair."""
    kd = len(read_json(ctx.run_dir / "distill" / "metrics.json").get("epochs", []))
    steps = read_json(ctx.run_dir / "slice" / "metrics.json").get("steps", [])
    repairs = len(steps) * int(ctx.cfg.slice.repair_epochs)
    return {"distill": kd, "slice_repairs": repairs, "total": kd + repairs}


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    out = ctx.stage_dir(NAME)
    budget = student_epochs(ctx)
    epochs = budget["total"]
    model = ctx.load_model("teacher")
    start = read_json(ctx.run_dir / "teacher" / "metrics.json")
    trainable = apply_unfreeze(model, cfg.teacher.unfreeze)
    log.info(
        f"{NAME}: the teacher trained on for {epochs} more epochs (the students' "
        f"{budget['distill']} KD + {budget['slice_repairs']} slicing-repair epochs), "
        f"{trainable:,} trainable parameters"
    )
    result = fit(
        model,
        model.parameters(),
        ctx.train_batches(),
        ctx.test_batches(),
        epochs=epochs,
        lr=cfg.teacher.lr,
        grad_clip=cfg.teacher.grad_clip,
        loss_fn=ce_loss,
        state_path=out / "state.pt",
        fingerprint=ctx.fingerprint(NAME),
        desc=NAME,
        perf=cfg.perf,
        epoch_offset=len(start.get("epochs", [])),
        val=ctx.val_batches(),
        select=str(cfg.select),
    )
    for p in model.parameters():
        p.requires_grad_(True)
    selected = result.selected_row()
    final = selected["test_top1"] if selected else start["top1"]
    metrics = {
        "top1": final,
        "top1_start": start["top1"],
        **result.selection(),
        "extra_epochs": epochs,
        "student_epochs": budget,
        "teacher_epochs": len(start.get("epochs", [])),
        "epochs": result.history,
        "train_seconds": round(result.seconds, 3),
        "resumed_from_epoch": result.resumed_from,
    }
    save_checkpoint(
        out / "model.pt", model.cpu(), {"stage": NAME, "top1": final, "seed": int(cfg.seed)}
    )
    atomic_write_json(out / "metrics.json", metrics)
    (out / "state.pt").unlink(missing_ok=True)
    log.info(f"{NAME}: test top1 {start['top1']:.2f}% -> {final:.2f}% after {epochs} epochs")
    return metrics


register_stage(
    Stage(
        name=NAME,
        command="compare",
        requires=("teacher", "slice"),
        keys=("teacher", "select"),
        run=run,
        enabled=lambda cfg: NAME in comparisons(cfg),
    )
)
