"""slice: residual-safe progressive channel slicing (section 3.2, Algorithm 1 lines 6-12).

For each stage in forward order: select the planes to keep, co-slice them (every block's
output, the downsample path, the next stage's inputs), slice the blocks' mid channels,
check the residual invariants, recalibrate BatchNorm, and run a short KD repair against the
teacher. ``slice/plan.json`` records the kept indices of every step (relative to the model
at that step), ``slice/metrics.json`` the accuracy, parameters and MACs after every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from m2mdc.arch import SlicePlan, get_adapter
from m2mdc.artifacts import atomic_write_json, load_checkpoint, read_json, save_checkpoint
from m2mdc.distill.ig import overlay_batches
from m2mdc.distill.losses import terms_from_config
from m2mdc.distill.repair import kd_repair
from m2mdc.errors import M2MError
from m2mdc.profiling import count_macs, count_params
from m2mdc.scoring.activations import collect_pooled
from m2mdc.scoring.channels import SELECTORS, round_keep, select_channels
from m2mdc.stage import Context, Stage, register_stage
from m2mdc.stages.score import probe_batches
from m2mdc.train.loop import TrainSpec, evaluate, recalibrate_bn
from m2mdc.ui import log

POLICIES = {
    "planes_mid": (True, True),
    "planes": (True, False),
    "mid": (False, True),
    "none": (False, False),
}


def fraction(value: Any, stage: str, key: str) -> float:
    """A keep fraction: one number for every stage, or a per-stage mapping (missing = 1.0)."""
    v = value.get(stage, 1.0) if isinstance(value, Mapping) else value
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise M2MError(
            f"{key} must be a number in (0, 1] or a mapping stage -> number; got {v!r}"
        ) from None
    if not 0 < f <= 1:
        raise M2MError(f"{key}={f} for {stage} is out of range; allowed: > 0 and <= 1")
    return f


def _select(
    ctx: Context, model: nn.Module, module: nn.Module, producers: list, k: int
) -> list[int]:
    cfg = ctx.cfg.slice
    pooled = labels = None
    if SELECTORS.get(cfg.selector).needs_activations:
        probe = probe_batches(ctx)
        acts, labels = collect_pooled(model, {"m": module}, probe.epoch(0), probe.num_examples)
        pooled = acts["m"]
    return select_channels(
        cfg.selector,
        producers,
        k,
        pooled=pooled,
        labels=labels,
        seed=int(ctx.cfg.seed),
        bins=int(ctx.cfg.score.bins),
    )


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    sc = cfg.slice
    out = ctx.stage_dir("slice")
    teacher = ctx.load_model("teacher")
    student = ctx.load_model("distill")
    adapter = get_adapter(student)
    do_planes, do_mid = POLICIES[sc.name]
    planes_keep, mid_keep = sc.planes_keep, sc.mid_keep
    if cfg.budget.macs is not None:  # the allocator's fractions (prune/plan.json)
        choice = read_json(ctx.run_dir / "prune" / "plan.json")["budget"]["choice"]
        planes_keep, mid_keep = float(choice["planes_keep"]), float(choice["mid_keep"])
    train, test = ctx.train_batches(), ctx.test_batches()
    size = int(cfg.profile.input_size or cfg.dataset.image_size)
    terms = terms_from_config(cfg.kd)
    kd_train = train  # the repairs' batches: with the IG overlay when kd.ig.prob > 0
    if int(sc.repair_epochs) > 0 and (do_planes or do_mid):
        kd_train = overlay_batches(
            train,
            teacher,
            ig_cfg=cfg.kd.ig,
            teacher_path=ctx.run_dir / "teacher" / "model.pt",
            data=ctx.data("train"),
            cache_dir=ctx.cache_dir if cfg.use_cache else None,
        )
    feat_index = list(range(adapter.classifier(teacher).in_features))
    start_top1 = read_json(ctx.run_dir / "distill" / "metrics.json")["top1"]
    steps: list[dict[str, Any]] = []
    plan_steps: list[dict[str, Any]] = []
    stages = (
        adapter.plane_stages(student, include_first=bool(sc.include_first_stage))
        if (do_planes or do_mid)
        else []
    )
    # the slicing steps: one stage each (progressive), or every stage at once (oneshot), which
    # then repairs for the epochs the progressive steps would have had together
    groups = [[s] for s in stages] if sc.schedule == "progressive" else [stages] if stages else []
    fp = ctx.fingerprint("slice")
    done_steps = 0
    for n in range(len(groups), 0, -1):  # resume after the last finished step
        step_file = out / f"step-{n}.pt"
        if step_file.is_file():
            model, meta = load_checkpoint(step_file)
            if meta.get("fingerprint") == fp:
                student = model.to(ctx.device)
                steps, plan_steps = list(meta["steps"]), list(meta["plan_steps"])
                feat_index, done_steps = list(meta["feat_index"]), n
                log.info(
                    f"slice: resuming after step {n} ({'+'.join(groups[n - 1])}) from {step_file}"
                )
                break
    for n, group in enumerate(groups, start=1):
        if n <= done_steps:
            continue
        # every selection of a step reads the same model: the one before the step's cut
        planes: dict[str, list[int]] = {}
        mids: dict[str, list[int]] = {}
        for g in group if do_planes else []:
            producers = adapter.plane_producers(student, g)
            c = producers[0][0].out_channels
            k = round_keep(c, fraction(planes_keep, g, "slice.planes_keep"), int(sc.round_to))
            if k < c:
                planes[g] = _select(ctx, student, adapter.stage_output(student, g), producers, k)
        cut_stages = set(planes)
        for b in adapter.blocks(student) if do_mid else []:
            if b.stage not in group:
                continue
            prod = adapter.mid_producers(student, b.name)
            if prod is None:
                continue
            c = prod[0].out_channels
            k = round_keep(c, fraction(mid_keep, b.stage, "slice.mid_keep"), int(sc.round_to))
            if k < c:
                mids[b.name] = _select(ctx, student, prod[1], [prod], k)
                cut_stages.add(b.stage)
        if not planes and not mids:
            continue
        # the stages this step cuts (a oneshot step repairs repair_epochs for each of them)
        cut = [g for g in group if g in cut_stages]
        stage = "+".join(cut)
        s_dim = adapter.classifier(student).in_features
        student = adapter.slice(student, SlicePlan(planes=planes, mid=mids))  # checks invariants
        if adapter.classifier(student).in_features != s_dim:  # the last planes feed the head
            feat_index = [feat_index[i] for i in list(planes.values())[-1]]  # filled in order
        student.to(ctx.device)
        row: dict[str, Any] = {
            "step": n,
            "stage": stage,
            "top1_sliced": evaluate(student, test, cfg.perf)["top1"],
        }
        row["bn_recal_batches"] = recalibrate_bn(student, train, int(cfg.prune.bn_recal_batches))
        row["top1_recal"] = evaluate(student, test, cfg.perf)["top1"]
        result = kd_repair(
            student,
            teacher,
            kd_train,
            test,
            TrainSpec.of(
                cfg,
                "kd",
                epochs=int(sc.repair_epochs) * len(cut),
                state_path=out / f"state-{n}.pt",
                fingerprint=f"{fp}-{n}",
                desc=f"slice {stage}",
            ),
            terms=terms,
            temperature=float(cfg.kd.temperature),
            feature_index=feat_index,
            feature_match=str(cfg.kd.feature_match),
            val=ctx.val_batches(),
        )
        (out / f"state-{n}.pt").unlink(missing_ok=True)
        selected = result.selected_row()
        row["top1_repaired"] = selected["test_top1"] if selected else row["top1_recal"]
        row["repair"] = result.history
        row["selection"] = result.selection()
        row.update(
            {
                "params": count_params(student),
                **count_macs(student, size),
                "planes": {s: len(v) for s, v in planes.items()},
                "mid": {b: len(v) for b, v in mids.items()},
            }
        )
        steps.append(row)
        plan_steps.append({"step": n, "stage": stage, "planes": planes, "mid": mids})
        save_checkpoint(
            out / f"step-{n}.pt",
            student,
            {"fingerprint": fp, "steps": steps, "plan_steps": plan_steps, "feat_index": feat_index},
        )
        student.to(ctx.device)
        log.info(
            f"slice {stage}: top1 {row['top1_sliced']:.2f}% sliced, {row['top1_recal']:.2f}% "
            f"after BN recal, {row['top1_repaired']:.2f}% after repair; MACs {row['macs']:,}"
        )
    final = steps[-1]["top1_repaired"] if steps else start_top1
    metrics = {
        "top1": final,
        "top1_start": start_top1,
        "policy": sc.name,
        "selector": sc.selector,
        "steps": steps,
        "params": count_params(student),
        **count_macs(student, size),
        "input_size": size,
    }
    save_checkpoint(out / "model.pt", student.cpu(), {"stage": "slice", "top1": final})
    atomic_write_json(
        out / "plan.json",
        {
            "policy": sc.name,
            "selector": sc.selector,
            "steps": plan_steps,
            "widths": adapter.widths(student),
            "feature_index": feat_index,
        },
    )
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
    )
)
