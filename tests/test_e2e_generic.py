"""End-to-end: ``m2mdc run`` on models of the generic adapter (``model=auto``), tiny digits.

- torchvision ResNet-50 (Bottleneck: two mid groups per block) with the default recipe;
- torchvision EfficientNet-B0 (squeeze-excitation, stochastic depth) through the MAC-budget
  allocator (``recipe=budget``);
- timm's ResNet-18 with the Torch-Pruning peer (``compare=torch_pruning``).

Every checkpoint is read back through its recorded ``arch`` (``weights_only=True``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m2mdc.arch import get_adapter
from m2mdc.artifacts import load_checkpoint
from m2mdc.profiling import count_macs
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

TINY = [
    "dataset.limit_train=128",
    "dataset.limit_test=64",
    "dataset.batch_size=32",
    "teacher.epochs=1",
    "kd.epochs=1",
    "score.probe_samples=64",
    "prune.bn_recal_batches=2",
    "profile.latency=false",
    "slice.repair_epochs=1",
]


def _run(tmp_path: Path, *overrides: str) -> Path:
    run = tmp_path / "run"
    proc = run_cli("run", *TINY, *overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return run


def _rows(run: Path) -> dict:
    return {r["model"]: r for r in json.loads((run / "summary.json").read_text())["rows"]}


def test_resnet50_runs_end_to_end_with_two_mid_groups_per_bottleneck(tmp_path):
    run = _run(tmp_path, "model=auto", "model.name=resnet50")
    student, _ = load_checkpoint(run / "slice" / "model.pt")
    arch = student.m2mdc_arch
    assert (arch["family"], arch["source"], arch["name"]) == (
        "generic",
        "torchvision",
        "torchvision:resnet50",
    )
    plan = json.loads((run / "slice" / "plan.json").read_text())
    mids = [k for step in plan["steps"] for k in step["mid"]]
    assert mids and {k.rsplit(".", 1)[1] for k in mids} == {"conv1", "conv2"}
    teacher, _ = load_checkpoint(run / "teacher" / "model.pt")
    assert count_macs(student, 32)["macs"] < count_macs(teacher, 32)["macs"]
    ad = get_adapter(student)
    assert len(ad.blocks(student)) < len(ad.blocks(teacher))  # prune removed blocks


def test_efficientnet_b0_runs_through_the_mac_budget_allocator(tmp_path):
    run = _run(
        tmp_path,
        "model=auto",
        "model.name=efficientnet_b0",
        "recipe=budget",
        "slice=planes",  # one shape to bisect: every trial is a sliced student to count
        "slice.repair_epochs=0",  # the budget recipe slices all 7 stages: no repair epochs
        "budget.macs=0.5",
        "budget.ratios=[0.2]",  # one block ratio: every candidate is a sliced student to count
        "budget.tolerance=0.1",
        "budget.proxy_samples=32",
        "budget.proxy_batches=1",
    )
    choice = json.loads((run / "prune" / "plan.json").read_text())["budget"]["choice"]
    rows = _rows(run)
    target = 0.5 * rows["teacher"]["macs"]
    assert abs(rows["inner_slice"]["macs"] - target) <= 0.1 * target
    assert choice["macs"] == rows["inner_slice"]["macs"]


def test_timm_resnet18_runs_with_the_torch_pruning_peer(tmp_path):
    pytest.importorskip("timm")
    run = _run(
        tmp_path, "model=auto", "model.source=timm", "model.name=resnet18", "compare=torch_pruning"
    )
    rows = _rows(run)
    peer, _ = load_checkpoint(run / "peer_torch_pruning" / "model.pt")
    assert peer.m2mdc_arch["name"] == "timm:resnet18"
    assert rows["peer_torch_pruning"]["macs"] == count_macs(peer, 32)["macs"]
    assert abs(rows["peer_torch_pruning"]["macs"] / rows["inner_slice"]["macs"] - 1) <= 0.02
