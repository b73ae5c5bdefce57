"""``compare=torch_pruning``: a Torch-Pruning (DepGraph) peer at the inner_slice student's MACs.

From the same teacher, Torch-Pruning removes channels with one uniform ratio in every
prunable group (its ``BasePruner``, not global; the classifier is kept), ranked by
``peer.importance`` (``l1``: filter L1 norm, ``bn_scale``: |gamma|, ``taylor``: first-order
Taylor on ``peer.taylor_batches`` batches of CE gradients). With a uniform ratio the widths,
and so the MACs, depend on the ratio alone, so the ratio is bisected with L1 importance until
the MACs (counted by m2mdc's own counter, as for every other row) are within
``peer.mac_tolerance`` of the inner_slice student's, and the model is then pruned once with
the configured importance. Like the m2mdc students it gets BatchNorm recalibration
(``prune.bn_recal_batches``) and then exactly their post-pruning epoch budget (``kd.epochs`` +
the slicing repairs) at ``kd.lr`` with ``peer.terms`` (default CE + KL at T=4).

The result is saved in the checkpoint contract with ``arch.resized_by = "torch_pruning"``:
the base architecture is rebuilt and every layer resized to its stored tensors before the
strict load (:func:`m2mdc.arch.surgery.resize_to_state`).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m2mdc.arch import get_adapter
from m2mdc.artifacts import atomic_write_json, read_json, save_checkpoint
from m2mdc.config import comparisons
from m2mdc.distill.losses import terms_from_config
from m2mdc.distill.repair import kd_repair
from m2mdc.errors import M2MError
from m2mdc.pipeline import Context, Stage, register_stage
from m2mdc.profiling import count_macs, count_params
from m2mdc.stages.compare import student_epochs
from m2mdc.train.loop import evaluate, recalibrate_bn
from m2mdc.ui import log

NAME = "peer_torch_pruning"
MAX_RATIO = 0.95
BISECTION_STEPS = 30


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError:
        raise M2MError(
            "compare=torch_pruning needs the torch-pruning package: pip install 'm2mdc[peers]'"
        ) from None
    return torch_pruning


def prune_uniform(
    teacher: nn.Module,
    ratio: float,
    input_size: int,
    importance: str = "l1",
    grad_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    """A copy of ``teacher`` (on the CPU) with ``ratio`` of the channels of every prunable
    group removed by Torch-Pruning; the classifier's outputs are kept."""
    tp = _torch_pruning()
    model = copy.deepcopy(teacher).cpu().eval()
    if ratio <= 0:
        return model
    imp = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.TaylorImportance(),
    }[importance]()
    example = torch.zeros(1, 3, input_size, input_size)
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=imp,
        pruning_ratio=ratio,
        ignored_layers=[get_adapter(teacher).classifier(model)],
    )
    if importance == "taylor":  # first-order Taylor needs the gradients of the loss
        model.zero_grad()
        for x, y in grad_batches or []:
            F.cross_entropy(model(x.cpu()), y.cpu()).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def bisect_ratio(
    teacher: nn.Module, target_macs: int, input_size: int, tolerance: float
) -> tuple[float, int, list[dict[str, float]]]:
    """The uniform ratio whose pruned MACs are closest to ``target_macs`` (bisection on the
    monotone MACs(ratio) until within ``tolerance``), its MACs and the trials."""
    lo, hi = 0.0, MAX_RATIO
    trials: list[dict[str, float]] = []
    best: tuple[float, int] | None = None
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        macs = count_macs(prune_uniform(teacher, mid, input_size), input_size)["macs"]
        trials.append({"ratio": mid, "macs": macs})
        if best is None or abs(macs - target_macs) < abs(best[1] - target_macs):
            best = (mid, macs)
        if abs(macs - target_macs) <= tolerance * target_macs:
            break
        lo, hi = (mid, hi) if macs > target_macs else (lo, mid)
    assert best is not None
    if abs(best[1] - target_macs) > tolerance * target_macs:
        raise M2MError(
            f"{NAME}: no uniform Torch-Pruning ratio in [0, {MAX_RATIO}] reaches "
            f"{target_macs:,} MACs within {tolerance:.0%} (closest: {best[1]:,} at ratio "
            f"{best[0]:.4f}); raise peer.mac_tolerance"
        )
    return best[0], best[1], trials


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    out = ctx.stage_dir(NAME)
    target = read_json(ctx.run_dir / "slice" / "metrics.json")
    size = int(target["input_size"])
    teacher = ctx.load_model("teacher")
    ratio, macs, trials = bisect_ratio(
        teacher, int(target["macs"]), size, float(cfg.peer.mac_tolerance)
    )
    grad_batches = None
    if cfg.peer.importance == "taylor":
        n = int(cfg.peer.taylor_batches)
        grad_batches = list(itertools.islice(ctx.train_batches().epoch(0), n))
    peer = prune_uniform(teacher, ratio, size, str(cfg.peer.importance), grad_batches)
    arch: dict[str, Any] = peer.m2mdc_arch  # type: ignore[assignment]  # the copy's own dict
    arch["resized_by"] = "torch_pruning"
    peer.to(ctx.device)
    test = ctx.test_batches()
    top1_pruned = evaluate(peer, test, cfg.perf)["top1"]
    recalibrate_bn(peer, ctx.train_batches(), int(cfg.prune.bn_recal_batches))
    top1_recal = evaluate(peer, test, cfg.perf)["top1"]
    budget = student_epochs(ctx)
    log.info(
        f"{NAME}: uniform ratio {ratio:.4f} ({cfg.peer.importance}) gives {macs:,} MACs "
        f"(inner_slice: {int(target['macs']):,}); top1 {top1_pruned:.2f}% -> {top1_recal:.2f}% "
        f"after BN recalibration; training {budget['total']} epochs"
    )
    terms = terms_from_config(cfg.peer)
    result = kd_repair(
        peer,
        teacher,
        ctx.train_batches(),
        test,
        terms=terms,
        epochs=budget["total"],
        lr=float(cfg.kd.lr),
        grad_clip=float(cfg.kd.grad_clip),
        temperature=float(cfg.peer.temperature),
        state_path=out / "state.pt",
        fingerprint=ctx.fingerprint(NAME),
        desc=NAME,
        feature_match="projection",  # only used if peer.terms reads features: no kept map
        perf=cfg.perf,
        val=ctx.val_batches(),
        select=str(cfg.select),
    )
    selected = result.selected_row()
    final = selected["test_top1"] if selected else top1_recal
    peer.cpu()
    metrics = {
        "top1": final,
        "top1_pruned": top1_pruned,
        "top1_recal": top1_recal,
        "ratio": ratio,
        "importance": str(cfg.peer.importance),
        "target_macs": int(target["macs"]),
        "macs": macs,
        "macs_error_pct": 100.0 * (macs / int(target["macs"]) - 1.0),
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
    save_checkpoint(out / "model.pt", peer, {"stage": NAME, "top1": final, "ratio": ratio})
    atomic_write_json(out / "metrics.json", metrics)
    (out / "state.pt").unlink(missing_ok=True)
    log.info(f"{NAME}: test top1 {final:.2f}% after {budget['total']} epochs")
    return metrics


register_stage(
    Stage(
        name=NAME,
        command="compare",
        requires=("teacher", "slice"),
        keys=("peer", "kd.lr", "kd.grad_clip", "prune.bn_recal_batches", "select"),
        run=run,
        enabled=lambda cfg: "torch_pruning" in comparisons(cfg),
    )
)
