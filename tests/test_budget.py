"""MAC-budget allocator: block ratio and keep fractions chosen to meet budget.macs."""

from __future__ import annotations

import json
import random

import pytest

from m2mdc import budget
from m2mdc.arch import get_adapter
from m2mdc.arch.zoo import create_model
from m2mdc.profiling import count_macs
from tests.conftest import run_cli


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "mobilenet_v2"])
def test_chosen_plan_hits_the_budget(name):
    teacher = create_model(name, 10).eval()
    blocks = get_adapter(teacher).blocks(teacher)
    rnd = random.Random(0)
    scores = {b.name: rnd.random() for b in blocks}
    teacher_macs = count_macs(teacher, 32)["macs"]
    target = budget.target_macs(0.45, teacher_macs)
    assert target == round(0.45 * teacher_macs)
    found, _ = budget.search(
        teacher, blocks, scores, target, 32, ratios=[0.2], policy="planes_mid", tolerance=0.02
    )
    assert {c.shape for c in found} == {"planes_mid", "mid", "planes"}
    choice, ranked = budget.choose(found, proxy=lambda c: -abs(c.planes_keep - 0.5))
    # rebuild the chosen student from its recorded settings and count its MACs afresh
    student = budget.shaped_student(teacher, choice.keep_cfg, choice.planes_keep, choice.mid_keep)
    macs = count_macs(student, 32)["macs"]
    assert macs == choice.macs and abs(macs - target) <= 0.02 * target
    assert [c.proxy_top1 for c in ranked] == sorted((c.proxy_top1 for c in ranked), reverse=True)
    removed = [b for b in blocks if b.orig_index not in choice.keep_cfg[b.stage]]
    assert not any(b.protected for b in removed)


def test_proxy_ties_prefer_fewer_macs():
    make = budget.Candidate
    a = make(0.0, "mid", 1.0, 0.5, 1000, {})
    b = make(0.2, "planes", 0.5, 1.0, 900, {})
    c = make(0.4, "planes_mid", 0.6, 0.6, 950, {})
    choice, ranked = budget.choose([a, b, c], proxy=lambda x: {1000: 50, 900: 50, 950: 40}[x.macs])
    assert choice is b and ranked == [b, a, c]


def test_unreachable_budget_names_the_closest_candidate():
    teacher = create_model("resnet18", 10).eval()
    blocks = get_adapter(teacher).blocks(teacher)
    scores = {b.name: float(i) for i, b in enumerate(blocks)}
    target = 10_000  # below anything uniform slicing down to 2% can reach
    found, missed = budget.search(
        teacher, blocks, scores, target, 32, ratios=[0.0], policy="mid", tolerance=0.02
    )
    assert not found and missed
    err = budget.no_candidate_error(target, 0.02, missed)
    assert "no candidate reaches 10,000 MACs within 2%; closest:" in str(err)


def test_budget_and_keep_cfg_together_are_refused(tmp_path):
    from tests.test_e2e import TINY

    run = tmp_path / "run"
    proc = run_cli(
        "run", *TINY, "budget.macs=0.4", "prune.keep_cfg={layer1:[0]}", f"hydra.run.dir={run}",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "budget.macs and prune.keep_cfg both choose the blocks" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["recipe=m2mdc", "recipe=budget"])
def test_run_with_a_budget_lands_the_inner_slice_on_it(tmp_path, stage_cache, recipe):
    from tests.test_e2e import TINY, _ok

    run = tmp_path / "run"
    args = [*TINY, recipe, "budget.macs=0.3", f"cache_dir={stage_cache}"]  # the teacher: cached
    _ok(run_cli("run", *args, f"hydra.run.dir={run}", cwd=tmp_path))
    plan = json.loads((run / "prune" / "plan.json").read_text())["budget"]
    rows = {r["model"]: r for r in json.loads((run / "summary.json").read_text())["rows"]}
    target = round(0.3 * rows["teacher"]["macs"])
    assert plan["target_macs"] == target and len(plan["candidates"]) >= 1
    assert all(c["proxy_top1"] is not None for c in plan["candidates"])
    # the slice stage, not the allocator, built this model: its MACs must meet the budget
    assert abs(rows["inner_slice"]["macs"] - target) <= 0.02 * target
    assert plan["choice"]["macs"] == rows["inner_slice"]["macs"]
