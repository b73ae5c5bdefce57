"""Fair baselines beside the compressed students (``compare=...``, ``m2mdc compare``).

``teacher_same_epochs``: the paper's students "beat the teacher" after a 5-epoch teacher
fine-tune plus 5 KD epochs and more repair epochs of their own, so part of their gain is
simply more training. This stage trains the teacher on for exactly as many epochs as the
students received after pruning (``kd.epochs`` plus ``slice.repair_epochs`` per slicing step
that ran), with the teacher's own recipe (``teacher.unfreeze``, Adam at ``teacher.lr``,
``teacher.grad_clip``; a fresh optimizer, as the finished teacher keeps no optimizer state),
and reports it as the ``teacher_same_epochs`` row. Its batch order continues the teacher's
(epochs ``teacher.epochs + 1 ...``), so it sees new shuffles and flips, not a replay.

``torch_pruning``: the same teacher pruned by Torch-Pruning (:mod:`m2mdc.peers`: one uniform
ratio, bisected; channels ranked by ``peer.importance``), one peer per ``peer.match`` entry:
``macs`` (row ``peer_torch_pruning``) at the inner_slice student's MACs within
``peer.mac_tolerance``; ``latency`` (row ``peer_torch_pruning_latency``) at the student's
batch-1 latency within ``peer.latency_tolerance``, the two timed interleaved in this process on
the run's device (``peer.latency_repeats`` rounds per trial; every trial's ratio, MACs and
latencies go to its metrics). Like the m2mdc students each gets BatchNorm recalibration
(``prune.bn_recal_batches``) and then exactly their post-pruning epoch budget (``kd.epochs`` +
the slicing repairs) at ``kd.lr`` with ``peer.terms`` (default CE + KL at T=4).

The result is saved in the checkpoint contract with ``arch.resized_by = "torch_pruning"``:
the base architecture is rebuilt and every layer resized to its stored tensors before the
strict load (:func:`m2mdc.arch.surgery.resize_to_state`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from m2mdc import peers
from m2mdc.arch.zoo import apply_unfreeze
from m2mdc.artifacts import read_json, save_trained
from m2mdc.config import comparisons
from m2mdc.distill.losses import terms_from_config
from m2mdc.distill.repair import kd_repair
from m2mdc.profiling import count_params
from m2mdc.stage import Context, Stage, register_stage
from m2mdc.train import dist
from m2mdc.train.loop import TrainSpec, evaluate, fit, recalibrate_bn, reported_top1
from m2mdc.ui import log, plural

NAME = "teacher_same_epochs"
PEER = peers.NAME
LATENCY_PEER = peers.LATENCY_NAME


def student_epochs(ctx: Context) -> dict[str, int]:
    """The epochs the students trained after pruning: distillation and every slicing repair."""
    kd = len(read_json(ctx.run_dir / "distill" / "metrics.json").get("epochs", []))
    steps = read_json(ctx.run_dir / "slice" / "metrics.json").get("steps", [])
    repairs = sum(len(step.get("repair", [])) for step in steps)  # the epochs each step ran
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
        f"{NAME}: the teacher trained on for {plural(epochs, 'more epoch')} (the students' "
        f"{budget['distill']} KD + {plural(budget['slice_repairs'], 'slicing-repair epoch')}), "
        f"{trainable:,} trainable parameters"
    )
    spec = TrainSpec.of(
        cfg,
        "teacher",
        epochs=epochs,
        state_path=out / "state.pt",
        fingerprint=ctx.fingerprint(NAME),
        desc=NAME,
        epoch_offset=len(start.get("epochs", [])),
    )
    result = fit(
        model,
        model.parameters(),
        ctx.train_batches(),
        ctx.eval_batches(),
        spec,
        loss_fn=spec.cross_entropy(),
        val=ctx.val_batches(),
    )
    for p in model.parameters():
        p.requires_grad_(True)
    selected = result.selected_row()
    final = reported_top1(selected) if selected else start["top1"]
    metrics = {
        "top1": final,
        "top1_split": ctx.eval_split,
        "top1_start": start["top1"],
        **result.selection(),
        "extra_epochs": epochs,
        "student_epochs": budget,
        "teacher_epochs": len(start.get("epochs", [])),
        "epochs": result.history,
        "train_seconds": round(result.seconds, 3),
        "resumed_from_epoch": result.resumed_from,
    }
    if dist.is_main():
        save_trained(
            out, model.cpu(), metrics, {"stage": NAME, "top1": final, "seed": int(cfg.seed)}
        )
    log.info(
        f"{NAME}: {ctx.eval_split} top1 {start['top1']:.2f}% -> {final:.2f}% "
        f"after {plural(epochs, 'epoch')}"
    )
    return metrics


register_stage(
    Stage(
        name=NAME,
        command="compare",
        requires=("teacher", "slice"),
        keys=("teacher", "select"),
        run=run,
        trains=True,
        enabled=lambda cfg: NAME in comparisons(cfg),
    )
)


def run_peer(ctx: Context) -> dict[str, Any]:
    """``peer.match: [macs]``: the peer at the inner_slice student's MACs."""
    target = read_json(ctx.run_dir / "slice" / "metrics.json")
    size, target_macs = int(target["input_size"]), int(target["macs"])
    teacher = ctx.load_model("teacher")
    tolerance = float(ctx.cfg.peer.mac_tolerance)
    ratio, macs, trials = peers.bisect_ratio(teacher, target_macs, size, tolerance)
    match = {"macs": macs, "macs_error_pct": 100.0 * (macs / target_macs - 1.0)}
    why = f"gives {macs:,} MACs (inner_slice: {target_macs:,})"
    return train_peer(ctx, PEER, teacher, ratio, target, match, trials, why)


def run_peer_latency(ctx: Context) -> dict[str, Any]:
    """``peer.match: [latency]``: the peer at the inner_slice student's batch-1 latency,
    timed interleaved with it on the run's device."""
    cfg = ctx.cfg
    target = read_json(ctx.run_dir / "slice" / "metrics.json")
    size, target_macs = int(target["input_size"]), int(target["macs"])
    teacher, student = ctx.load_model("teacher"), ctx.load_model("slice")
    best, trials = peers.match_latency(
        teacher,
        student,
        size,
        tolerance=float(cfg.peer.latency_tolerance),
        repeats=int(cfg.peer.latency_repeats),
        device=str(ctx.device),
        on_trial=lambda t: log.info(
            f"{LATENCY_PEER}: ratio {t['ratio']:.4f}: {t['latency_ms']:.3g} ms against the "
            f"student's {t['student_latency_ms']:.3g} ms ({t['latency_ratio']:.3f}x), "
            f"{t['macs']:,} MACs"
        ),
    )
    macs = int(best["macs"])
    match = {
        "macs": macs,
        "macs_error_pct": 100.0 * (macs / target_macs - 1.0),
        "latency_ms": best["latency_ms"],
        "student_latency_ms": best["student_latency_ms"],
        "latency_ratio": best["latency_ratio"],
        "latency_error_pct": 100.0 * (best["latency_ratio"] - 1.0),
        "latency_threads": torch.get_num_threads(),
        "latency_device": str(ctx.device),
    }
    why = (
        f"runs at {best['latency_ms']:.3g} ms, {best['latency_ratio']:.3f}x the inner_slice "
        f"student's {best['student_latency_ms']:.3g} ms (batch 1, {len(trials)} timed trials), "
        f"with {macs:,} MACs (inner_slice: {target_macs:,})"
    )
    return train_peer(ctx, LATENCY_PEER, teacher, best["ratio"], target, match, trials, why)


def _prune_peer(ctx: Context, teacher: nn.Module, ratio: float, size: int) -> nn.Module:
    """``teacher`` pruned at the uniform ``ratio`` by ``peer.importance`` (Taylor: on
    ``peer.taylor_batches`` training batches), on ``ctx.device``, marked as resized by
    Torch-Pruning in its ``arch``."""
    cfg = ctx.cfg
    grad_batches = None
    if cfg.peer.importance == "taylor":
        n = int(cfg.peer.taylor_batches)
        grad_batches = list(itertools.islice(ctx.train_batches().epoch(0), n))
    peer = peers.prune_uniform(teacher, ratio, size, str(cfg.peer.importance), grad_batches)
    arch: dict[str, Any] = peer.m2mdc_arch  # type: ignore[assignment]  # the copy's own dict
    arch["resized_by"] = "torch_pruning"
    return peer.to(ctx.device)


def train_peer(
    ctx: Context,
    name: str,
    teacher: nn.Module,
    ratio: float,
    target: dict[str, Any],
    match: dict[str, Any],
    trials: list[dict[str, Any]],
    why: str,
) -> dict[str, Any]:
    """Prune ``teacher`` at the uniform ``ratio`` with ``peer.importance``, recalibrate its
    BatchNorm and train it for the students' post-pruning epochs: every peer alike, whatever
    it was matched to (``match``: its matched quantities; ``trials``: its bisection)."""
    cfg = ctx.cfg
    out = ctx.stage_dir(name)
    size = int(target["input_size"])
    peer = _prune_peer(ctx, teacher, ratio, size)
    test = ctx.eval_batches()
    top1_pruned = evaluate(peer, test, cfg.perf)["top1"]
    recalibrate_bn(peer, ctx.train_batches(), int(cfg.prune.bn_recal_batches), perf=cfg.perf)
    top1_recal = evaluate(peer, test, cfg.perf)["top1"]
    budget = student_epochs(ctx)
    log.info(
        f"{name}: uniform ratio {ratio:.4f} ({cfg.peer.importance}) {why}; top1 "
        f"{top1_pruned:.2f}% -> {top1_recal:.2f}% after BN recalibration; training "
        f"{plural(budget['total'], 'epoch')}"
    )
    terms = terms_from_config(cfg.peer)
    result = kd_repair(
        peer,
        teacher,
        ctx.train_batches(),
        test,
        TrainSpec.of(
            cfg,
            "kd",
            epochs=budget["total"],
            state_path=out / "state.pt",
            fingerprint=ctx.fingerprint(name),
            desc=name,
        ),
        terms=terms,
        temperature=float(cfg.peer.temperature),
        feature_match="projection",  # only used if peer.terms reads features: no kept map
        val=ctx.val_batches(),
    )
    selected = result.selected_row()
    final = reported_top1(selected) if selected else top1_recal
    peer.cpu()
    metrics = {
        "top1": final,
        "top1_split": ctx.eval_split,
        "top1_pruned": top1_pruned,
        "top1_recal": top1_recal,
        "ratio": ratio,
        "importance": str(cfg.peer.importance),
        "target_macs": int(target["macs"]),
        **match,
        "params": count_params(peer),
        "input_size": size,
        "bisection": trials,
        "student_epochs": budget,
        "terms": [t.__dict__ for t in terms],
        "epochs": result.history,
        **result.selection(),
        "train_seconds": round(result.seconds, 3),
        "resumed_from_epoch": result.resumed_from,
    }
    if dist.is_main():
        save_trained(out, peer, metrics, {"stage": name, "top1": final, "ratio": ratio})
    log.info(f"{name}: {ctx.eval_split} top1 {final:.2f}% after {plural(budget['total'], 'epoch')}")
    return metrics


# what every peer's training reads (its match's own settings are in "peer" too)
PEER_KEYS = (
    "peer",
    *(f"kd.{key}" for key in TrainSpec.SECTION_KEYS),  # trained like the students
    "prune.bn_recal_batches",
    "select",
)


def _peer_enabled(match: str) -> Callable[[DictConfig], bool]:
    return lambda cfg: "torch_pruning" in comparisons(cfg) and match in cfg.peer.match


register_stage(
    Stage(
        name=PEER,
        command="compare",
        requires=("teacher", "slice"),
        keys=PEER_KEYS,
        ignore=("peer.match", "peer.latency_tolerance", "peer.latency_repeats"),
        run=run_peer,
        trains=True,
        enabled=_peer_enabled("macs"),
    )
)
register_stage(
    Stage(
        name=LATENCY_PEER,
        command="compare",
        requires=("teacher", "slice"),
        keys=PEER_KEYS,
        ignore=("peer.match", "peer.mac_tolerance"),
        run=run_peer_latency,
        trains=True,
        enabled=_peer_enabled("latency"),
    )
)
