"""compare=torch_pruning: the Torch-Pruning peer at the inner_slice student's MACs."""

from __future__ import annotations

import sys

import pytest
import torch

from m2mdc import peers
from m2mdc.arch.zoo import create_model
from m2mdc.artifacts import load_checkpoint, save_checkpoint
from m2mdc.errors import M2MError
from m2mdc.profiling import count_macs, count_params

pytest.importorskip("torch_pruning")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_pruned_peer_round_trips_through_the_checkpoint_contract(name, tmp_path):
    torch.manual_seed(0)
    teacher = create_model(name, 10).eval()
    pruned = peers.prune_uniform(teacher, 0.4, 32, "l1").eval()
    assert count_params(pruned) < count_params(teacher)
    pruned.m2mdc_arch["resized_by"] = "torch_pruning"
    save_checkpoint(tmp_path / "model.pt", pruned)
    loaded, _ = load_checkpoint(tmp_path / "model.pt", expect_model=name, expect_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert count_params(loaded) == count_params(pruned)


def test_bisection_meets_the_mac_target_within_tolerance():
    teacher = create_model("resnet18", 10).eval()
    base = count_macs(teacher, 32)["macs"]
    for fraction in (0.6, 0.3):
        target = int(fraction * base)
        ratio, macs, _ = peers.bisect_ratio(teacher, target, 32, 0.02)
        assert abs(macs - target) <= 0.02 * target
        # the reported MACs are those of the model pruned at the reported ratio
        assert count_macs(peers.prune_uniform(teacher, ratio, 32), 32)["macs"] == macs


def test_unreachable_target_is_a_clear_error():
    teacher = create_model("resnet18", 10).eval()
    with pytest.raises(M2MError, match="no uniform Torch-Pruning ratio"):
        peers.bisect_ratio(teacher, 1000, 32, 0.02)  # far below any 0.95-ratio model


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails
    with pytest.raises(M2MError, match=r"pip install 'm2mdc\[peers\]'"):
        peers.prune_uniform(create_model("resnet18", 10), 0.5, 32)


def test_peer_terms_are_validated(compose_cfg):
    from m2mdc.config import validate

    validate(compose_cfg("compare=torch_pruning", "peer.importance=taylor"))
    with pytest.raises(M2MError, match=r"peer.importance='fisher' is not valid"):
        validate(compose_cfg("peer.importance=fisher"))
    with pytest.raises(M2MError, match=r"peer.terms\[0\].name='kll' is not valid"):
        validate(compose_cfg("peer.terms=[{name:kll}]"))
