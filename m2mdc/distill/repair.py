"""The KD repair loop shared by ``distill`` and every ``slice`` step.

The teacher is frozen in eval mode and runs without gradients; the student trains with Adam
and gradient clipping on the weighted KD terms of :mod:`m2mdc.distill.losses`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from m2mdc.arch import get_adapter
from m2mdc.data.loader import Batches
from m2mdc.distill.losses import KDOutputs, Term, combine
from m2mdc.train.loop import FitResult, fit


class FeatureAligner(nn.Module):
    """Brings student and teacher penultimate features to a common space.

    When the student's feature width equals the teacher's, nothing changes. When slicing made
    it narrower, ``mode="kept_channels"`` compares the student with the teacher's features at
    the kept channel indices (``index``, relative to the teacher: the student's channel j *is*
    teacher channel index[j]), and ``mode="projection"`` learns a linear map from the student's
    features to the teacher's width (trained with the student).
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        mode: str = "kept_channels",
        index: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.mode = "identity" if s_dim == t_dim else mode
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


def kd_repair(
    student: nn.Module,
    teacher: nn.Module,
    train: Batches,
    test: Batches,
    *,
    terms: list[Term],
    epochs: int,
    lr: float,
    grad_clip: float,
    temperature: float,
    state_path: Path,
    fingerprint: str,
    desc: str,
    feature_index: Sequence[int] | None = None,
    feature_match: str = "kept_channels",
) -> FitResult:
    """Train ``student`` against ``teacher`` for ``epochs`` epochs; history logs every term and
    its weight per epoch (``alpha``/``beta`` for the paper's two alignment terms)."""
    adapter = get_adapter(student)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    probe = next(iter(test))[0][:2]
    with torch.no_grad():
        s_dim = adapter.forward_features(student.eval(), probe)[0].shape[1]
        t_dim = get_adapter(teacher).forward_features(teacher, probe)[0].shape[1]
    aligner = FeatureAligner(s_dim, t_dim, feature_match, feature_index).to(train.device)
    t_adapter = get_adapter(teacher)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int):
        with torch.no_grad():
            t_feat, t_logits = t_adapter.forward_features(teacher, x)
        s_feat, s_logits = adapter.forward_features(model, x)
        s_al, t_al = aligner(s_feat, t_feat)
        out = KDOutputs(s_logits, t_logits, s_al, t_al, y, temperature)
        loss, logged = combine(terms, out, epoch, epochs)
        return loss, s_logits, logged

    def epoch_info(epoch: int) -> dict[str, float]:
        info = {}
        for t in terms:
            if t.ramped:
                key = {"logit_align": "alpha", "feat_align": "beta", "kl": "alpha"}.get(
                    t.log_as or "", f"w_{t.name}"
                )
                info[key] = t.weight_at(epoch, epochs)
        return info

    params = list(student.parameters()) + list(aligner.parameters())
    return fit(
        student,
        params,
        train,
        test,
        epochs=epochs,
        lr=lr,
        grad_clip=grad_clip,
        loss_fn=loss_fn,
        state_path=state_path,
        fingerprint=fingerprint,
        desc=desc,
        epoch_info=epoch_info,
        extra_state=aligner,
    )
