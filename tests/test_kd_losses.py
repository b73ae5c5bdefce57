"""KD terms and the staged weight schedule (section 3.4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from m2mdc.distill.losses import KDOutputs, combine, preset_terms, ramp
from m2mdc.distill.repair import FeatureAligner


def outputs(seed=0, n=4, c=5, d=6):
    g = torch.Generator().manual_seed(seed)
    return KDOutputs(
        torch.randn(n, c, generator=g),
        torch.randn(n, c, generator=g),
        torch.randn(n, d, generator=g),
        torch.randn(n, d, generator=g),
        torch.randint(0, c, (n,), generator=g),
        temperature=2.0,
    )


@pytest.mark.parametrize("T", [1, 2, 5])
def test_ramp_matches_the_paper_formula(T):
    weights = [ramp(t, T, 0.1) for t in range(1, T + 1)]
    expected = [0.0] * T if T == 1 else [0.1 * (t - 1) / (T - 1) for t in range(1, T + 1)]
    assert weights == pytest.approx(expected)
    assert weights[0] == 0.0


def test_staged_cosine_loss_is_ce_plus_ramped_alignment():
    o = outputs()
    terms = preset_terms("staged_cosine", 0.1, 0.2)
    ce = F.cross_entropy(o.s_logits, o.labels)
    cos_l = 1 - (o.s_logits * o.t_logits).sum(1) / (o.s_logits.norm(dim=1) * o.t_logits.norm(dim=1))
    cos_f = 1 - (o.s_feat * o.t_feat).sum(1) / (o.s_feat.norm(dim=1) * o.t_feat.norm(dim=1))
    for epoch, T in [(1, 5), (3, 5), (5, 5)]:
        a, b = 0.1 * (epoch - 1) / (T - 1), 0.2 * (epoch - 1) / (T - 1)
        loss, logged = combine(terms, o, epoch, T)
        assert float(loss) == pytest.approx(
            float(ce + a * cos_l.mean() + b * cos_f.mean()), rel=1e-5
        )
        assert set(logged) == {"ce", "logit_align", "feat_align"}


def test_hinton_kl_is_zero_for_identical_logits_and_scaled_by_t_squared():
    o = outputs()
    o.t_logits = o.s_logits.clone()
    _, logged = combine(preset_terms("hinton", 1.0, 0.0), o, 2, 2)
    assert float(logged["kl"]) == pytest.approx(0.0, abs=1e-6)
    o2 = outputs(seed=1)
    p_t = F.softmax(o2.t_logits / 2.0, 1)
    manual = (p_t * (p_t.log() - F.log_softmax(o2.s_logits / 2.0, 1))).sum(1).mean() * 4.0
    _, logged = combine(preset_terms("hinton", 1.0, 0.0), o2, 1, 2)
    assert float(logged["kl"]) == pytest.approx(float(manual), rel=1e-5)


def test_feature_aligner_selects_kept_teacher_channels():
    al = FeatureAligner(2, 4, "kept_channels", index=[1, 3])
    s, t = torch.randn(3, 2), torch.arange(12.0).view(3, 4)
    s2, t2 = al(s, t)
    assert torch.equal(s2, s) and torch.equal(t2, t[:, [1, 3]])
    proj = FeatureAligner(2, 4, "projection")
    assert proj(s, t)[0].shape == (3, 4)
    same = FeatureAligner(4, 4)
    assert same.mode == "identity"
