"""Training and evaluation loops shared by every training stage (teacher, distill, slice).

:func:`fit` runs epochs of a caller-supplied loss, evaluates after each, and saves a resumable
state after every epoch, so rerunning a stage after a crash continues from the last completed
epoch with the same result as an uninterrupted run (the batch order of an epoch depends only on
the seed and the epoch number, see :class:`m2mdc.data.loader.Batches`).
"""

from __future__ import annotations

import functools
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from m2mdc import tracking
from m2mdc.artifacts import safe_torch_load, torch_save_atomic
from m2mdc.config import LR_SCHEDULES
from m2mdc.data.loader import Batches
from m2mdc.errors import Interrupted, M2MError, signal_description
from m2mdc.train import dist
from m2mdc.train import perf as perf_mod
from m2mdc.train.optim import Optim
from m2mdc.train.optim import make as make_optimizer
from m2mdc.ui import log, progress

LossFn = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, int],
    tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]],
]
"""(model, x, y, epoch) -> (loss, logits, named loss terms to log); epochs count from 1."""

LOG_EVERY = 20  # steps between host synchronisations (progress display, tracker step metrics)

DIVERGE_FACTOR = 1e3
"""A batch loss over this multiple of the reference (:class:`DivergenceGuard`) is divergence."""
REFERENCE_BATCHES = 20
"""The reference is the mean loss of this many first batches of a training."""


def lr_factor(schedule: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The learning-rate multiplier after ``t`` optimizer steps of ``total_steps``.

    ``constant``: 1. ``cosine``: ``(1 + cos(pi t / T)) / 2``, from 1 at the first step down to
    nearly 0 at the last, per step (SGDR without restarts, Loshchilov & Hutter 2017).
    ``warmup_steps`` W > 0: a linear warmup first, ``(t + 1) / W`` for ``t < W`` (the W-th step
    at the full rate), then the schedule over the remaining ``T - W`` steps from ``t - W``
    (Goyal et al. 2017).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    after = _schedule(schedule, max(total_steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return after
    return lambda t: (t + 1) / warmup_steps if t < warmup_steps else after(t - warmup_steps)


def _schedule(schedule: str, total_steps: int) -> Callable[[int], float]:
    if schedule == "constant":
        return lambda t: 1.0
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps))


def ce_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Plain cross-entropy training (a :data:`LossFn`): the teacher's fine-tune objective;
    :meth:`TrainSpec.cross_entropy` binds the section's ``label_smoothing``."""
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
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
    Under data-parallel training (:mod:`m2mdc.train.dist`) each rank evaluates its share of
    every batch and the sums are all-reduced: every rank returns the same numbers.
    """
    p = perf_mod.resolve(perf, batches.device)
    model.eval()
    fwd = perf_mod.prepare(model, p, batches.device)
    if dist.active():
        batches = batches.shard(dist.rank(), dist.world())
    correct = torch.zeros((), device=batches.device, dtype=torch.float64)
    loss = torch.zeros((), device=batches.device, dtype=torch.float64)
    for x, y in batches:
        if not y.numel():  # a rank's empty share of a last batch smaller than the world
            continue
        with perf_mod.autocast(p, batches.device):
            logits = fwd(perf_mod.as_input(x, p))
        logits = logits.float()  # a no-op in float32
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    total = dist.all_sum(torch.stack([correct, loss]))
    n = batches.num_examples
    return {"top1": 100.0 * float(total[0]) / n, "loss": float(total[1]) / n}


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, batches: Batches, num_batches: int, epoch: int = 0, perf: Any = None
) -> int:
    """Re-estimate BatchNorm running statistics with forward-only training-mode passes.

    Statistics are reset and accumulated as a cumulative average (momentum=None) over
    ``num_batches`` batches, so the result does not depend on the default momentum.

    Under data-parallel training every rank ends with the same statistics: with
    ``perf.sync_bn`` each rank passes its share of every batch and the batch statistics are
    synchronised (those of the global batch); without it, rank 0's statistics of the whole
    batches are broadcast.

    Returns:
        The number of batches used.
    """
    if not dist.active():
        return _recalibrate(model, batches, num_batches, epoch)
    if perf_mod.resolve(perf).sync_bn:
        with dist.sync_batchnorm(model, True):
            shard = batches.shard(dist.rank(), dist.world())
            return _recalibrate(model, shard, num_batches, epoch)
    with dist.solo():  # every rank the same passes; rank 0's statistics are the ones kept
        used = _recalibrate(model, batches, num_batches, epoch)
    for bn in _batchnorms(model):
        dist.broadcast_state(bn)
    return used


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _recalibrate(model: nn.Module, batches: Batches, num_batches: int, epoch: int) -> int:
    bns = _batchnorms(model)
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
            "selected_test_top1": row.get("test_top1") if row else None,
            "selected_val_top1": row.get("val_top1") if row else None,
            "last_epoch": len(self.history),
            "last_test_top1": last.get("test_top1") if last else None,
            "last_val_top1": last.get("val_top1") if last else None,
        }


def reported_top1(row: dict[str, Any]) -> float:
    """A history row's top1 on the reporting split: the test split's, or the validation
    split's when the dataset has no test split (the row then has no ``test_top1``)."""
    return float(row["test_top1"] if "test_top1" in row else row["val_top1"])


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


@dataclass(frozen=True)
class TrainSpec:
    """How one training runs, besides the model, its data and its loss: built once per
    training section (the teacher's, a KD repair's) by the stage that runs it, see :meth:`of`.

    Attributes:
        epochs: epochs to train.
        lr: the optimizer's learning rate.
        grad_clip: the gradient-norm clip (0: none).
        state_path: the resumable state; removed by the caller once the stage's outputs are
            saved.
        fingerprint: the stage's configuration hash; a state from another configuration is
            ignored rather than resumed.
        desc: the training's name in progress bars, logs and errors (``teacher``, ...).
        lr_schedule: ``constant`` (``lr`` throughout) or ``cosine`` (decayed per step over
            ``epochs``, see :func:`lr_factor`; each epoch's row then records the ``lr`` its
            last step used). A cosine state is resumed only by a training of the same length:
            its schedule depends on it.
        select: ``last`` keeps the last epoch's weights; ``best_val`` returns the model with
            the weights of the epoch with the highest validation top1 (the earliest on ties).
            The reporting split (``test``, named by its :class:`Batches`) is evaluated every
            epoch for reporting only, never for selection; when it is the validation split
            itself (a dataset without a test split) it is measured once, as ``val_top1``.
        perf: the ``perf`` config section (:mod:`m2mdc.train.perf`): channels_last inputs and
            weights, autocast around the loss (with a gradient scaler for fp16), and a compiled
            model handed to the loss. None = plain float32.
        epoch_offset: epoch ``e`` draws the batch order and flips of data epoch
            ``e + epoch_offset`` (training that continues an earlier one sees new shuffles).
        lr_key: the setting ``lr`` came from (e.g. ``teacher.lr``), named in the divergence
            error.
        optim: the optimizer (:class:`m2mdc.train.optim.Optim`; Adam by default).
        label_smoothing: of the cross-entropy term (:meth:`cross_entropy`, the KD ``ce`` term).
        warmup_epochs: epochs of linear warmup per step before ``lr_schedule`` (see
            :func:`lr_factor`).
    """

    epochs: int
    lr: float
    grad_clip: float
    state_path: Path
    fingerprint: str
    desc: str
    lr_schedule: str = "constant"
    select: str = "last"
    perf: Any = None
    epoch_offset: int = 0
    lr_key: str | None = None
    optim: Optim = field(default_factory=Optim)
    label_smoothing: float = 0.0
    warmup_epochs: int = 0

    # what :meth:`of` reads from a training section
    SECTION_KEYS: ClassVar[tuple[str, ...]] = (
        "lr",
        "grad_clip",
        "lr_schedule",
        "optim",
        "momentum",
        "nesterov",
        "weight_decay",
        "label_smoothing",
        "warmup_epochs",
    )

    @classmethod
    def of(cls, cfg: Any, section: str, **fields: Any) -> TrainSpec:
        """The spec of config section ``section`` (``teacher``, ``kd``): its
        :attr:`SECTION_KEYS`, the run's ``select`` and ``perf``; ``fields`` gives the rest
        (``epochs``, ``state_path``, ``fingerprint``, ``desc``, ...)."""
        sec = cfg[section]
        return cls(
            lr=float(sec.lr),
            grad_clip=float(sec.grad_clip),
            lr_schedule=str(sec.lr_schedule),
            optim=Optim.of(sec),
            label_smoothing=float(sec.label_smoothing),
            warmup_epochs=int(sec.warmup_epochs),
            select=str(cfg.select),
            perf=cfg.perf,
            lr_key=f"{section}.lr",
            **fields,
        )

    def cross_entropy(self) -> LossFn:
        """:func:`ce_loss` with this training's ``label_smoothing``."""
        return functools.partial(ce_loss, label_smoothing=self.label_smoothing)

    @staticmethod
    def given(spec: TrainSpec | None, fields: dict[str, Any]) -> TrainSpec:
        """``spec``, or one made of ``fields`` (the keyword form of :func:`fit`)."""
        if spec is None:
            return TrainSpec(**fields)
        if fields:
            raise TypeError(f"give a TrainSpec or its fields, not both: {', '.join(fields)}")
        return spec


def fit(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    train: Batches,
    test: Batches,
    spec: TrainSpec | None = None,
    *,
    loss_fn: LossFn,
    val: Batches | None = None,
    epoch_info: Callable[[int], dict[str, Any]] | None = None,
    extra_state: nn.Module | None = None,
    **fields: Any,
) -> FitResult:
    """Train ``model`` as ``spec`` says (Adam unless ``spec.optim`` says otherwise), resuming
    from its state file if present.

    The state (model, optimizer, epoch, batch position, running sums, history, RNG states) is
    saved atomically after every epoch (after the last one without the optimizer, which has
    nothing left to do), and mid-epoch when SIGINT/SIGTERM arrives; since the batches of an
    epoch depend only on the seed and the epoch, a resumed run computes exactly what an
    uninterrupted one would have (on CPU, where kernels are deterministic).

    Args:
        params: the trainable parameters (frozen ones are simply left out).
        spec: see :class:`TrainSpec`; or, instead, its fields as keywords (``fields``).
        loss_fn: see :data:`LossFn`.
        val: validation batches, evaluated after every epoch (``val_top1``, ``val_loss``).
        epoch_info: extra values to log per epoch (e.g. KD weights).
        extra_state: another trained module whose weights belong in the state (e.g. a
            feature projection).

    Returns:
        Per-epoch history: train loss and top1, logged loss terms, test top1 and loss.

    Raises:
        M2MError: a non-finite or diverging loss (:class:`DivergenceGuard`), naming the epoch,
            the batch, the loss, its reference, the state kept on disk and what to try.
        Interrupted: after SIGINT/SIGTERM, once the state is saved.
    """
    spec = TrainSpec.given(spec, fields)
    if spec.select not in ("last", "best_val"):
        raise ValueError(f"select={spec.select!r}: choose last or best_val")
    if spec.select == "best_val" and val is None:
        raise M2MError("select=best_val needs a validation split (dataset.val_fraction > 0)")
    with dist.sync_batchnorm(model, perf_mod.resolve(spec.perf).sync_bn):
        result = _fit(model, params, train, test, spec, loss_fn, val, epoch_info, extra_state)
    dist.barrier()  # rank 0's last save is on disk before any rank reads what follows
    return result


def _fit(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    train: Batches,
    test: Batches,
    spec: TrainSpec,
    loss_fn: LossFn,
    val: Batches | None,
    epoch_info: Callable[[int], dict[str, Any]] | None,
    extra_state: nn.Module | None,
) -> FitResult:
    run = _Run(model, params, train, spec, loss_fn, epoch_info, extra_state)
    t0 = time.perf_counter()
    with progress() as bar, StopFlag() as stop:
        ep_task = bar.add_task(
            spec.desc, total=spec.epochs, completed=run.start - 1, info="", unit="epoch"
        )
        for epoch in range(run.start, spec.epochs + 1):
            sums = run.train_epoch(epoch, bar, stop)
            row = run.end_epoch(epoch, sums, test, val)
            top1 = f"{test.split} top1 {reported_top1(row):.2f}%"
            bar.update(ep_task, completed=epoch, info=top1)
            log.info(
                f"{spec.desc}: epoch {epoch}/{spec.epochs} train loss {row['train_loss']:.4f} "
                f"train top1 {row['train_top1']:.2f}% {top1}"
            )
            if dist.agree(stop.signum is not None, run.device) and epoch < spec.epochs:
                raise Interrupted(
                    f"{spec.desc}: {_signal(stop)} after epoch {epoch}; state "
                    f"saved to {spec.state_path}; rerun the same command to resume"
                )
    run.result.seconds = time.perf_counter() - t0
    run.keep_selected()
    return run.result


def _signal(stop: StopFlag) -> str:
    """The signal that stopped training (a rank stopped by another rank's: SIGTERM)."""
    return signal_description(stop.signum if stop.signum is not None else signal.SIGTERM)


class _Sums:
    """An epoch's running sums on the device (no host synchronisation per step); a mid-epoch
    state saves them as ``partial``. Under data-parallel training each rank sums its shares
    and :meth:`all_reduced` gives the global sums."""

    def __init__(self, device: torch.device, partial: dict[str, Any] | None) -> None:
        partial = partial or {}
        self.zero = torch.zeros((), device=device, dtype=torch.float64)
        self.loss_sum = partial.get("loss_sum", self.zero).to(device)
        self.correct = partial.get("correct", self.zero).to(device)
        self.totals: dict[str, torch.Tensor] = {
            k: v.to(device) for k, v in partial.get("totals", {}).items()
        }
        self.seen = int(partial.get("seen", 0))

    def add(
        self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, terms: dict[str, Any]
    ) -> None:
        bs = y.numel()
        self.seen += bs
        self.loss_sum = self.loss_sum + loss.double() * bs
        self.correct = self.correct + (logits.detach().argmax(1) == y).sum()
        for k, v in terms.items():
            self.totals[k] = self.totals.get(k, self.zero) + v.detach().double() * bs

    def all_reduced(self) -> _Sums:
        """The sums over every rank (``self`` in one process)."""
        if not dist.active():
            return self
        keys = list(self.totals)
        seen = torch.tensor(float(self.seen), device=self.zero.device, dtype=torch.float64)
        flat = torch.stack([self.loss_sum, self.correct.double(), seen, *self.totals.values()])
        flat = dist.all_sum(flat)
        out = _Sums(self.zero.device, None)
        out.loss_sum, out.correct, out.seen = flat[0], flat[1], round(float(flat[2]))
        out.totals = dict(zip(keys, flat[3:], strict=True))
        return out

    def state(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum,
            "correct": self.correct,
            "totals": self.totals,
            "seen": self.seen,
        }

    def progress(self) -> str:
        return (
            f"loss {float(self.loss_sum) / self.seen:.4f} "
            f"acc {100 * float(self.correct) / self.seen:.1f}%"
        )

    def row(self) -> dict[str, float]:
        """The epoch's train loss and top1 and every logged term's mean."""
        row = {
            "train_loss": float(self.loss_sum) / self.seen,
            "train_top1": 100.0 * float(self.correct) / self.seen,
        }
        row.update({k: float(v) / self.seen for k, v in self.totals.items()})
        return row


class _StepLog:
    """A training's step metrics for the tracker (:mod:`m2mdc.tracking`), within one epoch: at
    a synchronisation point ``every_n_steps`` or more steps after the last logged one (or the
    epoch's first), the mean loss and loss terms over those steps (read from the epoch's
    running sums: no synchronisation of its own), the learning rate of the last of them and
    the images per second. The rest of an epoch is in its history row."""

    def __init__(self, run: _Run, epoch: int, first: int, sums: _Sums) -> None:
        self.run, self.epoch = run, epoch
        self.every = run.tracker.every_n_steps
        self._mark(first, sums)

    def _mark(self, step: int, sums: _Sums) -> None:
        # _Sums replaces its tensors on every add: keeping them is a snapshot
        self.step, self.t0 = step, time.perf_counter()
        self.loss_sum, self.totals, self.seen = sums.loss_sum, dict(sums.totals), sums.seen

    def at_sync(self, step: int, sums: _Sums) -> None:
        """Called at a synchronisation point after ``step`` steps of the epoch."""
        if step - self.step < self.every:
            return
        run, n = self.run, sums.seen - self.seen
        diffs = [sums.loss_sum - self.loss_sum]
        diffs += [v - self.totals.get(k, sums.zero) for k, v in sums.totals.items()]
        means = [d / n for d in torch.stack(diffs).tolist()]  # one device-to-host copy
        values = dict(zip(["loss", *sums.totals], means, strict=True))
        global_step = (self.epoch - 1) * len(run.train) + step
        values["lr"] = run.spec.lr * run.factor(global_step - 1)
        values["images_per_s"] = n / max(time.perf_counter() - self.t0, 1e-9)
        run.tracker.log_step(run.spec.desc, global_step, values)
        self._mark(step, sums)


class _Run:
    """One :func:`fit`: the optimizer, the lr schedule, the divergence guard, the history and
    the best epoch so far, resumed from the state file if it holds this training; its methods
    are the steps of the loop."""

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter],
        train: Batches,
        spec: TrainSpec,
        loss_fn: LossFn,
        epoch_info: Callable[[int], dict[str, Any]] | None,
        extra: nn.Module | None,
    ) -> None:
        self.model, self.train, self.spec, self.extra = model, train, spec, extra
        self.loss_fn, self.epoch_info = loss_fn, epoch_info
        self.tracker = tracking.current()
        self.params = [p for p in params if p.requires_grad]
        self.result = FitResult()
        # best_val: the best epoch so far and a CPU copy of its weights (saved with the state)
        self.best: dict[str, Any] | None = None
        self.device = train.device
        self.pf = perf_mod.resolve(spec.perf, self.device)
        self.opt = make_optimizer(self.params, spec.lr, spec.optim, self.pf)
        self.fwd = perf_mod.prepare(model, self.pf, self.device)  # what loss_fn calls
        self.scaler = perf_mod.grad_scaler(self.pf, self.device)
        self._schedule(spec.epochs * len(train), spec.warmup_epochs * len(train))
        self.start, self.start_step = 1, 0
        self.partial: dict[str, Any] | None = None
        self.kept = "no state of this training was saved yet"
        dist.barrier()  # no rank reads the state file while rank 0 may still be writing it
        state = self._resumable()
        if state is not None:
            self._restore(state)
        self.guard = DivergenceGuard(self.device, state.get("guard") if state else None)
        self.objective = self._data_parallel() if dist.active() else None
        key = spec.lr_key
        self.advice = (
            f"try a lower {key} (it is {spec.lr:g}; e.g. {key}={spec.lr / 10:g}) or check the data"
            if key
            else f"try a lower learning rate (it is {spec.lr:g}) or check the data"
        )

    def _data_parallel(self) -> nn.Module:
        """This rank's share of the training batches, and the loss as one DDP module (every
        trained module inside it, so DDP averages all their gradients)."""
        world = dist.world()
        check_shares(self.train, world, self.spec.desc)
        self.train = self.train.shard(dist.rank(), world)
        return dist.wrap(_Objective(self.model, self.extra, self.loss_fn, self.fwd))

    def _loss(
        self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to differentiate, the global batch's mean loss, logits, terms) of one step.

        Data-parallel: each rank's mean loss is weighted by its share of the global batch
        (times the world size, which DDP's gradient average divides out), so the gradient is
        that of the mean over the global batch even when the last batch splits unevenly.
        """
        if self.objective is None:
            loss, logits, terms = self.loss_fn(self.fwd, x, y, epoch)
            return loss, loss.detach(), logits, terms
        loss, logits, terms = self.objective(x, y, epoch)
        share = y.numel() / self.train.global_batch(step)
        mean = dist.all_sum(loss.detach().double() * share)
        return loss * (share * dist.world()), mean, logits, terms

    def _schedule(self, total_steps: int, warmup_steps: int) -> None:
        """The per-step rate factor, its scheduler (None while the rate stays ``lr``) and its
        identity in the state (a state is continued only under the same schedule)."""
        spec = self.spec
        self.factor = lr_factor(spec.lr_schedule, total_steps, warmup_steps)
        scheduled = (spec.lr_schedule != "constant" or warmup_steps > 0) and total_steps > 0
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.factor) if scheduled else None
        self.schedule_id = (
            {"name": spec.lr_schedule, "total_steps": total_steps} if scheduled else None
        )
        if self.schedule_id is not None and warmup_steps > 0:
            self.schedule_id["warmup_steps"] = warmup_steps

    def _resumable(self) -> dict[str, Any] | None:
        """The state on disk if it holds this training, to continue exactly; else None."""
        path, desc = self.spec.state_path, self.spec.desc
        if not path.is_file():
            return None
        state = safe_torch_load(path)
        if not isinstance(state, dict) or state.get("fingerprint") != self.spec.fingerprint:
            return None
        running = state.get("optimizer") is not None
        if not running and int(state["epoch"]) < self.spec.epochs:
            # a final state (no optimizer) of a shorter run: nothing to continue from exactly
            log.info(f"{desc}: {path} holds a finished shorter run; starting over")
            return None
        if running and state.get("lr_schedule") != self.schedule_id:
            # the learning rates it trained with belong to another schedule (or length)
            log.info(f"{desc}: {path} holds a run with another lr schedule; starting over")
            return None
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.extra is not None and state.get("extra") is not None:
            self.extra.load_state_dict(state["extra"])
        if state.get("optimizer") is not None:
            self.opt.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.sched is not None and state.get("scheduler"):
            self.sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.best = state.get("best")
        self.result.history = list(state["history"])
        self.start, self.start_step = int(state["epoch"]), int(state.get("step", 0))
        self.partial = state.get("partial")
        if self.partial is None:
            self.start += 1  # the saved epoch was complete
        self.result.resumed_from = self.start - 1
        where = (
            f"epoch {self.start}, batch {self.start_step}"
            if self.partial
            else f"epoch {self.start - 1}"
        )
        log.info(f"{self.spec.desc}: resuming after {where} from {self.spec.state_path}")
        self.kept = f"the last good state (after {where}) is {self.spec.state_path}"

    def save(self, epoch: int, step: int = 0, sums: dict[str, Any] | None = None) -> None:
        # After the last epoch nothing is left to train: the optimizer state (twice the model
        # for Adam) is left out, which makes the final save about 3x smaller and faster.
        final = epoch == self.spec.epochs and sums is None
        if dist.is_main():  # data-parallel: rank 0's state is every rank's
            self._write(epoch, step, sums, final)
        where = f"epoch {epoch}, batch {step}" if sums is not None else f"epoch {epoch}"
        self.kept = f"the last good state (after {where}) is {self.spec.state_path}"

    def _write(self, epoch: int, step: int, sums: dict[str, Any] | None, final: bool) -> None:
        torch_save_atomic(
            {
                "fingerprint": self.spec.fingerprint,
                "epoch": epoch,
                "step": step,
                "partial": sums,
                "model": self.model.state_dict(),
                "extra": self.extra.state_dict() if self.extra is not None else None,
                "optimizer": None if final else self.opt.state_dict(),
                "scaler": None if self.scaler is None or final else self.scaler.state_dict(),
                "lr_schedule": self.schedule_id,
                "scheduler": None if self.sched is None or final else self.sched.state_dict(),
                "history": self.result.history,
                "best": self.best,
                "guard": self.guard.state(),
                "rng": _rng_state(),
            },
            self.spec.state_path,
        )

    def train_epoch(self, epoch: int, bar: Any, stop: StopFlag) -> _Sums:
        """One epoch's steps (from the saved batch when resuming mid-epoch): guarded, shown,
        and saved and stopped on a signal."""
        spec, n = self.spec, len(self.train)
        self.model.train()
        if self.extra is not None:
            self.extra.train()
        first = self.start_step if epoch == self.start else 0
        task = bar.add_task(
            f"  epoch {epoch}/{spec.epochs}",
            total=n,
            completed=first,
            info="",
            unit="img",
            per_step=self.train.batch_size,
        )
        # a mid-epoch state holds the global sums: rank 0 carries them on
        partial = self.partial if epoch == self.start and dist.is_main() else None
        sums = _Sums(self.device, partial)
        steps = _StepLog(self, epoch, first, sums) if self.tracker.active else None
        batches = self.train.epoch(epoch + spec.epoch_offset, start_batch=first)
        for step, (x, y) in enumerate(batches, start=first):
            with perf_mod.autocast(self.pf, self.device):
                loss, mean, logits, terms = self._loss(
                    perf_mod.as_input(x, self.pf), y, epoch, step
                )
            self._step(loss)
            self.guard.observe(step, mean)
            sums.add(loss.detach() if self.objective is None else mean, logits, y, terms)
            last = step + 1 == n
            sync = (step + 1) % LOG_EVERY == 0 or last
            stopping = self._stopping(stop, sync)
            if sync or stopping:
                self.guard.check(spec.desc, epoch, self.kept, self.advice)
                bar.update(task, completed=step + 1, info=sums.progress())
                if steps is not None:
                    steps.at_sync(step + 1, sums)
            if stopping and not last:
                self.save(epoch, step + 1, sums.all_reduced().state())
                raise Interrupted(
                    f"{spec.desc}: {_signal(stop)} at epoch {epoch}, batch "
                    f"{step + 1}; state saved to {spec.state_path}; rerun the same command "
                    "to resume"
                )
        bar.remove_task(task)
        return sums.all_reduced()

    def _stopping(self, stop: StopFlag, sync: bool) -> bool:
        """Whether to stop after this step: at once on a signal in one process; data-parallel,
        at the next synchronisation point, all ranks together when any rank got one."""
        if self.objective is None:
            return stop.signum is not None
        return sync and dist.agree(stop.signum is not None, self.device)

    def _step(self, loss: torch.Tensor) -> None:
        """Backward, clip and one optimizer (and schedule) step."""
        self.opt.zero_grad(set_to_none=True)
        clip = self.spec.grad_clip
        if self.scaler is None:
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.opt.step()
        else:  # fp16: scaled backward, clip the unscaled gradients, skip on overflow
            self.scaler.scale(loss).backward()
            if clip > 0:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.scaler.step(self.opt)
            self.scaler.update()
        if self.sched is not None:
            self.sched.step()

    def end_epoch(
        self, epoch: int, sums: _Sums, test: Batches, val: Batches | None
    ) -> dict[str, Any]:
        """The epoch's history row (train sums, lr, extra info, val and test), the best epoch
        so far, and the state saved."""
        row: dict[str, Any] = {"epoch": epoch, **sums.row()}
        if self.sched is not None:  # the rate of the epoch's last step
            row["lr"] = self.spec.lr * self.factor(epoch * len(self.train) - 1)
        if self.epoch_info is not None:
            row.update(self.epoch_info(epoch))
        if val is not None:
            ev = evaluate(self.model, val, self.pf)
            row["val_top1"], row["val_loss"] = ev["top1"], ev["loss"]
        if test.split != "val" or val is None:  # the validation split reported: measured once
            ev = evaluate(self.model, test, self.pf)
            row[f"{test.split}_top1"], row[f"{test.split}_loss"] = ev["top1"], ev["loss"]
        self.result.history.append(row)
        self.tracker.log_epoch(self.spec.desc, row)
        if self.spec.select == "best_val" and (
            self.best is None or row["val_top1"] > self.best["val_top1"]
        ):
            self.best = {
                "epoch": epoch,
                "val_top1": row["val_top1"],
                "model": _cpu_copy(self.model),
                "extra": None if self.extra is None else _cpu_copy(self.extra),
            }
        self.save(epoch)
        return row

    def keep_selected(self) -> None:
        """Leave the selected epoch's weights in the model (``best_val``: the best epoch's)."""
        result, best = self.result, self.best
        result.selected = len(result.history)
        if best is None or best["epoch"] == result.selected:
            return
        self.model.load_state_dict(best["model"])
        if self.extra is not None and best["extra"] is not None:
            self.extra.load_state_dict(best["extra"])
        result.selected = int(best["epoch"])
        log.info(
            f"{self.spec.desc}: kept epoch {result.selected} (best validation top1 "
            f"{best['val_top1']:.2f}%) of {len(result.history)}"
        )


def check_shares(train: Batches, world: int, desc: str) -> None:
    """Refuse training batches that leave a rank without examples: the last (smallest) batch
    of an epoch must hold at least one example per rank."""
    last = train.global_batch(len(train) - 1)
    if last < world:
        raise M2MError(
            f"{desc}: the last batch of an epoch holds {last} of {train.num_examples} training "
            f"examples, fewer than the {world} ranks (each needs at least one); choose a "
            "dataset.batch_size or a training-set size (dataset.limit_train) that leaves "
            f"at least {world} in the last batch"
        )


class _Objective(nn.Module):
    """The trained modules with the loss as their forward pass, for DDP: the whole loss runs
    inside DDP's forward, and the gradients of every trainable parameter it reaches (the
    model's and the extra module's, e.g. a feature projection) are averaged across ranks."""

    def __init__(
        self, model: nn.Module, extra: nn.Module | None, loss_fn: LossFn, fwd: nn.Module
    ) -> None:
        super().__init__()
        self.model = model
        if extra is not None:
            self.extra = extra
        # not submodules: the loss and the (maybe compiled) forward the loss calls
        object.__setattr__(self, "_loss_fn", loss_fn)
        object.__setattr__(self, "_fwd", fwd)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        loss_fn: LossFn = self.__dict__["_loss_fn"]
        return loss_fn(self.__dict__["_fwd"], x, y, epoch)


def _cpu_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
