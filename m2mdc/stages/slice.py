"""slice: residual-safe progressive channel slicing (section 3.2, Algorithm 1 lines 6-12).

For each stage in forward order: select the planes to keep, co-slice them (every block's
output, the downsample path, the next stage's inputs), slice the blocks' mid channels,
check the residual invariants, recalibrate BatchNorm, and run a short KD repair against the
teacher. ``slice/plan.json`` records the kept indices of every step (relative to the model
at that step), ``slice/metrics.json`` the accuracy, parameters and MACs after every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from m2mdc.arch import SlicePlan, get_adapter
from m2mdc.artifacts import atomic_write_json, load_checkpoint, read_json, save_checkpoint
from m2mdc.data.loader import Batches
from m2mdc.distill.ig import overlay_batches
from m2mdc.distill.losses import repair_terms, terms_from_config
from m2mdc.distill.repair import RepairExtras, kd_repair
from m2mdc.distill.sparsity import sparsity_from_config
from m2mdc.profiling import count_macs, count_params
from m2mdc.scoring.activations import collect_pooled
from m2mdc.scoring.channels import SELECTORS, select_channels
from m2mdc.slicing import (
    ChannelDecay,
    Group,
    SelectFn,
    head_keep,
    mid_block,
    plan_slice,
    slice_fractions,
    slice_groups,
    slice_stages,
)
from m2mdc.stage import Context, Stage, register_stage
from m2mdc.stages.score import probe_batches
from m2mdc.train import dist
from m2mdc.train.loop import FitResult, TrainSpec, evaluate, recalibrate_bn, reported_top1
from m2mdc.ui import log

# slice/metrics.json "cut": per step, the top1 right before it, right after the physical cut
# (gradual: also at the end of the decay, just before the cut) and after BN recalibration
CUT_KEYS = ("step", "stage", "top1_before", "top1_decayed", "top1_sliced", "top1_recal")


def _selector(ctx: Context, model: nn.Module) -> SelectFn:
    """The slice stage's channel choice for one group (probe activations for ``cmi``)."""
    cfg = ctx.cfg.slice

    def select(group: Group) -> list[int]:
        pooled = labels = None
        if SELECTORS.get(cfg.selector).needs_activations:
            probe = probe_batches(ctx)
            acts, labels = collect_pooled(
                model, {"m": group.module}, probe.epoch(0), probe.num_examples
            )
            pooled = acts["m"]
        return select_channels(
            cfg.selector,
            group.producers,
            group.keep,
            pooled=pooled,
            labels=labels,
            seed=int(ctx.cfg.seed),
            bins=int(ctx.cfg.score.bins),
        )

    return select


@dataclass
class _Setup:
    """What every slicing step of a run shares."""

    ctx: Context
    teacher: nn.Module
    train: Batches
    kd_train: Batches  # the repairs' batches: with the IG overlay when kd.ig.prob > 0
    test: Batches
    terms: list
    fp: str
    out: Path


def _repair(
    su: _Setup,
    student: nn.Module,
    n: int,
    stage: str,
    epochs: int,
    feat_index: list[int],
    extras: RepairExtras | None,
) -> FitResult:
    cfg = su.ctx.cfg
    result = kd_repair(
        student,
        su.teacher,
        su.kd_train,
        su.test,
        TrainSpec.of(
            cfg,
            "kd",
            epochs=epochs,
            state_path=su.out / f"state-{n}.pt",
            fingerprint=f"{su.fp}-{n}",
            desc=f"slice {stage}",
        ),
        terms=su.terms,
        temperature=float(cfg.kd.temperature),
        feature_index=feat_index,
        feature_match=str(cfg.kd.feature_match),
        val=su.ctx.val_batches(),
        extras=extras,
    )
    (su.out / f"state-{n}.pt").unlink(missing_ok=True)
    return result


def _cut_then_repair(
    su: _Setup,
    student: nn.Module,
    plan: SlicePlan,
    n: int,
    stage: str,
    epochs: int,
    feat_index: list[int],
    later: list[str],
) -> tuple[nn.Module, dict[str, Any], FitResult]:
    """oneshot / progressive: cut, recalibrate BN, repair (with ``kd.sparsity`` on the groups
    of the ``later`` steps' stages)."""
    cfg = su.ctx.cfg
    student = get_adapter(student).slice(student, plan).to(su.ctx.device)  # checks invariants
    row: dict[str, Any] = {"top1_sliced": evaluate(student, su.test, cfg.perf)["top1"]}
    row["bn_recal_batches"] = recalibrate_bn(
        student, su.train, int(cfg.prune.bn_recal_batches), perf=cfg.perf
    )
    row["top1_recal"] = evaluate(student, su.test, cfg.perf)["top1"]
    extras = _sparsity(su.ctx, student, later)
    result = _repair(su, student, n, stage, epochs, feat_index, extras)
    selected = result.selected_row()
    row["top1_repaired"] = reported_top1(selected) if selected else row["top1_recal"]
    return student, row, result


def _decay_then_cut(
    su: _Setup,
    student: nn.Module,
    plan: SlicePlan,
    n: int,
    stage: str,
    epochs: int,
    feat_index: list[int],
) -> tuple[nn.Module, dict[str, Any], FitResult]:
    """gradual: repair while the removed channels decay to 0, then cut (which changes
    nothing), then recalibrate BN: the running statistics lag behind the decaying factor."""
    cfg = su.ctx.cfg
    decay = ChannelDecay(student, plan, epochs * len(su.kd_train), str(cfg.slice.decay))
    result = _repair(su, student, n, stage, epochs, feat_index, RepairExtras(decay=decay))
    decay.factor.fill_(0.0)  # already 0 after the last step; also with no repair epoch
    row: dict[str, Any] = {"top1_decayed": evaluate(student, su.test, cfg.perf)["top1"]}
    decay.remove()
    student = get_adapter(student).slice(student, plan).to(su.ctx.device)
    row["top1_sliced"] = evaluate(student, su.test, cfg.perf)["top1"]
    row["bn_recal_batches"] = recalibrate_bn(
        student, su.train, int(cfg.prune.bn_recal_batches), perf=cfg.perf
    )
    row["top1_recal"] = row["top1_repaired"] = evaluate(student, su.test, cfg.perf)["top1"]
    return student, row, result


def _sparsity(ctx: Context, model: nn.Module, stages: list[str]) -> RepairExtras | None:
    """``kd.sparsity`` on the groups a slicing step over ``stages`` will rank; None when off."""
    planes_keep, mid_keep = slice_fractions(ctx.cfg, ctx.run_dir)
    groups = slice_groups(
        model, planes_keep, mid_keep, stages=stages, round_to=int(ctx.cfg.slice.round_to)
    )
    pen = sparsity_from_config(ctx.cfg.kd.sparsity, [g.producers for g in groups])
    return None if pen is None else RepairExtras(sparsity=pen)


def _resume(su: _Setup, groups: list[list[str]]) -> tuple[int, Any, dict[str, Any]]:
    """(steps done, model, checkpoint meta) of the last finished step of this configuration."""
    for n in range(len(groups), 0, -1):
        step_file = su.out / f"step-{n}.pt"
        if step_file.is_file():
            model, meta = load_checkpoint(step_file)
            if meta.get("fingerprint") == su.fp:
                log.info(
                    f"slice: resuming after step {n} ({'+'.join(groups[n - 1])}) from {step_file}"
                )
                return n, model.to(su.ctx.device), meta
    return 0, None, {}


def run(ctx: Context) -> dict[str, Any]:
    sc = ctx.cfg.slice
    su, student, stages = _setup(ctx)
    adapter = get_adapter(student)
    feat_index = list(range(adapter.classifier(su.teacher).in_features))
    start_top1 = read_json(ctx.run_dir / "distill" / "metrics.json")["top1"]
    # the slicing steps: one stage each (progressive), or every stage at once (oneshot,
    # gradual), which then repairs for the epochs the progressive steps would have had together
    groups = [[s] for s in stages] if sc.schedule == "progressive" else [stages] if stages else []
    done_steps, model, meta = _resume(su, groups)
    if model is not None:
        student, feat_index = model, list(meta["feat_index"])
    steps: list[dict[str, Any]] = list(meta.get("steps", []))
    plan_steps: list[dict[str, Any]] = list(meta.get("plan_steps", []))
    for n in range(done_steps + 1, len(groups) + 1):
        before = steps[-1]["top1_repaired"] if steps else start_top1
        done = _step(su, student, n, groups, feat_index, before)
        if done is None:  # nothing to cut in this step's stages
            continue
        student, row, plan, feat_index = done
        steps.append(row)
        plan_steps.append(
            {"step": n, "stage": row["stage"], "planes": plan.planes, "mid": plan.mid}
        )
        meta = {"fingerprint": su.fp, "steps": steps, "plan_steps": plan_steps}
        if dist.is_main():
            save_checkpoint(su.out / f"step-{n}.pt", student, meta | {"feat_index": feat_index})
        student.to(ctx.device)
    return _finish(su, student, steps, plan_steps, feat_index, start_top1)


def _setup(ctx: Context) -> tuple[_Setup, nn.Module, list[str]]:
    """What the steps share, the distilled student and the stages slicing visits."""
    cfg, sc = ctx.cfg, ctx.cfg.slice
    teacher = ctx.load_model("teacher")
    student = ctx.load_model("distill")
    train, test = ctx.train_batches(), ctx.eval_batches()
    stages = slice_stages(ctx.cfg, student)
    kd_train = train
    if int(sc.repair_epochs) > 0 and stages:
        kd_train = overlay_batches(
            train,
            teacher,
            ig_cfg=cfg.kd.ig,
            teacher_path=ctx.run_dir / "teacher" / "model.pt",
            data=ctx.data("train"),
            cache_dir=ctx.cache_dir if cfg.use_cache else None,
        )
    terms = repair_terms(terms_from_config(cfg.kd), int(cfg.kd.epochs), sc.repair_ramp)
    out = ctx.stage_dir("slice")
    return (
        _Setup(ctx, teacher, train, kd_train, test, terms, ctx.fingerprint("slice"), out),
        student,
        stages,
    )


def _step(
    su: _Setup,
    student: nn.Module,
    n: int,
    groups: list[list[str]],
    feat_index: list[int],
    before: float,
) -> tuple[nn.Module, dict[str, Any], SlicePlan, list[int]] | None:
    """Step ``n``: plan the cut of its stages, cut (oneshot/progressive: then recalibrate and
    repair; gradual: decay while repairing, then cut); the sliced student, the step's metrics
    row, its plan and the classifier's feature index. None when nothing is cut."""
    ctx, sc = su.ctx, su.ctx.cfg.slice
    planes_keep, mid_keep = slice_fractions(ctx.cfg, ctx.run_dir)
    group = groups[n - 1]
    # every selection of a step reads the same model: the one before the step's cut
    plan = plan_slice(
        student,
        planes_keep,
        mid_keep,
        stages=group,
        round_to=int(sc.round_to),
        select_fn=_selector(ctx, student),
    )
    if not plan.planes and not plan.mid:
        return None
    stage_of = {b.name: b.stage for b in get_adapter(student).blocks(student)}
    cut_stages = set(plan.planes) | {stage_of[mid_block(student, k)] for k in plan.mid}
    cut = [g for g in group if g in cut_stages]  # a step repairs repair_epochs per stage
    stage, epochs = "+".join(cut), int(sc.repair_epochs) * len(cut)
    head = head_keep(student, plan)  # the classifier's kept inputs, when the cut narrows it
    new_index = feat_index if head is None else [feat_index[i] for i in head]
    if sc.schedule == "gradual":
        student, row, result = _decay_then_cut(su, student, plan, n, stage, epochs, new_index)
    else:
        later = [s for g in groups[n:] for s in g]  # the stages of the steps still to come
        student, row, result = _cut_then_repair(
            su, student, plan, n, stage, epochs, new_index, later
        )
    size = _size(ctx)
    row = {"step": n, "stage": stage, "top1_before": before, **row}
    row |= {"repair": result.history, "selection": result.selection()}
    row |= {"params": count_params(student), **count_macs(student, size)}
    row |= {"planes": {s: len(v) for s, v in plan.planes.items()}}
    row |= {"mid": {b: len(v) for b, v in plan.mid.items()}}
    log.info(
        f"slice {stage}: top1 {before:.2f}% before the cut, {row['top1_sliced']:.2f}% cut, "
        f"{row['top1_recal']:.2f}% after BN recal, {row['top1_repaired']:.2f}% final; "
        f"MACs {row['macs']:,}"
    )
    return student, row, plan, new_index


def _size(ctx: Context) -> int:
    """The input side MACs are counted at."""
    return int(ctx.cfg.profile.input_size or ctx.cfg.dataset.image_size)


def _finish(
    su: _Setup,
    student: nn.Module,
    steps: list[dict[str, Any]],
    plan_steps: list[dict[str, Any]],
    feat_index: list[int],
    start_top1: float,
) -> dict[str, Any]:
    """The stage's outputs: model.pt, plan.json and metrics.json (the step files go)."""
    ctx, sc, out, size = su.ctx, su.ctx.cfg.slice, su.out, _size(su.ctx)
    final = steps[-1]["top1_repaired"] if steps else start_top1
    metrics = {
        "top1": final,
        "top1_split": ctx.eval_split,
        "top1_start": start_top1,
        "policy": sc.name,
        "selector": sc.selector,
        "schedule": sc.schedule,
        "cut": [{k: r[k] for k in CUT_KEYS if k in r} for r in steps],
        "steps": steps,
        "params": count_params(student),
        **count_macs(student, size),
        "input_size": size,
    }
    plan = {"policy": sc.name, "selector": sc.selector, "steps": plan_steps}
    plan |= {"widths": get_adapter(student).widths(student), "feature_index": feat_index}
    if dist.is_main():
        save_checkpoint(out / "model.pt", student.cpu(), {"stage": "slice", "top1": final})
        atomic_write_json(out / "plan.json", plan)
        atomic_write_json(out / "metrics.json", metrics)
        for f in out.glob("step-*.pt"):
            f.unlink()
    return metrics


register_stage(
    Stage(
        name="slice",
        command="slice",
        requires=("distill",),
        keys=("slice", "select", "profile.input_size"),
        run=run,
        trains=True,
    )
)
