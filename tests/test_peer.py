"""compare=torch_pruning: the Torch-Pruning peer at the inner_slice student's MACs."""

from __future__ import annotations

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


def test_a_target_between_two_steps_names_both_and_the_tolerance_that_reaches_them():
    """A uniform ratio moves ResNet-20's MACs in steps (its 16-, 32- and 64-channel groups all
    lose a channel at multiples of 1/128 at most): a target in the middle of the widest step is
    refused with both neighbours, and the tolerance the message names then matches."""
    import itertools
    import math
    import re

    teacher = create_model("resnet20", 10).eval()
    grid = [0.40 + (i + 0.5) / 128 for i in range(20)]  # one ratio between every two steps
    levels = sorted({count_macs(peers.prune_uniform(teacher, r, 32), 32)["macs"] for r in grid})
    lo, hi = max(itertools.pairwise(levels), key=lambda p: p[1] / p[0])
    target = round(math.sqrt(lo * hi))
    assert hi / target - 1 > 0.02 and 1 - lo / target > 0.02  # no level within 2%
    with pytest.raises(M2MError) as err:
        peers.bisect_ratio(teacher, target, 32, 0.02)
    msg = str(err.value)
    assert f"{hi:,} (+" in msg and f"{lo:,} (-" in msg and "\n" not in msg
    need = math.ceil(min(hi / target - 1, 1 - lo / target) * 100) / 100
    assert f"set peer.mac_tolerance={need:g} or more" in msg
    said = float(re.search(r"peer.mac_tolerance=([0-9.]+)", msg).group(1))
    _, macs, _ = peers.bisect_ratio(teacher, target, 32, said)
    assert macs in (lo, hi) and abs(macs - target) <= said * target


def test_peer_terms_are_validated(compose_cfg):
    from m2mdc.config import validate

    validate(compose_cfg("compare=torch_pruning", "peer.importance=taylor"))
    with pytest.raises(M2MError, match=r"peer.importance='fisher' is not valid"):
        validate(compose_cfg("peer.importance=fisher"))
    with pytest.raises(M2MError, match=r"peer.terms\[0\].name='kll' is not valid"):
        validate(compose_cfg("peer.terms=[{name:kll}]"))


# the latency match: ResNet-18 at 16x16 against a student that kept one block per stage (and
# 70% of its channels); at batch 1 a layer's fixed cost dominates at this size
LATENCY_SIZE = 16
# how far a fresh interleaved measurement of one model pair can move on a shared CPU: repeated
# measurements of the same pair (300 rounds each) spread by up to about +-10% under load
LATENCY_NOISE = 0.10


def test_latency_match_lands_within_its_tolerance():
    from m2mdc import budget
    from m2mdc.profiling import measure_latencies

    torch.manual_seed(0)
    teacher = create_model("resnet18", 10).eval()
    keep = {"layer1": [0], "layer2": [0], "layer3": [0], "layer4": [0]}
    student = budget.shaped_student(teacher, keep, 0.7, 0.7).eval()
    best, trials = peers.match_latency(teacher, student, LATENCY_SIZE, 0.05, repeats=100)

    assert trials[0]["ratio"] == peers.MAX_RATIO  # the fastest peer is timed first
    assert best in trials and abs(best["latency_ratio"] - 1) <= 0.05  # as the stage measured it
    peer = peers.prune_uniform(teacher, best["ratio"], LATENCY_SIZE)
    assert best["macs"] == count_macs(peer, LATENCY_SIZE)["macs"]
    # measured again, interleaved, the way the profile and summary.json measure them
    lat = measure_latencies({"peer": peer, "student": student}, LATENCY_SIZE, repeats=300)
    ratio = lat["peer"]["latency_ms"] / lat["student"]["latency_ms"]
    assert abs(ratio - 1) <= 0.05 + LATENCY_NOISE, ratio
    # it keeps all its layers, so it runs as fast as the student only with fewer MACs
    assert best["macs"] < count_macs(student, LATENCY_SIZE)["macs"]


def test_latency_out_of_reach_is_a_clear_error():
    from tests.conftest import tiny_classifier

    teacher = create_model("resnet18", 10).eval()
    student = tiny_classifier().eval()  # one conv: faster than any ResNet-18, however thin
    with pytest.raises(M2MError) as err:
        peers.match_latency(teacher, student, LATENCY_SIZE, 0.05, repeats=20)
    message = str(err.value)
    assert "\n" not in message
    assert "student" in message and "is faster than any uniform Torch-Pruning peer" in message
    assert "drop latency from peer.match" in message


def test_peer_match_defaults_keep_the_mac_peers_fingerprint(compose_cfg, tmp_path):
    """``peer.match=[macs]`` (the default) and the latency settings at their defaults leave
    the MAC-matched peer's fingerprint as it was before these settings existed."""
    from omegaconf import OmegaConf

    from m2mdc import stages  # noqa: F401  (registers the stages)
    from m2mdc.stage import Context

    def fingerprint(cfg, stage=peers.NAME):
        return Context(cfg, tmp_path).fingerprint(stage)

    cfg = compose_cfg("experiment=quickstart", "compare=torch_pruning")
    before = OmegaConf.to_container(cfg)  # the config as it was before peer.match existed
    for key in ("match", "latency_tolerance", "latency_repeats"):
        del before["peer"][key]
    assert fingerprint(OmegaConf.create(before)) == fingerprint(cfg)
    explicit = compose_cfg("experiment=quickstart", "compare=torch_pruning", "peer.match=[macs]")
    assert fingerprint(explicit) == fingerprint(cfg)
    # the latency peer's own settings are part of its fingerprint
    both = ("experiment=quickstart", "compare=torch_pruning", "peer.match=[macs,latency]")
    latency = fingerprint(compose_cfg(*both), peers.LATENCY_NAME)
    looser = compose_cfg(*both, "peer.latency_tolerance=0.1")
    assert fingerprint(looser, peers.LATENCY_NAME) != latency
    # and adding the latency peer to a finished run leaves the MAC peer's outputs valid
    assert fingerprint(compose_cfg(*both)) == fingerprint(looser) == fingerprint(cfg)


def test_peer_match_is_validated(compose_cfg):
    from m2mdc.config import validate

    validate(compose_cfg("compare=torch_pruning", "peer.match=[latency,macs]"))
    with pytest.raises(M2MError, match=r"peer.match\[1\]='flops' is not valid; choose one of"):
        validate(compose_cfg("peer.match=[macs,flops]"))
    with pytest.raises(M2MError, match=r"peer.match is empty; choose one or both of: macs"):
        validate(compose_cfg("peer.match=[]"))
