"""finetune-teacher: paper section 4.1.

ImageNet-pretrained torchvision model (or from scratch, or a local state_dict), classifier
replaced for the dataset's classes, the last third of the backbone unfrozen (ResNet: layer3,
layer4, fc; MobileNetV2: features[13:] and the classifier, i.e. the last 6 of its 19 feature
modules), Adam at ``teacher.lr``, gradient clipping at ``teacher.grad_clip``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from m2mdc.arch.zoo import apply_unfreeze, create_model
from m2mdc.artifacts import load_checkpoint, safe_torch_load, save_trained
from m2mdc.pipeline import Context, Stage, register_stage
from m2mdc.train.loop import ce_loss, evaluate, fit
from m2mdc.ui import log


def initial_teacher(ctx: Context) -> tuple[nn.Module, str]:
    """The teacher before fine-tuning, and where it came from."""
    cfg = ctx.cfg
    if cfg.teacher.checkpoint:
        path = cfg.teacher.checkpoint
        obj = safe_torch_load(path)
        if isinstance(obj, dict) and "arch" in obj:
            model, _ = load_checkpoint(
                path, expect_model=cfg.model.name, expect_classes=ctx.num_classes
            )
        else:  # a plain torchvision state_dict
            model = create_model(cfg.model.name, ctx.num_classes, weights_path=path)
        return model, f"teacher.checkpoint={path}"
    model = create_model(
        cfg.model.name,
        ctx.num_classes,
        pretrained=cfg.model.pretrained,
        weights_path=cfg.model.weights,
    )
    source = (
        "ImageNet weights"
        if cfg.model.pretrained
        else f"model.weights={cfg.model.weights}"
        if cfg.model.weights
        else "random init"
    )
    return model, source


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    out = ctx.stage_dir("teacher")
    model, source = initial_teacher(ctx)
    model.to(ctx.device)
    test = ctx.test_batches()
    epochs = 0 if cfg.teacher.checkpoint else int(cfg.teacher.epochs)
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
    trainable = apply_unfreeze(model, cfg.teacher.unfreeze)
    log.info(
        f"teacher: {cfg.model.name} from {source}, {trainable:,} trainable parameters, "
        f"{epochs} epochs"
    )

    result = fit(
        model,
        model.parameters(),
        ctx.train_batches(),
        test,
        epochs=epochs,
        lr=cfg.teacher.lr,
        grad_clip=cfg.teacher.grad_clip,
        loss_fn=ce_loss,
        state_path=out / "state.pt",
        fingerprint=ctx.fingerprint("teacher"),
        desc="teacher",
        perf=cfg.perf,
        val=ctx.val_batches(),
        select=str(cfg.select),
        lr_schedule=str(cfg.teacher.lr_schedule),
        lr_key="teacher.lr",
    )
    for p in model.parameters():
        p.requires_grad_(True)
    selected = result.selected_row()
    final = selected["test_top1"] if selected else evaluate(model, test, cfg.perf)["top1"]
    metrics = {
        "top1": final,
        **result.selection(),
        "epochs": result.history,
        "source": source,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": trainable,
        "unfreeze": cfg.teacher.unfreeze,
        "train_seconds": round(result.seconds, 3),
        "resumed_from_epoch": result.resumed_from,
    }
    save_trained(
        out,
        model.cpu(),
        metrics,
        {"stage": "teacher", "top1": final, "seed": int(cfg.seed), "source": source},
    )
    log.info(f"teacher: test top1 {final:.2f}%")
    return metrics


register_stage(
    Stage(
        name="teacher",
        command="finetune-teacher",
        requires=(),
        keys=("model", "dataset", "teacher", "seed", "select"),
        cacheable=True,
        run=run,
    )
)
