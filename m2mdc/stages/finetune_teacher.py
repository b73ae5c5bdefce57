"""finetune-teacher: paper section 4.1.

ImageNet-pretrained torchvision model (or from scratch, or a local state_dict), classifier
replaced for the dataset's classes, the last third of the backbone unfrozen (ResNet: layer3,
layer4, fc; CIFAR ResNets: layer3, fc; MobileNetV2: features[13:] and the classifier, i.e. the
last 6 of its 19 feature modules), Adam at ``teacher.lr``, gradient clipping at
``teacher.grad_clip``.

``teacher.checkpoint``: an m2mdc checkpoint, or a plain state_dict whose head has the dataset's
classes, is the finished teacher (0 epochs). A state_dict with another head (e.g. ImageNet's
1000 classes) gets a new head, trained for ``teacher.epochs``. A new head (or random weights)
with ``teacher.epochs=0`` is refused: the teacher would be an untrained classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from m2mdc.arch import model_id
from m2mdc.arch.zoo import apply_unfreeze, create_model_and_head
from m2mdc.artifacts import load_checkpoint, safe_torch_load, save_trained
from m2mdc.errors import M2MError
from m2mdc.stage import Context, Stage, register_stage
from m2mdc.train import dist
from m2mdc.train.loop import TrainSpec, evaluate, fit, reported_top1
from m2mdc.ui import log, plural


@dataclass(frozen=True)
class Initial:
    """The teacher before fine-tuning."""

    model: nn.Module
    source: str  # where its weights came from (logged and recorded)
    setting: str  # the setting that chose them, as a user writes it
    finished: bool = False  # a teacher.checkpoint with a fitting head: used as it is
    new_head: int | None = None  # the weights' head class count when an untrained one replaced it
    fresh: bool = False  # random initial weights


def initial_teacher(ctx: Context) -> Initial:
    """The teacher before fine-tuning, and where it came from."""
    cfg = ctx.cfg
    if cfg.teacher.checkpoint:
        path = str(cfg.teacher.checkpoint)
        setting = f"teacher.checkpoint={path}"
        obj = safe_torch_load(path)
        if isinstance(obj, dict) and "arch" in obj:
            model, _ = load_checkpoint(
                path, expect_model=model_id(cfg.model), expect_classes=ctx.num_classes
            )
            return Initial(model, setting, setting, finished=True)
        # a plain torchvision state_dict: used as it is if its head fits the dataset
        model, head = create_model_and_head(model_id(cfg.model), ctx.num_classes, weights_path=path)
        return Initial(model, setting, setting, finished=head is None, new_head=head)
    model, head = create_model_and_head(
        model_id(cfg.model),
        ctx.num_classes,
        pretrained=cfg.model.pretrained,
        weights_path=cfg.model.weights,
    )
    if cfg.model.weights:  # takes precedence over model.pretrained
        source = setting = f"model.weights={cfg.model.weights}"
    elif cfg.model.pretrained:
        source, setting = "ImageNet weights", "model.pretrained=true"
    else:
        source, setting = "random init", "model.pretrained=false"
    return Initial(model, source, setting, new_head=head, fresh=source == "random init")


def check_trained(start: Initial, epochs: int, num_classes: int) -> None:
    """Refuse a teacher that would be an untrained classifier: a replaced head (or random
    weights) and ``teacher.epochs=0``."""
    if epochs > 0 or start.finished:
        return
    if start.new_head is not None:
        raise M2MError(
            f"{start.setting}: the head in these weights has {start.new_head} classes but the "
            f"dataset has {num_classes}, so it is replaced by an untrained {num_classes}-class "
            "head, and teacher.epochs=0 would distil from it; set teacher.epochs > 0 (e.g. "
            f"teacher.epochs=5) to train the new head, or give weights with a {num_classes}-class "
            "head"
        )
    if start.fresh:
        raise M2MError(
            "teacher.epochs=0 with random initial weights (model.pretrained=false, no "
            "model.weights or teacher.checkpoint) would distil from an untrained teacher; set "
            "teacher.epochs > 0, or start from model.pretrained=true, model.weights=PATH or "
            "teacher.checkpoint=PATH"
        )


def _announce(ctx: Context, start: Any, epochs: int) -> int:
    """Unfreeze per ``teacher.unfreeze`` and say what trains (warning on a random init trained
    only in its last third); the number of trainable parameters."""
    cfg = ctx.cfg
    if (
        cfg.teacher.unfreeze == "last_third"
        and not cfg.model.pretrained
        and not cfg.model.weights
        and not cfg.teacher.checkpoint
        and epochs
    ):
        log.warning(
            "teacher: training from random init with teacher.unfreeze=last_third leaves "
            "two thirds of the network random; teacher.unfreeze=all is usual from scratch"
        )
    trainable = apply_unfreeze(start.model, cfg.teacher.unfreeze)
    head = (
        f"; its {start.new_head}-class head was replaced by a new {ctx.num_classes}-class one, "
        f"trained for {plural(epochs, 'epoch')}"
        if start.new_head is not None
        else f", {plural(epochs, 'epoch')}"
    )
    log.info(
        f"teacher: {model_id(cfg.model)} from {start.source}, {trainable:,} trainable "
        f"parameters{head}"
    )
    return trainable


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    start = initial_teacher(ctx)
    epochs = 0 if start.finished else int(cfg.teacher.epochs)
    check_trained(start, epochs, ctx.num_classes)  # before anything is written
    model, source = start.model, start.source
    out = ctx.stage_dir("teacher")
    model.to(ctx.device)
    test = ctx.eval_batches()
    trainable = _announce(ctx, start, epochs)

    spec = TrainSpec.of(
        cfg,
        "teacher",
        epochs=epochs,
        state_path=out / "state.pt",
        fingerprint=ctx.fingerprint("teacher"),
        desc="teacher",
    )
    result = fit(
        model,
        model.parameters(),
        ctx.train_batches(),
        test,
        spec,
        loss_fn=spec.cross_entropy(),
        val=ctx.val_batches(),
    )
    for p in model.parameters():
        p.requires_grad_(True)
    selected = result.selected_row()
    final = reported_top1(selected) if selected else evaluate(model, test, cfg.perf)["top1"]
    metrics = {
        "top1": final,
        "top1_split": ctx.eval_split,
        **result.selection(),
        "epochs": result.history,
        "source": source,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": trainable,
        "unfreeze": cfg.teacher.unfreeze,
        "train_seconds": round(result.seconds, 3),
        "resumed_from_epoch": result.resumed_from,
    }
    if dist.is_main():
        meta = {"stage": "teacher", "top1": final, "seed": int(cfg.seed), "source": source}
        save_trained(out, model.cpu(), metrics, meta)
    log.info(f"teacher: {ctx.eval_split} top1 {final:.2f}%")
    return metrics


register_stage(
    Stage(
        name="teacher",
        command="finetune-teacher",
        requires=(),
        keys=("model", "dataset", "teacher", "seed", "select"),
        cacheable=True,
        run=run,
        trains=True,
    )
)
