"""The generic adapter on the families people ask for: what it removes, what it slices, what
it refuses, and that every edit rebuilds exactly from the checkpoint description.

Expected depths are the libraries' own definitions (torchvision's ResNet-50 is 3-4-6-3
Bottlenecks, ConvNeXt-T 3-3-9-3 CNBlocks, EfficientNet-B0 1-2-2-3-3-4-1 MBConvs, ...).
"""

from __future__ import annotations

import pytest
import torch

from m2mdc.arch import get_adapter
from m2mdc.errors import M2MError
from m2mdc.profiling import count_macs
from m2mdc.slicing import plan_slice

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

# name -> (blocks per stage, mid groups per sliceable block, mid groups refused because ...)
FAMILIES = {
    "torchvision:resnet50": ((3, 4, 6, 3), 2, None),
    "torchvision:resnext50_32x4d": ((3, 4, 6, 3), 0, "grouped conv"),
    "torchvision:regnet_y_400mf": ((1, 3, 6, 6), 0, "grouped conv"),
    "torchvision:mobilenet_v3_large": ((1, 2, 3, 4, 2, 3), 1, None),
    "torchvision:efficientnet_b0": ((1, 2, 2, 3, 3, 4, 1), 1, None),
    "timm:resnet18": ((2, 2, 2, 2), 1, None),
}


def _drop_last_free(ad, model):
    """keep_cfg without the last removable block of every stage that has one."""
    keep = {s: list(v) for s, v in model.m2mdc_arch["keep"].items()}
    free = {b.stage: b.orig_index for b in ad.blocks(model) if not b.protected}  # the last
    for stage, orig in free.items():
        if len(keep[stage]) > 1:
            keep[stage].remove(orig)
    return keep


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_removes_slices_and_rebuilds(name):
    depths, mids_per_block, refused = FAMILIES[name]
    ad = get_adapter(name)
    torch.manual_seed(0)
    model = ad.create(name, 10).eval()
    blocks = ad.blocks(model)
    stages = ad.stages(model)
    assert tuple(sum(b.stage == s for b in blocks) for s in stages) == depths
    # the first block of a stage is protected exactly when it changes width or resolution
    assert all(not b.protected for b in blocks if b.index > 0)
    student = ad.keep(model, _drop_last_free(ad, model))
    assert len(ad.blocks(student)) < len(blocks)
    plan = plan_slice(student, 0.5, 0.5, stages=ad.plane_stages(student))
    assert set(plan.planes) == set(ad.plane_stages(student)) and plan.planes
    sliceable = [b for b in ad.blocks(student) if b.stage in plan.planes]
    assert len(plan.mid) == mids_per_block * len(sliceable)
    if refused:
        st = ad._st(model)  # why the mid groups are not sliced
        assert any(refused in why for why in st.unsliced.values()) and not st.mids
    sliced = ad.slice(student, plan)
    assert count_macs(sliced, 64)["macs"] < count_macs(student, 64)["macs"]
    rebuilt = ad.build(ad.arch(sliced))
    rebuilt.load_state_dict(sliced.state_dict())
    torch.testing.assert_close(rebuilt.eval()(X), sliced.eval()(X), rtol=0, atol=0)


def test_convnext_removes_blocks_but_slicing_is_refused(compose_cfg):
    """ConvNeXt: LayerNorm and Linear, no BatchNorm for the selectors to rank: blocks (all
    residual, layer scale and stochastic depth included) are removable, slicing is refused."""
    from m2mdc.structure import check_model

    name = "torchvision:convnext_tiny"
    ad = get_adapter(name)
    model = ad.create(name, 10).eval()
    blocks = ad.blocks(model)
    assert [sum(b.stage == s for b in blocks) for s in ad.stages(model)] == [3, 3, 9, 3]
    assert not any(b.protected for b in blocks)
    student = ad.keep(model, _drop_last_free(ad, model))
    assert len(ad.blocks(student)) == len(blocks) - 4
    assert ad.plane_stages(student, include_first=True) == []
    assert ad.widths(student) == {"planes": {}, "mid": {}}
    cfg = compose_cfg("model=auto", "model.name=convnext_tiny")
    with pytest.raises(M2MError, match=r"^slice=planes_mid: .*convnext_tiny.*set slice=none$"):
        check_model(cfg)
    check_model(compose_cfg("model=auto", "model.name=convnext_tiny", "slice=none"))


def test_vgg_without_residual_blocks_is_refused_in_one_line(compose_cfg):
    """VGG has no residual block: m2mdc's block removal and residual-stream stages do not
    apply, so the model is refused up front rather than run with nothing to compress."""
    from m2mdc.structure import check_model

    with pytest.raises(M2MError, match=r"^model.name=vgg11: .* has no residual block"):
        check_model(compose_cfg("model=auto", "model.name=vgg11"))


def test_bad_source_and_name_are_refused_with_the_choices(compose_cfg):
    from m2mdc.structure import check_model

    with pytest.raises(M2MError, match=r"^model.source='keras' is not valid; choose one of: m2mdc"):
        check_model(compose_cfg("model=auto", "model.source=keras", "model.name=resnet50"))
    with pytest.raises(M2MError, match=r"^model.name='resnet5' is not a torchvision model; .*"):
        check_model(compose_cfg("model=auto", "model.name=resnet5"))
    with pytest.raises(M2MError, match=r"model=auto model.source=torchvision\|timm"):
        check_model(compose_cfg("model.name=resnet50"))


def test_channel_decay_at_zero_equals_the_sliced_bottleneck_model():
    """The gradual schedule's soft masks reach every BN of a group, the two mid groups of a
    Bottleneck included: at factor 0 the masked model computes what the sliced one does."""
    from m2mdc.slicing import ChannelDecay

    name = "torchvision:resnet50"
    ad = get_adapter(name)
    torch.manual_seed(0)
    model = ad.create(name, 10).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 1.0)
            m.bias.data.uniform_(-0.5, 0.5)
    plan = plan_slice(model, 0.5, 0.5, stages=ad.plane_stages(model))
    assert {k.rsplit(".", 1)[1] for k in plan.mid} == {"conv1", "conv2"}
    decay = ChannelDecay(model, plan, total_steps=1)
    decay.advance()
    masked = model(X)
    decay.remove()
    torch.testing.assert_close(masked, ad.slice(model, plan).eval()(X), rtol=1e-4, atol=1e-4)


def test_torch_pruning_peer_of_convnext_reloads_from_its_checkpoint(tmp_path):
    """The Torch-Pruning peer prunes ConvNeXt's LayerNorms and layer scales too; its checkpoint
    is rebuilt from ``arch`` and resized to the saved tensors (LayerNorm2d stays LayerNorm2d)."""
    from torchvision.models.convnext import LayerNorm2d

    from m2mdc.artifacts import load_checkpoint, save_checkpoint
    from m2mdc.peers import prune_uniform

    name = "torchvision:convnext_tiny"
    model = get_adapter(name).create(name, 10).eval()
    peer = prune_uniform(model, 0.3, 32)
    peer.m2mdc_arch["resized_by"] = "torch_pruning"  # as the compare stage records it
    assert peer.features[1][0].layer_scale.shape[0] < 96
    save_checkpoint(tmp_path / "model.pt", peer)
    loaded, _ = load_checkpoint(tmp_path / "model.pt")
    assert isinstance(loaded.features[0][1], LayerNorm2d)
    torch.testing.assert_close(loaded(X), peer(X), rtol=0, atol=0)


def test_last_third_unfreezes_the_last_third_of_the_blocks_and_the_head():
    """``teacher.unfreeze=last_third`` on a generic model: ResNet-50 has 16 blocks, so the
    last 5 (layer3.4, layer3.5, layer4.*) and everything after them (fc) train."""
    from m2mdc.arch.zoo import apply_unfreeze

    name = "torchvision:resnet50"
    model = get_adapter(name).create(name, 10)
    trainable = apply_unfreeze(model, "last_third")
    expected = ("layer3.4.", "layer3.5.", "layer4.", "fc.")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(expected) for n in names)
    assert trainable == sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(expected)
    )
