"""End-to-end on a CIFAR ResNet: `m2mdc profile` reports the closed-form compute of resnet56, and
`m2mdc run model=resnet20` (with the Torch-Pruning peer) on the bundled digits data."""

from __future__ import annotations

import json

import pytest

from m2mdc.artifacts import load_checkpoint
from tests.arch.test_cifar_resnet import EXACT, cifar_resnet_counts
from tests.conftest import run_cli
from tests.test_e2e import TINY, _ok

pytestmark = pytest.mark.slow

# every free (non-transition) block of a CIFAR ResNet has two 3x3 convs of c -> c channels at
# hw x hw, and (c, hw) is (16, 32), (32, 16) or (64, 8): the same MACs in every stage
FREE_BLOCK_MACS = 2 * 9 * 16 * 16 * 32 * 32
assert FREE_BLOCK_MACS == 2 * 9 * 32 * 32 * 16 * 16 == 2 * 9 * 64 * 64 * 8 * 8 == 4_718_592


def test_profile_reports_the_closed_form_compute_of_resnet56(tmp_path):
    proc = run_cli(
        "profile",
        "model=resnet56",
        "dataset=fake",
        "dataset.num_classes=10",
        "profile.input_size=32",
        "profile.latency=false",
        "prune.keep_cfg={layer1:[0],layer2:[0],layer3:[0]}",
        f"hydra.run.dir={tmp_path / 'p'}",
        cwd=tmp_path,
    )
    _ok(proc)
    models = json.loads((tmp_path / "p" / "profile" / "metrics.json").read_text())["models"]
    assert (models["resnet56"]["params"], models["resnet56"]["macs"]) == (855_770, 125_747_840)
    assert (855_770, 125_747_840) == cifar_resnet_counts(9, "B") == EXACT["resnet56"]
    # one block per stage left: exactly the n = 1 network
    assert (models["keep_cfg"]["params"], models["keep_cfg"]["macs"]) == cifar_resnet_counts(1, "B")
    assert models["resnet56"]["macs"] - models["keep_cfg"]["macs"] == 3 * 8 * FREE_BLOCK_MACS


def test_resnet20_run_slices_below_block_kd_and_trains_the_torch_pruning_peer(tmp_path):
    pytest.importorskip("torch_pruning")
    run_dir = tmp_path / "r20"
    # resnet20's narrow stages (16, 32, 64 channels) move a uniform Torch-Pruning ratio's MACs
    # in steps of up to 12% (16.05M -> 14.18M between ratios 0.36 and 0.378 here): 2% (the
    # default peer.mac_tolerance) can fall between two steps, 5% cannot at this student
    args = ("model=resnet20", "dataset.image_size=32", "compare=[torch_pruning]")
    tolerance = 0.05
    _ok(
        run_cli(
            "run",
            *args,
            *TINY,
            f"peer.mac_tolerance={tolerance}",
            f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
            env={"OMP_NUM_THREADS": "1"},
        )
    )
    plan = json.loads((run_dir / "prune" / "plan.json").read_text())
    assert set(plan["protected"]) == {"layer2.0", "layer3.0"}
    assert len(plan["removed"]) == 2  # floor(0.4 * 7 free blocks: 3 + 2 + 2)
    assert all(plan["keep_cfg"][s] for s in ("layer1", "layer2", "layer3"))

    rows = {r["model"]: r for r in json.loads((run_dir / "summary.json").read_text())["rows"]}
    assert rows["teacher"]["macs"] == EXACT["resnet20"][1]
    assert rows["block_kd"]["macs"] == EXACT["resnet20"][1] - 2 * FREE_BLOCK_MACS
    assert rows["inner_slice"]["macs"] < rows["block_kd"]["macs"]
    model, _ = load_checkpoint(run_dir / "slice" / "model.pt")
    assert rows["inner_slice"]["params"] == sum(p.numel() for p in model.parameters())
    widths = model.m2mdc_arch["widths"]["planes"]
    assert widths == {"layer1": 16, "layer2": 16, "layer3": 32}  # layer2-3 at 0.5

    peer = json.loads((run_dir / "peer_torch_pruning" / "metrics.json").read_text())
    target = rows["inner_slice"]["macs"]
    assert peer["target_macs"] == target and abs(peer["macs"] - target) <= tolerance * target
    kd_epochs = len(json.loads((run_dir / "distill" / "metrics.json").read_text())["epochs"])
    assert peer["student_epochs"]["total"] == len(peer["epochs"]) == kd_epochs + 2  # 2 repairs
    assert rows["peer_torch_pruning"]["macs"] == peer["macs"]
