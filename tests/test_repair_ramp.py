"""slice.repair_ramp: restart the KD ramp in every slicing repair, or continue at the distill
stage's final weights (recipe=paper: Algorithm 1 distils in each repair)."""

from __future__ import annotations

import pytest

from m2mdc.distill.losses import Term, ramp, repair_terms
from m2mdc.errors import M2MError

TERMS = [
    Term("ce", 1.0, ramped=False),
    Term("logit_cosine", 0.1, log_as="logit_align"),
    Term("feature_cosine", 0.3, log_as="feat_align"),
]


def test_restart_keeps_the_terms():
    assert repair_terms(TERMS, 5, "restart") == TERMS
    # so a 1-epoch repair is pure CE: every ramped weight is 0 at its only epoch
    assert [t.weight_at(1, 1) for t in TERMS] == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("distill_epochs", [1, 2, 5])
def test_continue_fixes_the_distill_stages_last_weights(distill_epochs):
    got = repair_terms(TERMS, distill_epochs, "continue")
    # the weights of the distill stage's last epoch: the peak w (T-1)/(T-1), or 0 when T = 1
    last = 0.0 if distill_epochs == 1 else 1.0
    assert [t.weight for t in got] == [1.0, 0.1 * last, 0.3 * last]
    assert [ramp(distill_epochs, distill_epochs, t.weight) for t in TERMS[1:]] == [
        t.weight for t in got[1:]
    ]
    # ... at every epoch of any repair, from its first
    assert all(not t.ramped for t in got)
    assert [t.weight_at(1, 1) for t in got] == [t.weight for t in got]
    assert [t.log_as for t in got] == [t.log_as for t in TERMS]


def test_the_setting_is_validated(compose_cfg):
    from m2mdc.config import validate

    with pytest.raises(
        M2MError, match=r"slice\.repair_ramp='sometimes' is not valid; choose one of: restart, "
    ):
        validate(compose_cfg("slice.repair_ramp=sometimes"))


def test_recipes_and_fingerprints(compose_cfg, tmp_path):
    import m2mdc.stages  # noqa: F401  (registers the stages)
    from m2mdc.stage import Context

    assert compose_cfg().slice.repair_ramp == "restart"
    assert compose_cfg("recipe=paper").slice.repair_ramp == "continue"

    def slice_fp(*overrides):
        return Context(compose_cfg(*overrides), tmp_path).fingerprint("slice")

    base = slice_fp()
    assert slice_fp("slice.repair_ramp=restart") == base  # neutral at its default
    assert slice_fp("slice.repair_ramp=continue") != base
    assert "repair_ramp" not in Context(compose_cfg(), tmp_path).stage_config("slice")["slice"]
