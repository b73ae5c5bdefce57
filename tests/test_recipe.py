"""The ``recipe=`` presets: what each selects, and that explicit choices still win."""

from __future__ import annotations

import pytest

from m2mdc.config import validate
from m2mdc.distill.losses import preset_terms, terms_from_config
from tests.conftest import run_cli


def _row(terms):
    return [(t.name, t.weight, t.ramped, t.temperature) for t in terms]


def _terms(cfg):
    return _row(terms_from_config(cfg.kd))


def test_default_recipe_is_oneshot_slicing_with_the_staged_cosine_loss(compose_cfg):
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.slice.schedule == "oneshot" and cfg.kd.name == "staged_cosine"
    assert cfg.kd.lr_schedule == "cosine" and cfg.teacher.lr_schedule == "constant"
    assert _terms(cfg) == _row(preset_terms(cfg.kd.name, 0.1, 0.1))


def test_kl_preset_is_ce_plus_unramped_kl(compose_cfg):
    cfg = compose_cfg("kd=kl")
    validate(cfg)
    # CE + T^2 KL at kd.temperature, both at full weight from the first epoch
    assert _terms(cfg) == [("ce", 1.0, False, None), ("kl", 1.0, False, None)]
    assert cfg.kd.temperature == 4.0


def test_paper_recipe_is_progressive_slicing_with_the_staged_cosine_loss(compose_cfg):
    cfg = compose_cfg("recipe=paper")
    validate(cfg)
    assert cfg.slice.schedule == "progressive" and cfg.kd.name == "staged_cosine"
    assert cfg.kd.lr_schedule == "constant"
    assert _terms(cfg) == _row(preset_terms(cfg.kd.name, 0.1, 0.1))


def test_budget_recipe_is_the_default_with_the_allocator_over_every_stage(compose_cfg):
    cfg = compose_cfg("recipe=budget")
    validate(cfg)
    assert cfg.slice.schedule == "oneshot" and cfg.kd.name == "staged_cosine"
    assert cfg.slice.include_first_stage is True and cfg.budget.macs == 0.34
    assert cfg.kd.lr_schedule == "cosine"
    assert compose_cfg("recipe=budget", "budget.macs=0.25").budget.macs == 0.25


@pytest.mark.parametrize("model", ["resnet18", "resnet34", "mobilenetv2"])
def test_paper_experiments_use_the_paper_recipe(compose_cfg, model):
    cfg = compose_cfg(f"experiment=paper_{model}")
    assert cfg.slice.schedule == "progressive" and cfg.kd.name == "staged_cosine"
    assert cfg.kd.lr_schedule == "constant"


@pytest.mark.parametrize(
    ("overrides", "kd", "schedule"),
    [
        (["kd=kl"], "kl", "oneshot"),
        (["recipe=paper", "kd=kl"], "kl", "progressive"),
        (["recipe=paper", "slice.schedule=oneshot"], "staged_cosine", "oneshot"),
        (["experiment=paper_resnet18", "recipe=m2mdc"], "staged_cosine", "oneshot"),
    ],
)
def test_explicit_choices_override_the_recipe(compose_cfg, overrides, kd, schedule):
    cfg = compose_cfg(*overrides)
    assert (cfg.kd.name, cfg.slice.schedule) == (kd, schedule)


def test_the_recipes_lr_schedule_survives_another_kd_preset_and_yields_to_the_cli(compose_cfg):
    assert compose_cfg("kd=kl").kd.lr_schedule == "cosine"  # the preset sets the loss only
    assert compose_cfg("kd.lr_schedule=constant").kd.lr_schedule == "constant"
    assert compose_cfg("recipe=paper", "kd.lr_schedule=cosine").kd.lr_schedule == "cosine"


def test_unknown_recipe_is_a_one_line_error(tmp_path):
    proc = run_cli("run", "recipe=fast", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "m2mdc: error: recipe=fast is not a valid choice; choose one of: budget, m2mdc, paper"
    )
    assert not (tmp_path / "outputs").exists()
