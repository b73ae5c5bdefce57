"""Training and evaluation loops shared by every training stage (teacher, distill, slice).

:func:`fit` runs epochs of a caller-supplied loss, evaluates after each, and saves a resumable
state after every epoch, so rerunning a stage after a crash continues from the last completed
epoch with the same result as an uninterrupted run (the batch order of an epoch depends only on
the seed and the epoch number, see :class:`m2mdc.data.loader.Batches`).
"""

from __future__ import annotations

import math
import os
import random
import signal
import threading
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
from m2mdc.config import LR_SCHEDULES
from m2mdc.data.loader import Batches
from m2mdc.errors import M2MError
from m2mdc.train import perf as perf_mod
from m2mdc.ui import log, progress

LossFn = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, int],
    tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]],
]
"""(model, x, y, epoch) -> (loss, logits, named loss terms to log); epochs count from 1."""

LOG_EVERY = 20  # steps between host synchronisations for the progress display

DIVERGE_FACTOR = 1e3
"""A batch loss over this multiple of the reference (:class:`DivergenceGuard`) is divergence."""
REFERENCE_BATCHES = 20
"""The reference is the mean loss of this many first batches of a training."""


def lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier after ``t`` optimizer steps of ``total_steps``.

    ``constant``: 1. ``cosine``: ``(1 + cos(pi t / T)) / 2``, from 1 at the first step down to
    nearly 0 at the last, per step (SGDR without restarts, Loshchilov & Hutter 2017).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    if schedule == "constant":
        return lambda t: 1.0
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))


def ce_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Plain cross-entropy training (a :data:`LossFn`): the teacher's fine-tune objective."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    return loss, logits, {"ce": loss}


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
def evaluate(model: nn.Module, batches: Batches, perf: Any = None) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross-entropy over all batches.

    ``perf``: the ``perf`` config section (see :mod:`m2mdc.train.perf`); None = plain float32.
    """
    p = perf_mod.resolve(perf, batches.device)
    model.eval()
    fwd = perf_mod.prepare(model, p, batches.device)
    correct = torch.zeros((), device=batches.device)
    loss = torch.zeros((), device=batches.device, dtype=torch.float64)
    for x, y in batches:
        with perf_mod.autocast(p, batches.device):
            logits = fwd(perf_mod.as_input(x, p))
        logits = logits.float()  # a no-op in float32
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
    selected: int = 0  # the epoch whose weights the model holds (0: no epoch ran)

    def selected_row(self) -> dict[str, Any] | None:
        """The history row of the selected epoch (None when no epoch ran)."""
        return self.history[self.selected - 1] if self.selected else None

    def selection(self) -> dict[str, Any]:
        """What a stage records: the selected and the last epoch with their accuracies."""
        row, last = self.selected_row(), self.history[-1] if self.history else None
        return {
            "selected_epoch": self.selected,
            "selected_test_top1": row["test_top1"] if row else None,
            "selected_val_top1": row.get("val_top1") if row else None,
            "last_epoch": len(self.history),
            "last_test_top1": last["test_top1"] if last else None,
            "last_val_top1": last.get("val_top1") if last else None,
        }


class Interrupted(M2MError):
    """SIGINT/SIGTERM during training: the state was saved; rerunning resumes."""

    exit_code = 130


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the training loop checks after every batch."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class DivergenceGuard:
    """Flags the first batch whose loss is non-finite or over ``DIVERGE_FACTOR`` times the
    reference: the mean loss of the first ``REFERENCE_BATCHES`` positive batch losses of the
    training (while it forms, the mean of those seen so far; the first batch is only checked for
    being finite). A ratio is scale-free: any loss function, any sum of weighted KD terms. A
    healthy training's losses fall from where they start, so its batches stay far below 1000x
    the start (in every training of the quickstart run, teacher, distill and slice repair, no
    batch loss exceeds the first), while a learning rate that throws the weights out of range
    multiplies the loss by 1e5 to 1e9 within a step or two (``teacher.lr=1e3``: 2.4, then
    4e8). Zero losses (every term's ramped weight still 0) do not count, so the
    reference is taken once the objective is on. Everything stays on the device: the host reads
    the flag only at the loop's synchronisation points.
    """

    def __init__(self, device: torch.device, state: dict[str, Any] | None = None) -> None:
        state = state or {}
        zero = torch.zeros((), device=device, dtype=torch.float64)
        self.ref_sum = state.get("ref_sum", zero).to(device)
        self.ref_n = state.get("ref_n", zero).to(device)
        self.step = torch.full((), -1, device=device, dtype=torch.long)
        self.loss = zero.clone()
        self.ref = zero.clone()

    def state(self) -> dict[str, torch.Tensor]:
        """The reference so far, saved with the training state (a resumed run keeps it)."""
        return {"ref_sum": self.ref_sum, "ref_n": self.ref_n}

    def observe(self, step: int, loss: torch.Tensor) -> None:
        """Check one batch's (detached) loss, then count it into the reference if still open."""
        d = loss.double()
        finite = torch.isfinite(d)
        ref = self.ref_sum / self.ref_n.clamp(min=1)
        bad = ~finite | ((self.ref_n > 0) & (d > DIVERGE_FACTOR * ref))
        first = bad & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, d, self.loss)
        self.ref = torch.where(first, ref, self.ref)
        take = (self.ref_n < REFERENCE_BATCHES) & finite & (d > 0) & ~bad
        self.ref_sum = self.ref_sum + torch.where(take, d, 0.0)
        self.ref_n = self.ref_n + take.double()

    def check(self, desc: str, epoch: int, kept: str, advice: str) -> None:
        """Raise the one-line M2MError if a batch since the guard was made went bad.

        ``kept``: what resumable state is on disk; ``advice``: what to try.
        """
        step = int(self.step)  # the host synchronisation
        if step < 0:
            return
        loss, ref = float(self.loss), float(self.ref)
        what = (
            f"non-finite loss at epoch {epoch}, batch {step} ({loss})"
            if not math.isfinite(loss)
            else f"diverged at epoch {epoch}, batch {step}: loss {loss:.4g} is over "
            f"{DIVERGE_FACTOR:g}x the mean of the first batches ({ref:.4g})"
        )
        raise M2MError(f"{desc}: {what}; stopped, {kept}; {advice}")


def _rng_state() -> dict[str, Any]:
    """RNG states as plain tensors and tuples (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))


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
    extra_state: nn.Module | None = None,
    perf: Any = None,
    epoch_offset: int = 0,
    val: Batches | None = None,
    select: str = "last",
    lr_schedule: str = "constant",
    lr_key: str | None = None,
) -> FitResult:
    """Train ``model`` with Adam for ``epochs`` epochs, resuming from ``state_path`` if present.

    The state (model, optimizer, epoch, batch position, running sums, history, RNG states) is
    saved atomically after every epoch (after the last one without the optimizer, which has
    nothing left to do), and mid-epoch when SIGINT/SIGTERM arrives; since the batches of an
    epoch depend only on the seed and the epoch, a resumed run computes exactly what an
    uninterrupted one would have (on CPU, where kernels are deterministic).

    Args:
        params: the trainable parameters (frozen ones are simply left out).
        loss_fn: see :data:`LossFn`.
        state_path: resumable state; removed by the caller once the stage's outputs are saved.
        fingerprint: the stage's configuration hash; a state from another configuration is
            ignored rather than resumed.
        epoch_info: extra values to log per epoch (e.g. KD weights).
        extra_state: another trained module whose weights belong in the state (e.g. a
            feature projection).
        perf: the ``perf`` config section (:mod:`m2mdc.train.perf`): channels_last inputs and
            weights, autocast around ``loss_fn`` (with a gradient scaler for fp16), and a
            compiled ``model`` handed to ``loss_fn``. None = plain float32, as before.
        epoch_offset: epoch ``e`` draws the batch order and flips of data epoch
            ``e + epoch_offset`` (training that continues an earlier one sees new shuffles).
        val: validation batches, evaluated after every epoch (``val_top1``, ``val_loss``).
        select: ``last`` keeps the last epoch's weights; ``best_val`` returns the model with
            the weights of the epoch with the highest validation top1 (the earliest on ties).
            The test split is evaluated every epoch for reporting only, never for selection.
        lr_schedule: ``constant`` (``lr`` throughout) or ``cosine`` (decayed per step over
            this fit's ``epochs``, see :func:`lr_factor`; each epoch's row then records the
            ``lr`` its last step used). A cosine state is resumed only by a fit of the same
            length: its schedule depends on it.
        lr_key: the setting ``lr`` came from (e.g. ``teacher.lr``), named in the divergence
            error.

    Returns:
        Per-epoch history: train loss and top1, logged loss terms, test top1 and loss.

    Raises:
        M2MError: a non-finite or diverging loss (:class:`DivergenceGuard`), naming the epoch,
            the batch, the loss, its reference, the state kept on disk and what to try.
        Interrupted: after SIGINT/SIGTERM, once the state is saved.
    """
    if select not in ("last", "best_val"):
        raise ValueError(f"select={select!r}: choose last or best_val")
    if select == "best_val" and val is None:
        raise M2MError("select=best_val needs a validation split (dataset.val_fraction > 0)")
    params = [p for p in params if p.requires_grad]
    result = FitResult()
    # best_val: the best epoch so far and a CPU copy of its weights (saved with the state)
    best: dict[str, Any] | None = None
    device = train.device
    pf = perf_mod.resolve(perf, device)
    opt = perf_mod.adam(params, lr, pf)
    fwd = perf_mod.prepare(model, pf, device)  # what loss_fn calls; train/eval/state: model
    scaler = perf_mod.grad_scaler(pf, device)
    total_steps = epochs * len(train)
    factor = lr_factor(lr_schedule, total_steps)
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, factor)
        if lr_schedule != "constant" and total_steps > 0
        else None
    )
    schedule_id = {"name": lr_schedule, "total_steps": total_steps} if sched else None
    start, start_step = 1, 0
    partial: dict[str, Any] | None = None
    guard_state: dict[str, Any] | None = None
    kept = "no state of this training was saved yet"
    if state_path.is_file():
        state = safe_torch_load(state_path)
        usable = isinstance(state, dict) and state.get("fingerprint") == fingerprint
        if usable and state.get("optimizer") is None and int(state["epoch"]) < epochs:
            # a final state (no optimizer) of a shorter run: nothing to continue from exactly
            log.info(f"{desc}: {state_path} holds a finished shorter run; starting over")
            usable = False
        if (
            usable
            and state.get("optimizer") is not None
            and state.get("lr_schedule") != schedule_id
        ):
            # the learning rates it trained with belong to another schedule (or length)
            log.info(f"{desc}: {state_path} holds a run with another lr schedule; starting over")
            usable = False
        if usable:
            model.load_state_dict(state["model"])
            if extra_state is not None and state.get("extra") is not None:
                extra_state.load_state_dict(state["extra"])
            if state.get("optimizer") is not None:
                opt.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            if sched is not None and state.get("scheduler"):
                sched.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            best = state.get("best")
            result.history = list(state["history"])
            start, start_step = int(state["epoch"]), int(state.get("step", 0))
            partial = state.get("partial")
            guard_state = state.get("guard")
            if partial is None:
                start += 1  # the saved epoch was complete
            result.resumed_from = start - 1
            where = f"epoch {start}, batch {start_step}" if partial else f"epoch {start - 1}"
            log.info(f"{desc}: resuming after {where} from {state_path}")
            kept = f"the last good state (after {where}) is {state_path}"
    guard = DivergenceGuard(device, guard_state)
    advice = (
        f"try a lower {lr_key} (it is {lr:g}; e.g. {lr_key}={lr / 10:g}) or check the data"
        if lr_key
        else f"try a lower learning rate (it is {lr:g}) or check the data"
    )

    def save(epoch: int, step: int = 0, sums: dict[str, Any] | None = None) -> None:
        nonlocal kept
        # After the last epoch nothing is left to train: the optimizer state (twice the model
        # for Adam) is left out, which makes the final save about 3x smaller and faster.
        final = epoch == epochs and sums is None
        torch_save_atomic(
            {
                "fingerprint": fingerprint,
                "epoch": epoch,
                "step": step,
                "partial": sums,
                "model": model.state_dict(),
                "extra": extra_state.state_dict() if extra_state is not None else None,
                "optimizer": None if final else opt.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None and not final else None,
                "lr_schedule": schedule_id,
                "scheduler": sched.state_dict() if sched is not None and not final else None,
                "history": result.history,
                "best": best,
                "guard": guard.state(),
                "rng": _rng_state(),
            },
            state_path,
        )
        where = f"epoch {epoch}, batch {step}" if sums is not None else f"epoch {epoch}"
        kept = f"the last good state (after {where}) is {state_path}"

    t0 = time.perf_counter()
    with progress() as bar, StopFlag() as stop:
        ep_task = bar.add_task(desc, total=epochs, completed=start - 1, info="")
        for epoch in range(start, epochs + 1):
            model.train()
            if extra_state is not None:
                extra_state.train()
            first = start_step if epoch == start else 0
            batch_task = bar.add_task(
                f"  epoch {epoch}/{epochs}", total=len(train), completed=first, info=""
            )
            zero = torch.zeros((), device=device, dtype=torch.float64)
            partial_of = partial if (epoch == start and partial) else {}
            loss_sum = partial_of.get("loss_sum", zero).to(device)
            correct = partial_of.get("correct", zero).to(device)
            totals: dict[str, torch.Tensor] = {
                k: v.to(device) for k, v in partial_of.get("totals", {}).items()
            }
            seen = int(partial_of.get("seen", 0))
            batches = train.epoch(epoch + epoch_offset, start_batch=first)
            for step, (x, y) in enumerate(batches, start=first):
                with perf_mod.autocast(pf, device):
                    loss, logits, terms = loss_fn(fwd, perf_mod.as_input(x, pf), y, epoch)
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    if grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    opt.step()
                else:  # fp16: scaled backward, clip the unscaled gradients, skip on overflow
                    scaler.scale(loss).backward()
                    if grad_clip > 0:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    scaler.step(opt)
                    scaler.update()
                if sched is not None:
                    sched.step()
                bs = y.numel()
                seen += bs
                d = loss.detach()
                # device-side bookkeeping: no host synchronisation per step
                guard.observe(step, d)
                loss_sum = loss_sum + d.double() * bs
                correct = correct + (logits.detach().argmax(1) == y).sum()
                for k, v in terms.items():
                    totals[k] = totals.get(k, zero) + v.detach().double() * bs
                last = step + 1 == len(train)
                if (step + 1) % LOG_EVERY == 0 or last or stop.signum is not None:
                    guard.check(desc, epoch, kept, advice)
                    bar.update(
                        batch_task,
                        completed=step + 1,
                        info=f"loss {float(loss_sum) / seen:.4f} "
                        f"acc {100 * float(correct) / seen:.1f}%",
                    )
                if stop.signum is not None and not last:
                    save(
                        epoch,
                        step + 1,
                        {"loss_sum": loss_sum, "correct": correct, "totals": totals, "seen": seen},
                    )
                    raise Interrupted(
                        f"{desc}: stopped by signal {stop.signum} at epoch {epoch}, batch "
                        f"{step + 1}; state saved to {state_path}; rerun the same command "
                        "to resume"
                    )
            bar.remove_task(batch_task)
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": float(loss_sum) / seen,
                "train_top1": 100.0 * float(correct) / seen,
            }
            row.update({k: float(v) / seen for k, v in totals.items()})
            if sched is not None:  # the rate of the epoch's last step
                row["lr"] = lr * factor(epoch * len(train) - 1)
            if epoch_info is not None:
                row.update(epoch_info(epoch))
            if val is not None:
                ev = evaluate(model, val, pf)
                row["val_top1"], row["val_loss"] = ev["top1"], ev["loss"]
            ev = evaluate(model, test, pf)
            row["test_top1"], row["test_loss"] = ev["top1"], ev["loss"]
            result.history.append(row)
            if select == "best_val" and (best is None or row["val_top1"] > best["val_top1"]):
                best = {
                    "epoch": epoch,
                    "val_top1": row["val_top1"],
                    "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                    "extra": (
                        None
                        if extra_state is None
                        else {
                            k: v.detach().cpu().clone() for k, v in extra_state.state_dict().items()
                        }
                    ),
                }
            save(epoch)
            bar.update(ep_task, completed=epoch, info=f"test top1 {ev['top1']:.2f}%")
            log.info(
                f"{desc}: epoch {epoch}/{epochs} train loss {row['train_loss']:.4f} "
                f"train top1 {row['train_top1']:.2f}% test top1 {ev['top1']:.2f}%"
            )
            if stop.signum is not None and epoch < epochs:
                raise Interrupted(
                    f"{desc}: stopped by signal {stop.signum} after epoch {epoch}; state saved "
                    f"to {state_path}; rerun the same command to resume"
                )
    result.seconds = time.perf_counter() - t0
    result.selected = len(result.history)
    if best is not None and best["epoch"] != result.selected:
        model.load_state_dict(best["model"])
        if extra_state is not None and best["extra"] is not None:
            extra_state.load_state_dict(best["extra"])
        result.selected = int(best["epoch"])
        log.info(
            f"{desc}: kept epoch {result.selected} (best validation top1 "
            f"{best['val_top1']:.2f}%) of {len(result.history)}"
        )
    return result
