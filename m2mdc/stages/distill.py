"""distill: staged KD repair of the pruned student against the teacher (section 3.4).

``kd.epochs=0`` keeps the pruned student as it is (the paper's "pruning without KD"
baseline); ``prune.ratio=0`` with KD gives "KD without pruning".
"""

from __future__ import annotations

from typing import Any

from torch import nn

from m2mdc.artifacts import read_json, save_trained
from m2mdc.config import to_plain
from m2mdc.distill.ig import overlay_batches
from m2mdc.distill.losses import terms_from_config
from m2mdc.distill.repair import RepairExtras, kd_repair
from m2mdc.distill.sparsity import Sparsity, sparsity_from_config
from m2mdc.slicing import slice_fractions, slice_groups, slice_stages
from m2mdc.stage import Context, Stage, register_stage
from m2mdc.train import dist
from m2mdc.train.loop import TrainSpec, reported_top1
from m2mdc.ui import log, plural


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    kd = cfg.kd
    out = ctx.stage_dir("distill")
    teacher = ctx.load_model("teacher")
    student = ctx.load_model("prune")
    start = read_json(ctx.run_dir / "prune" / "metrics.json")["top1"]
    terms = terms_from_config(kd)
    train = ctx.train_batches()
    if int(kd.epochs) > 0:  # kd.ig.prob > 0: the teacher's IG maps overlaid on the images
        train = overlay_batches(
            train,
            teacher,
            ig_cfg=kd.ig,
            teacher_path=ctx.run_dir / "teacher" / "model.pt",
            data=ctx.data("train"),
            cache_dir=ctx.cache_dir if cfg.use_cache else None,
        )
    penalty = _sparsity(ctx, student)
    result = kd_repair(
        student,
        teacher,
        train,
        ctx.eval_batches(),
        TrainSpec.of(
            cfg,
            "kd",
            epochs=int(kd.epochs),
            state_path=out / "state.pt",
            fingerprint=ctx.fingerprint("distill"),
            desc="distill",
        ),
        terms=terms,
        temperature=float(kd.temperature),
        feature_match=str(kd.feature_match),
        val=ctx.val_batches(),
        extras=None if penalty is None else RepairExtras(sparsity=penalty),
    )
    selected = result.selected_row()
    final = reported_top1(selected) if selected else start
    metrics = {
        "top1": final,
        "top1_split": ctx.eval_split,
        "top1_start": start,
        **result.selection(),
        "kd": kd.name,
        "terms": [t.__dict__ for t in terms],
        "epochs": result.history,
        "train_seconds": round(result.seconds, 3),
        "resumed_from_epoch": result.resumed_from,
    }
    if dist.is_main():
        save_trained(out, student.cpu(), metrics, {"stage": "distill", "top1": final})
    after = plural(int(kd.epochs), "KD epoch")
    log.info(f"distill: top1 {start:.2f}% -> {final:.2f}% after {after}")
    return metrics


def _sparsity(ctx: Context, student: nn.Module) -> Sparsity | None:
    """``kd.sparsity`` on the channel groups the slice stage will rank (in any of its steps);
    None while its weight is 0 (then no slicing setting is read)."""
    if float(ctx.cfg.kd.sparsity.weight) == 0:
        return None
    planes_keep, mid_keep = slice_fractions(ctx.cfg, ctx.run_dir)
    groups = slice_groups(
        student,
        planes_keep,
        mid_keep,
        stages=slice_stages(ctx.cfg, student),
        round_to=int(ctx.cfg.slice.round_to),
    )
    return sparsity_from_config(ctx.cfg.kd.sparsity, [g.producers for g in groups])


def _slice_groups_config(ctx: Context) -> dict[str, Any] | None:
    """With ``kd.sparsity`` on, the settings that decide its groups belong in the fingerprint."""
    if float(ctx.cfg.kd.sparsity.weight) == 0:
        return None
    keys = ("name", "planes_keep", "mid_keep", "round_to", "include_first_stage")
    return {k: to_plain(ctx.cfg.slice[k]) for k in keys}


register_stage(
    Stage(
        name="distill",
        command="distill",
        requires=("prune",),
        keys=("kd", "select"),
        run=run,
        trains=True,
        extra=_slice_groups_config,
    )
)
