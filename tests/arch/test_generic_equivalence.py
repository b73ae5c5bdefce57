"""The generic adapter (read from the graph) against the hand-written ones (the oracles).

On resnet18, resnet34 and mobilenet_v2 both adapters see one torchvision model with the same
weights, and must agree on the blocks (names, stages, protection), the stages, the channel
groups (their widths and producers), the MACs after equal keep fractions, and the logits after
slicing with the same channel indices.

Where they differ, by design:
- a mid group's key: the hand-written adapters key it by the block (``layer1.0``), the generic
  one by the conv producing it (``layer1.0.conv1``), since a block may hold several
  (Bottleneck: two); :func:`_mid_key` maps one onto the other;
- after blocks are removed the hand-written adapters renumber the survivors (``layer1.1``
  becomes ``layer1.0``); the generic one replaces a removed block by ``nn.Identity`` at its own
  path, so the survivors keep the teacher's names: blocks are matched by (stage, orig_index);
- ``widths()["mid"]``: MobileNetV2's hand-written adapter also lists the expansion-1 block
  (``features.1``: its depthwise width, the stem's output, which it never slices); the generic
  one lists only the groups it can slice (that one belongs to the stem, outside any block);
- the producers of a stage's planes are the same modules, listed in module order by the
  generic adapter (the downsample after the first block's conv2) and stem/downsample first by
  the hand-written one: the selectors average over producers, so the choice is the same.
"""

from __future__ import annotations

import pytest
import torch

from m2mdc.arch import SlicePlan, get_adapter
from m2mdc.artifacts import load_checkpoint, save_checkpoint
from m2mdc.profiling import count_macs
from m2mdc.slicing import plan_slice

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
NAMES = ("resnet18", "resnet34", "mobilenet_v2")


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    """(hand-written model, generic model) of one torchvision model with the same weights."""
    name = request.param
    torch.manual_seed(0)
    hand = get_adapter(name).create(name, 10).eval()
    for m in hand.modules():  # distinct BN statistics and scales: the selectors see real choices
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 1.0)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    gen = get_adapter(f"torchvision:{name}").create(f"torchvision:{name}", 10).eval()
    gen.load_state_dict(hand.state_dict())
    return hand, gen


def _paths(model, modules):
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(m)] for m in modules]


def _blocks(model):
    return [(b.stage, b.orig_index, b.protected) for b in get_adapter(model).blocks(model)]


def _by_orig(model):
    return {(b.stage, b.orig_index): b.name for b in get_adapter(model).blocks(model)}


def _mid_key(hand, gen, key):
    """The generic mid-group key of the hand-written adapter's block ``key``."""
    ref = next(b for b in get_adapter(hand).blocks(hand) if b.name == key)
    block = _by_orig(gen)[(ref.stage, ref.orig_index)]
    (only,) = get_adapter(gen).mid_groups(gen, block)  # one mid group per block here
    return only


def test_same_blocks_stages_and_protection(pair):
    hand, gen = pair
    ha, ga = get_adapter(hand), get_adapter(gen)
    assert ga.family == "generic" and ha.family != "generic"
    assert ga.stages(gen) == ha.stages(hand)
    assert _blocks(gen) == _blocks(hand)
    assert [b.name for b in ga.blocks(gen)] == [b.name for b in ha.blocks(hand)]  # teacher


def test_same_channel_groups_and_producers(pair):
    hand, gen = pair
    ha, ga = get_adapter(hand), get_adapter(gen)
    hw, gw = ha.widths(hand), ga.widths(gen)
    assert gw["planes"] == hw["planes"]
    sliceable = {k: w for k, w in hw["mid"].items() if ha.mid_producers(hand, k) is not None}
    assert gw["mid"] == {_mid_key(hand, gen, k): w for k, w in sliceable.items()}
    assert ga.plane_stages(gen) == ha.plane_stages(hand)
    for stage in ha.stages(hand):
        h = sorted(_paths(hand, [m for pair in ha.plane_producers(hand, stage) for m in pair]))
        g = sorted(_paths(gen, [m for pair in ga.plane_producers(gen, stage) for m in pair]))
        assert g == h, stage
    for b in ha.blocks(hand):
        prod = ha.mid_producers(hand, b.name)
        keys = ga.mid_groups(gen, b.name)
        assert (prod is None) == (keys == []), b.name
        if prod is not None:
            assert _paths(gen, ga.mid_producers(gen, keys[0])) == _paths(hand, prod)


@pytest.mark.parametrize("fraction", [0.5, 0.75])
def test_same_macs_and_logits_after_keep_and_slice(pair, fraction):
    hand, gen = pair
    ha, ga = get_adapter(hand), get_adapter(gen)
    free = [b for b in ha.blocks(hand) if not b.protected]
    drop = {(free[0].stage, free[0].orig_index), (free[-1].stage, free[-1].orig_index)}
    keep = {s: [o for o in v if (s, o) not in drop] for s, v in hand.m2mdc_arch["keep"].items()}
    hk, gk = ha.keep(hand, keep), ga.keep(gen, keep)
    assert _blocks(gk) == _blocks(hk)
    assert count_macs(gk, 32) == count_macs(hk, 32)
    torch.testing.assert_close(gk(X), hk(X), rtol=0, atol=0)
    stages = ha.plane_stages(hk)
    plan = plan_slice(hk, fraction, fraction, stages=stages, selector="bn_l1")
    assert plan.planes and plan.mid
    same = SlicePlan(
        planes=dict(plan.planes), mid={_mid_key(hk, gk, k): v for k, v in plan.mid.items()}
    )
    assert plan_slice(gk, fraction, fraction, stages=stages, selector="bn_l1") == same
    hs, gs = ha.slice(hk, plan), ga.slice(gk, same)
    assert count_macs(gs, 32) == count_macs(hs, 32)
    assert count_macs(gs, 32)["macs"] < count_macs(gk, 32)["macs"]
    torch.testing.assert_close(gs(X), hs(X), rtol=1e-5, atol=1e-5)
    assert gs.state_dict().keys() == gk.state_dict().keys()  # sliced in place, same names


def test_generic_checkpoint_rebuilds_exactly_with_weights_only(pair, tmp_path):
    _, gen = pair
    ga = get_adapter(gen)
    free = [b for b in ga.blocks(gen) if not b.protected]
    keep = {s: list(v) for s, v in gen.m2mdc_arch["keep"].items()}
    keep[free[-1].stage].remove(free[-1].orig_index)
    student = ga.keep(gen, keep)
    student = ga.slice(student, plan_slice(student, 0.5, 0.5, stages=ga.plane_stages(student)))
    path = tmp_path / "model.pt"
    save_checkpoint(path, student)
    loaded, _ = load_checkpoint(path)  # weights_only=True inside (safe_torch_load)
    assert loaded.m2mdc_arch == student.m2mdc_arch
    assert loaded.m2mdc_arch["source"] == "torchvision"
    torch.testing.assert_close(loaded(X), student.eval()(X), rtol=0, atol=0)
