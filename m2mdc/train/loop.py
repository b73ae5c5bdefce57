"""Training and evaluation loops shared by every training stage (teacher, distill, slice).

:func:`fit` runs epochs of a caller-supplied loss, evaluates after each, and saves a resumable
state after every epoch, so rerunning a stage after a crash continues from the last completed
epoch with the same result as an uninterrupted run (the batch order of an epoch depends only on
the seed and the epoch number, see :class:`m2mdc.data.loader.Batches`).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from m2mdc.artifacts import safe_torch_load, torch_save_atomic
from m2mdc.data.loader import Batches
from m2mdc.errors import M2MError
from m2mdc.ui import log, progress

LossFn = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, int],
    tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]],
]
"""(model, x, y, epoch) -> (loss, logits, named loss terms to log); epochs count from 1."""

LOG_EVERY = 20  # steps between host synchronisations for the progress display


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise M2MError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels where it has them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Batches) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy over all batches."""
    model.eval()
    correct = torch.zeros((), device=batches.device)
    loss = torch.zeros((), device=batches.device, dtype=torch.float64)
    for x, y in batches:
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    n = batches.num_examples
    return {"top1": 100.0 * float(correct) / n, "loss": float(loss) / n}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Batches, num_batches: int, epoch: int = 0) -> int:
    """Re-estimate BatchNorm running statistics with forward-only training-mode passes.

    Statistics are reset and accumulated as a cumulative average (momentum=None) over
    ``num_batches`` batches, so the result does not depend on the default momentum.

    Returns:
        The number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or num_batches <= 0:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    used = 0
    try:
        for x, _ in batches.epoch(epoch):
            if used >= num_batches:
                break
            model(x)
            used += 1
    finally:
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
        model.eval()
    return used


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0


def fit(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    train: Batches,
    test: Batches,
    *,
    epochs: int,
    lr: float,
    grad_clip: float,
    loss_fn: LossFn,
    state_path: Path,
    fingerprint: str,
    desc: str,
    epoch_info: Callable[[int], dict[str, Any]] | None = None,
) -> FitResult:
    """Train ``model`` with Adam for ``epochs`` epochs, resuming from ``state_path`` if present.

    Args:
        params: the trainable parameters (frozen ones are simply left out).
        loss_fn: see :data:`LossFn`.
        state_path: resumable state written after every epoch and removed by the caller once
            the stage's outputs are saved.
        fingerprint: the stage's configuration hash; a state from another configuration is
            ignored rather than resumed.
        epoch_info: extra values to log per epoch (e.g. KD weights).

    Returns:
        Per-epoch history: train loss and top1, logged loss terms, test top1 and loss.
    """
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    result = FitResult()
    start = 1
    if state_path.is_file():
        state = safe_torch_load(state_path)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            result.history = list(state["history"])
            start = int(state["epoch"]) + 1
            result.resumed_from = start - 1
            log.info(f"{desc}: resuming after epoch {start - 1} from {state_path}")
    t0 = time.perf_counter()
    device = train.device
    with progress() as bar:
        ep_task = bar.add_task(desc, total=epochs, completed=start - 1, info="")
        for epoch in range(start, epochs + 1):
            model.train()
            batch_task = bar.add_task(f"  epoch {epoch}/{epochs}", total=len(train), info="")
            totals: dict[str, torch.Tensor] = {}
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device)
            bad_step = torch.full((), -1, device=device, dtype=torch.long)
            seen = 0
            for step, (x, y) in enumerate(train.epoch(epoch)):
                loss, logits, terms = loss_fn(model, x, y, epoch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                bs = y.numel()
                seen += bs
                d = loss.detach()
                # device-side bookkeeping: no host synchronisation per step
                bad_step = torch.where((~torch.isfinite(d)) & (bad_step < 0), step, bad_step)
                loss_sum += d.double() * bs
                correct += (logits.detach().argmax(1) == y).sum()
                for k, v in terms.items():
                    totals[k] = (
                        totals.get(k, torch.zeros((), device=device, dtype=torch.float64))
                        + v.detach().double() * bs
                    )
                if (step + 1) % LOG_EVERY == 0 or step + 1 == len(train):
                    if int(bad_step) >= 0:
                        raise M2MError(
                            f"{desc}: non-finite loss at epoch {epoch}, batch {int(bad_step)}; "
                            f"stopped, the last good state is in {state_path.parent} "
                            "(lower the learning rate or check the data)"
                        )
                    bar.update(
                        batch_task,
                        completed=step + 1,
                        info=f"loss {float(loss_sum) / seen:.4f} "
                        f"acc {100 * float(correct) / seen:.1f}%",
                    )
            bar.remove_task(batch_task)
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": float(loss_sum) / seen,
                "train_top1": 100.0 * float(correct) / seen,
            }
            row.update({k: float(v) / seen for k, v in totals.items()})
            if epoch_info is not None:
                row.update(epoch_info(epoch))
            ev = evaluate(model, test)
            row["test_top1"], row["test_loss"] = ev["top1"], ev["loss"]
            result.history.append(row)
            torch_save_atomic(
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "history": result.history,
                    "rng": {"torch": torch.get_rng_state()},
                },
                state_path,
            )
            bar.update(ep_task, completed=epoch, info=f"test top1 {ev['top1']:.2f}%")
            log.info(
                f"{desc}: epoch {epoch}/{epochs} train loss {row['train_loss']:.4f} "
                f"train top1 {row['train_top1']:.2f}% test top1 {ev['top1']:.2f}%"
            )
    result.seconds = time.perf_counter() - t0
    return result
