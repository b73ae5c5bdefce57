"""The KD repair loop shared by ``distill`` and every ``slice`` step.

The teacher is frozen in eval mode and runs without gradients; the student trains with Adam
and gradient clipping on the weighted KD terms of :mod:`m2mdc.distill.losses`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from m2mdc.arch import get_adapter
from m2mdc.data.loader import Batches, preprocess
from m2mdc.distill.losses import (
    KDOutputs,
    Term,
    combine,
    needs_features,
    needs_stages,
    term_weights,
)
from m2mdc.distill.sparsity import Sparsity
from m2mdc.slicing import ChannelDecay
from m2mdc.train import perf as perf_mod
from m2mdc.train.loop import FitResult, TrainSpec, fit


class FeatureAligner(nn.Module):
    """Brings student and teacher penultimate features to a common space.

    When the student's feature width equals the teacher's, nothing changes. When slicing made
    it narrower, ``mode="kept_channels"`` compares the student with the teacher's features at
    the kept channel indices (``index``, relative to the teacher: the student's channel j *is*
    teacher channel index[j]), and ``mode="projection"`` learns a linear map from the student's
    features to the teacher's width (trained with the student). ``mode="none"``: no term
    reads the features, so they are passed through whatever their widths.
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        mode: str = "kept_channels",
        index: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.mode = "identity" if s_dim == t_dim or mode == "none" else mode
        self.proj: nn.Module | None = None
        if self.mode == "projection":
            self.proj = nn.Linear(s_dim, t_dim, bias=False)
        self.index: torch.Tensor
        self.register_buffer(
            "index",
            torch.as_tensor(list(index) if index is not None else [], dtype=torch.long),
            persistent=False,
        )
        if self.mode == "kept_channels" and self.index.numel() != s_dim:
            raise ValueError(
                f"kept_channels feature alignment needs {s_dim} teacher indices, "
                f"got {self.index.numel()}"
            )

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "kept_channels":
            return s, t.index_select(1, self.index)
        if self.proj is not None:
            return self.proj(s), t
        return s, t


class StageTap:
    """Forward hooks on ``adapter.feature_stages(model)`` that keep the stage outputs of the
    forward passes run inside :meth:`collect` (and nothing otherwise, e.g. during evaluation).

    Example:
        >>> tap = StageTap(model)
        >>> with tap.collect() as stages:
        ...     logits = model(x)  # stages: {"layer1": tensor, ...}
        >>> tap.remove()
    """

    def __init__(self, model: nn.Module) -> None:
        self._active: dict[str, torch.Tensor] | None = None
        self._handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in get_adapter(model).feature_stages(model).items()
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            if self._active is not None:
                self._active[name] = output

        return hook

    @contextmanager
    def collect(self) -> Iterator[dict[str, torch.Tensor]]:
        self._active = {}
        try:
            yield self._active
        finally:
            self._active = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass
class RepairExtras:
    """Optional additions to a KD repair.

    Attributes:
        sparsity: a group-sparsity penalty added to the loss (:mod:`m2mdc.distill.sparsity`).
        decay: soft channel masks advanced once per training step
            (:class:`m2mdc.slicing.ChannelDecay`); the repair then keeps the last epoch (the
            only one whose masks are at 0) and compares only the kept penultimate features.
    """

    sparsity: Sparsity | None = None
    decay: ChannelDecay | None = None


def kd_repair(
    student: nn.Module,
    teacher: nn.Module,
    train: Batches,
    test: Batches,
    spec: TrainSpec | None = None,
    *,
    terms: list[Term],
    temperature: float,
    feature_index: Sequence[int] | None = None,
    feature_match: str = "kept_channels",
    val: Batches | None = None,
    extras: RepairExtras | None = None,
    **fields: Any,
) -> FitResult:
    """Train ``student`` against ``teacher`` as ``spec`` says (or its fields as keywords, see
    :func:`m2mdc.train.loop.fit`); history logs every term and its weight per epoch
    (``alpha``/``beta`` for the paper's two alignment terms).

    ``spec.perf`` (:mod:`m2mdc.train.perf`) applies to both networks' forward passes.
    ``extras``: see :class:`RepairExtras`."""
    spec = TrainSpec.given(spec, fields)
    extras = extras or RepairExtras()
    if extras.decay is not None:  # the last epoch is the only one at factor 0
        spec = dataclasses.replace(spec, select="last")
        if extras.decay.feature_keep is not None and feature_index is None:
            feature_index = extras.decay.feature_keep  # the student's channels are the teacher's
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    objective = KDObjective(student, teacher, test, spec, terms, temperature, extras)
    objective.align(feature_match, feature_index, train.device)
    params = list(student.parameters()) + list(objective.aligner.parameters())
    try:
        return fit(
            student,
            params,
            train,
            test,
            spec,
            loss_fn=objective,
            val=val,
            epoch_info=objective.epoch_info,
            extra_state=objective.extra_state(),
        )
    finally:
        objective.close()


class KDObjective:
    """The loss of one KD repair: the weighted terms of :mod:`m2mdc.distill.losses` on the
    student's and the frozen teacher's outputs, plus the optional sparsity penalty, with soft
    channel masks advanced once per step (:class:`RepairExtras`)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        test: Batches,
        spec: TrainSpec,
        terms: list[Term],
        temperature: float,
        extras: RepairExtras,
    ) -> None:
        self.student, self.teacher, self.test = student, teacher, test
        self.terms, self.temperature, self.extras = terms, temperature, extras
        self.epochs, self.smoothing = spec.epochs, spec.label_smoothing
        decay = extras.decay
        self.keep = None  # the kept penultimate features while a decay removes some
        if decay is not None and decay.feature_keep is not None:
            self.keep = torch.as_tensor(decay.feature_keep, dtype=torch.long, device=test.device)
        s_adapter, t_adapter = get_adapter(student), get_adapter(teacher)
        perf_mod.apply_memory_format(teacher, spec.perf)  # the student's is set by fit()
        # the two forward passes, through torch.compile when perf.compile is set
        self.t_forward = perf_mod.compiled(
            lambda x: t_adapter.forward_features(teacher, x), spec.perf
        )
        self.s_forward = perf_mod.compiled(
            lambda x: s_adapter.forward_features(student, x), spec.perf
        )
        # stage outputs for attention transfer: hooks only when a term needs them
        self.taps = (StageTap(student), StageTap(teacher)) if needs_stages(terms) else None
        self.aligner = FeatureAligner(1, 1, "none")

    def align(self, mode: str, index: Sequence[int] | None, device: torch.device) -> None:
        """Set the feature aligner from the two networks' penultimate widths."""
        # two test images are enough to read the feature widths (not a whole batch)
        probe = preprocess(self.test.head(2), self.test.image_size)
        with torch.no_grad():
            s_dim = get_adapter(self.student).forward_features(self.student.eval(), probe)[0]
            t_dim = get_adapter(self.teacher).forward_features(self.teacher, probe)[0]
        width = s_dim.shape[1] if self.keep is None else self.keep.numel()
        mode = mode if needs_features(self.terms) else "none"
        self.aligner = FeatureAligner(width, t_dim.shape[1], mode, index).to(device)

    def extra_state(self) -> nn.Module:
        """What a resumable state saves besides the student and its optimizer."""
        decay = self.extras.decay
        if decay is None:
            return self.aligner
        return nn.ModuleDict({"aligner": self.aligner, "decay": decay})

    def _forwards(self, x: torch.Tensor) -> tuple[Any, ...]:
        # The teacher runs under no_grad, not inference_mode: the KD terms (cosine, KL) save
        # their inputs, the teacher's outputs included, for backward, and inference tensors
        # cannot be saved for backward.
        if self.taps is None:
            with torch.no_grad():
                t_feat, t_logits = self.t_forward(x)
            s_feat, s_logits = self.s_forward(x)
            return s_feat, s_logits, t_feat, t_logits, None, None
        with torch.no_grad(), self.taps[1].collect() as t_stages:
            t_feat, t_logits = self.t_forward(x)
        with self.taps[0].collect() as s_stages:
            s_feat, s_logits = self.s_forward(x)
        return s_feat, s_logits, t_feat, t_logits, s_stages, t_stages

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int):
        if self.extras.decay is not None:
            self.extras.decay.advance()
        s_feat, s_logits, t_feat, t_logits, s_stages, t_stages = self._forwards(x)
        # the loss terms in float32 whatever perf.amp ran the forwards in (no-ops otherwise)
        s_feat, s_logits = s_feat.float(), s_logits.float()
        t_feat, t_logits = t_feat.float(), t_logits.float()
        if self.keep is not None:
            s_feat = s_feat.index_select(1, self.keep)
        s_al, t_al = self.aligner(s_feat, t_feat)
        out = KDOutputs(
            s_logits, t_logits, s_al, t_al, y, self.temperature, s_stages, t_stages,
            self.smoothing,
        )  # fmt: skip
        loss, logged = combine(self.terms, out, epoch, self.epochs)
        sparsity = self.extras.sparsity
        if sparsity is not None:
            penalty = sparsity.penalty()
            logged["sparsity"] = penalty.detach()
            w = sparsity.weight_at(epoch, self.epochs)
            if w:
                loss = loss + w * penalty
        return loss, s_logits, logged

    def epoch_info(self, epoch: int) -> dict[str, float]:
        """The terms' weights (and the penalty's, the decay factor) logged with each epoch."""
        info = term_weights(self.terms, epoch, self.epochs)
        if self.extras.sparsity is not None:
            info["w_sparsity"] = self.extras.sparsity.weight_at(epoch, self.epochs)
        if self.extras.decay is not None:
            info["decay_factor"] = float(self.extras.decay.factor)
        return info

    def close(self) -> None:
        """Remove the stage hooks (inert outside collect(), removed so they do not pile up)."""
        for tap in self.taps or ():
            tap.remove()
