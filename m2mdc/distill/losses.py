"""Knowledge-distillation loss terms and their per-epoch weights (paper section 3.4).

A KD objective is a list of weighted terms. Each term is a registered function of the
student's and teacher's outputs; its weight follows a linear ramp over the repair epochs:

    w_t = w* (t - 1) / (T - 1),  t = 1..T   (w_t = 0 when T = 1)

so epoch 1 is pure cross-entropy ("surgery repair"). Presets:

* ``staged_cosine`` (the paper): CE + alpha_t (1 - cos(z_s, z_t)) + beta_t (1 - cos(phi_s, phi_t))
* ``hinton`` (Algorithm 1's "CE+KL ramp"): CE + alpha_t T^2 KL(softmax(z_t/T) || softmax(z_s/T))

Example, a new term::

    @KD_TERMS.register("mse_logits")
    def mse_logits(o: KDOutputs) -> torch.Tensor:
        return F.mse_loss(o.s_logits, o.t_logits)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from m2mdc.registry import Registry


@dataclass
class KDOutputs:
    """Everything a term may use for one batch."""

    s_logits: torch.Tensor
    t_logits: torch.Tensor
    s_feat: torch.Tensor
    t_feat: torch.Tensor  # already mapped to the student's feature space (see FeatureAligner)
    labels: torch.Tensor
    temperature: float = 4.0


KD_TERMS: Registry[Callable[[KDOutputs], torch.Tensor]] = Registry("kd term")


@KD_TERMS.register("ce")
def ce(o: KDOutputs) -> torch.Tensor:
    return F.cross_entropy(o.s_logits, o.labels)


@KD_TERMS.register("logit_cosine")
def logit_cosine(o: KDOutputs) -> torch.Tensor:
    """1 - cos(student logits, teacher logits), batch mean."""
    return (1 - F.cosine_similarity(o.s_logits, o.t_logits, dim=1)).mean()


@KD_TERMS.register("feature_cosine")
def feature_cosine(o: KDOutputs) -> torch.Tensor:
    """1 - cos(phi_s, phi_t) on penultimate pooled features, batch mean."""
    return (1 - F.cosine_similarity(o.s_feat, o.t_feat, dim=1)).mean()


@KD_TERMS.register("kl")
def kl(o: KDOutputs) -> torch.Tensor:
    """Hinton et al.: T^2 KL(softmax(z_t / T) || softmax(z_s / T)), batch mean."""
    t = o.temperature
    return F.kl_div(
        F.log_softmax(o.s_logits / t, dim=1),
        F.log_softmax(o.t_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def ramp(epoch: int, epochs: int, peak: float) -> float:
    """Linear ramp ``peak (t-1)/(T-1)`` over epochs ``t = 1..T``; 0 throughout when T <= 1."""
    if epochs <= 1:
        return 0.0
    return peak * (epoch - 1) / (epochs - 1)


@dataclass(frozen=True)
class Term:
    """One weighted term: ``weight`` is the peak; ``ramped`` terms follow :func:`ramp`."""

    name: str
    weight: float
    ramped: bool = True
    log_as: str | None = None  # the name in metrics (paper: logit_align, feat_align)

    def weight_at(self, epoch: int, epochs: int) -> float:
        return ramp(epoch, epochs, self.weight) if self.ramped else self.weight


def preset_terms(name: str, alpha: float, beta: float) -> list[Term]:
    """The terms of a ``kd`` preset."""
    if name == "staged_cosine":
        return [
            Term("ce", 1.0, ramped=False),
            Term("logit_cosine", alpha, log_as="logit_align"),
            Term("feature_cosine", beta, log_as="feat_align"),
        ]
    if name == "hinton":
        return [Term("ce", 1.0, ramped=False), Term("kl", alpha, log_as="kl")]
    from m2mdc.errors import M2MError

    raise M2MError(f"kd={name} is not valid; choose one of: staged_cosine, hinton")


def combine(
    terms: list[Term], outputs: KDOutputs, epoch: int, epochs: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the terms at ``epoch``, and each unweighted term for logging.

    Terms whose weight is 0 this epoch are still computed for logging (cheap, no gradient
    kept for them), so the per-epoch curves show how far apart student and teacher are.
    """
    total = torch.zeros((), device=outputs.s_logits.device)
    logged: dict[str, torch.Tensor] = {}
    for term in terms:
        w = term.weight_at(epoch, epochs)
        value = KD_TERMS.get(term.name)(outputs)
        logged[term.log_as or term.name] = value.detach()
        if w:
            total = total + w * value
    return total, logged
