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
    adapter = get_adapter(student)
    sparsity, decay = (extras.sparsity, extras.decay) if extras else (None, None)
    keep = None  # the kept penultimate features while a decay removes some
    if decay is not None and decay.feature_keep is not None:
        keep = torch.as_tensor(decay.feature_keep, dtype=torch.long, device=train.device)
        if feature_index is None:  # the student's channels are the teacher's
            feature_index = decay.feature_keep
    if decay is not None:  # the last epoch is the only one at factor 0
        spec = dataclasses.replace(spec, select="last")
    epochs, perf, smoothing = spec.epochs, spec.perf, spec.label_smoothing
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # two test images are enough to read the feature widths (not a whole preprocessed batch)
    probe = preprocess(test.head(2), test.image_size)
    with torch.no_grad():
        s_dim = adapter.forward_features(student.eval(), probe)[0].shape[1]
        s_dim = s_dim if keep is None else keep.numel()
        t_dim = get_adapter(teacher).forward_features(teacher, probe)[0].shape[1]
    mode = feature_match if needs_features(terms) else "none"
    aligner = FeatureAligner(s_dim, t_dim, mode, feature_index).to(train.device)
    t_adapter = get_adapter(teacher)
    perf_mod.apply_memory_format(teacher, perf)  # the student's is set by fit()
    # the two forward passes, through torch.compile when perf.compile is set
    t_forward = perf_mod.compiled(lambda x: t_adapter.forward_features(teacher, x), perf)
    s_forward = perf_mod.compiled(lambda x: adapter.forward_features(student, x), perf)
    # stage outputs for attention transfer: hooks only when a term needs them
    taps = (StageTap(student), StageTap(teacher)) if needs_stages(terms) else None

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int):
        # The teacher runs under no_grad, not inference_mode: the KD terms (cosine, KL) save
        # their inputs, the teacher's outputs included, for backward, and inference tensors
        # cannot be saved for backward.
        if decay is not None:
            decay.advance()
        if taps is None:
            with torch.no_grad():
                t_feat, t_logits = t_forward(x)
            s_feat, s_logits = s_forward(x)
            s_stages = t_stages = None
        else:
            with torch.no_grad(), taps[1].collect() as t_stages:
                t_feat, t_logits = t_forward(x)
            with taps[0].collect() as s_stages:
                s_feat, s_logits = s_forward(x)
        # the loss terms in float32 whatever perf.amp ran the forwards in (no-ops otherwise)
        t_feat, t_logits, s_feat, s_logits = (
            t_feat.float(),
            t_logits.float(),
            s_feat.float(),
            s_logits.float(),
        )
        if keep is not None:
            s_feat = s_feat.index_select(1, keep)
        s_al, t_al = aligner(s_feat, t_feat)
        out = KDOutputs(
            s_logits, t_logits, s_al, t_al, y, temperature, s_stages, t_stages, smoothing
        )
        loss, logged = combine(terms, out, epoch, epochs)
        if sparsity is not None:
            penalty = sparsity.penalty()
            logged["sparsity"] = penalty.detach()
            w = sparsity.weight_at(epoch, epochs)
            if w:
                loss = loss + w * penalty
        return loss, s_logits, logged

    def epoch_info(epoch: int) -> dict[str, float]:
        info = term_weights(terms, epoch, epochs)
        if sparsity is not None:
            info["w_sparsity"] = sparsity.weight_at(epoch, epochs)
        if decay is not None:
            info["decay_factor"] = float(decay.factor)
        return info

    params = list(student.parameters()) + list(aligner.parameters())
    result = fit(
        student,
        params,
        train,
        test,
        spec,
        loss_fn=loss_fn,
        val=val,
        epoch_info=epoch_info,
        extra_state=aligner
        if decay is None
        else nn.ModuleDict({"aligner": aligner, "decay": decay}),
    )
    for tap in taps or ():  # inert outside collect(); removed so hooks do not pile up
        tap.remove()
    return result
