"""Knowledge-distillation loss terms and their per-epoch weights (paper section 3.4).

A KD objective is a list of weighted terms. Each term is a registered function of the
student's and teacher's outputs; its weight follows a linear ramp over the repair epochs:

    w_t = w* (t - 1) / (T - 1),  t = 1..T   (w_t = 0 when T = 1)

so epoch 1 is pure cross-entropy ("surgery repair"); ``ramp: none`` terms keep their weight.
The terms come from ``kd.terms`` (:func:`terms_from_config`); the presets in ``conf/kd/``:

* ``staged_cosine`` (the paper): CE + alpha_t (1 - cos(z_s, z_t)) + beta_t (1 - cos(phi_s, phi_t))
* ``hinton`` (Algorithm 1's "CE+KL ramp"): CE + alpha_t T^2 KL(softmax(z_t/T) || softmax(z_s/T))
* ``ce_only``: CE alone (plain fine-tuning)
* ``attention_transfer``: CE + gamma_t AT (+ alpha_t T^2 KL when ``kd.alpha > 0``)
* ``ig_overlay`` / ``ig_at``: Hinton KD (/ + AT) on images overlaid with the teacher's
  integrated-gradients maps (:mod:`m2mdc.distill.ig`)

Example, a new term::

    @KD_TERMS.register("mse_logits")
    def mse_logits(o: KDOutputs) -> torch.Tensor:
        return F.mse_loss(o.s_logits, o.t_logits)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

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
    # stage outputs (adapter.feature_stages), collected only when a term needs them
    s_stages: Mapping[str, torch.Tensor] | None = None
    t_stages: Mapping[str, torch.Tensor] | None = None
    label_smoothing: float = 0.0  # of the ce term (the training section's label_smoothing)


KD_TERMS: Registry[Callable[[KDOutputs], torch.Tensor]] = Registry("kd term")


@KD_TERMS.register("ce")
def ce(o: KDOutputs) -> torch.Tensor:
    return F.cross_entropy(o.s_logits, o.labels, label_smoothing=o.label_smoothing)


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


def attention_map(a: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: channel mean of ``|A|^2``, ``[B, 1, H, W]``."""
    return a.float().pow(2).mean(1, keepdim=True)


@KD_TERMS.register("attention_transfer")
def attention_transfer(o: KDOutputs) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, eq. 2 with p = 2, not squared).

    Per stage present in both networks: ``Q = vec(mean_c |A_c|^2) / ||vec(...)||_2``, loss
    ``||Q_s - Q_t||_2`` per image (in [0, 2]), averaged over the batch, then over the stages.
    Channel counts may differ (sliced students); a student map of another spatial size is
    resized (bilinear) to the teacher's. Stages whose map is 1x1 carry no spatial information
    (always equal after normalisation) and are skipped.
    """
    if o.s_stages is None or o.t_stages is None:
        raise RuntimeError("attention_transfer needs the stage outputs (s_stages, t_stages)")
    losses = []
    for name, s_act in o.s_stages.items():
        if name not in o.t_stages:
            continue
        qs, qt = attention_map(s_act), attention_map(o.t_stages[name])
        if qt.shape[-2] * qt.shape[-1] <= 1:
            continue
        if qs.shape[-2:] != qt.shape[-2:]:
            qs = F.interpolate(qs, size=qt.shape[-2:], mode="bilinear", align_corners=False)
        qs, qt = F.normalize(qs.flatten(1), dim=1), F.normalize(qt.flatten(1), dim=1)
        losses.append(torch.linalg.vector_norm(qs - qt, dim=1).mean())
    if not losses:
        return o.s_logits.new_zeros(())
    return torch.stack(losses).mean()


FEATURE_TERMS = {"feature_cosine"}
"""Terms that read the penultimate features (``s_feat``/``t_feat``); a term registered by an
extension that reads them adds its name here. Without such a term the feature widths of
student and teacher may differ freely (e.g. a Torch-Pruning peer) and are not aligned."""

STAGE_TERMS = frozenset({"attention_transfer"})
"""Terms that need the stage outputs (collected with forward hooks only when configured)."""

LOG_NAMES = {"logit_cosine": "logit_align", "feature_cosine": "feat_align"}
"""The paper's metric names of its two alignment terms; other terms log under their own name."""


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
    temperature: float | None = None  # kl only; None: the run's kd.temperature

    def weight_at(self, epoch: int, epochs: int) -> float:
        return ramp(epoch, epochs, self.weight) if self.ramped else self.weight


def repair_terms(terms: list[Term], distill_epochs: int, ramp_mode: str) -> list[Term]:
    """The terms of a slicing repair (``slice.repair_ramp``): ``restart`` keeps them as they
    are (each repair ramps its terms over its own epochs: a 1-epoch repair is pure CE);
    ``continue`` fixes every ramped term at the weight the distill stage's last epoch used
    (its peak when ``kd.epochs`` > 1), so every repair consults the teacher from its first
    batch."""
    if ramp_mode == "restart":
        return terms
    if ramp_mode != "continue":
        raise ValueError(f"slice.repair_ramp={ramp_mode!r}: choose restart or continue")
    last = max(distill_epochs, 1)
    return [replace(t, weight=t.weight_at(last, distill_epochs), ramped=False) for t in terms]


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

    raise M2MError(
        f"kd.terms is empty and kd={name} has no built-in terms; give kd.terms "
        "(e.g. kd.terms=[{name:ce,weight:1,ramp:none}]) or choose kd=staged_cosine or hinton"
    )


def terms_from_config(kd: Any) -> list[Term]:
    """The weighted terms of a ``kd`` config section (validated, see ``config.check_kd_terms``).

    ``kd.terms`` (a list of ``{name, weight, ramp: linear|none, temperature}``) defines them;
    when it is empty (configs written before terms existed), the legacy presets
    ``staged_cosine`` / ``hinton`` are rebuilt from ``kd.name``, ``kd.alpha`` and ``kd.beta``.
    Terms log under :data:`LOG_NAMES` (the paper's ``logit_align`` / ``feat_align``) or their own
    name; a repeated name gets a suffix (``kl_2``).
    """
    from m2mdc.config import check_kd_terms

    raw = kd.get("terms") if hasattr(kd, "get") else None
    if not raw:
        return preset_terms(str(kd.get("name", "staged_cosine")), float(kd.alpha), float(kd.beta))
    check_kd_terms(raw)
    terms: list[Term] = []
    seen: dict[str, int] = {}
    for t in raw:
        name = str(t["name"])
        log = LOG_NAMES.get(name, name)
        seen[log] = seen.get(log, 0) + 1
        if seen[log] > 1:
            log = f"{log}_{seen[log]}"
        temperature = t.get("temperature")
        terms.append(
            Term(
                name,
                float(t.get("weight", 1.0)),
                ramped=str(t.get("ramp", "linear")) == "linear",
                log_as=log,
                temperature=None if temperature is None else float(temperature),
            )
        )
    return terms


def needs_features(terms: list[Term]) -> bool:
    return any(t.name in FEATURE_TERMS for t in terms)


def needs_stages(terms: list[Term]) -> bool:
    return any(t.name in STAGE_TERMS for t in terms)


WEIGHT_ALIASES = {"logit_align": "alpha", "feat_align": "beta", "kl": "alpha"}
"""The paper's names of the per-epoch weights (metrics ``alpha``, ``beta``)."""


def term_weights(terms: list[Term], epoch: int, epochs: int) -> dict[str, float]:
    """Every term's weight at ``epoch``: ``alpha``/``beta`` for the paper's alignment terms (and
    Hinton's KL), ``w_<log name>`` for the others."""
    info: dict[str, float] = {}
    for t in terms:
        log = t.log_as or t.name
        key = WEIGHT_ALIASES.get(log, "")
        if not key or key in info:
            key = f"w_{log}"
        info[key] = t.weight_at(epoch, epochs)
    return info


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
        o = outputs if term.temperature is None else replace(outputs, temperature=term.temperature)
        value = KD_TERMS.get(term.name)(o)
        logged[term.log_as or term.name] = value.detach()
        if w:
            total = total + w * value
    return total, logged
