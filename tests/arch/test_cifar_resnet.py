"""The CIFAR ResNets (He et al. 2016, section 4.2): structure seen by the ResNet adapter, block
removal to one block per stage, and exact parameter and MAC counts at 32x32, 10 classes."""

from __future__ import annotations

import random

import pytest
import torch

from m2mdc.arch import get_adapter
from m2mdc.arch.zoo import create_model
from m2mdc.errors import M2MError
from m2mdc.profiling import count_macs, count_params
from m2mdc.pruning import keep_cfg_from_removals, select_removals

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
DEPTH = {"resnet20": 20, "resnet32": 32, "resnet56": 56, "resnet110": 110}


def blocks_per_stage(name: str) -> int:
    return (DEPTH[name] - 2) // 6  # depth 6n + 2: 2n 3x3 convs per stage, the stem, the fc


# ---- closed-form counts (written out from the architecture, independent of the code) ----------
def cifar_resnet_counts(n: int, shortcut: str, num_classes: int = 10) -> tuple[int, int]:
    """(params, MACs) at 32x32 of a CIFAR ResNet with n BasicBlocks per stage.

    Convolutions count k*k*c_in*c_out weights (no bias) and as many MACs per output pixel; BN
    has 2 parameters per channel and no MACs (m2mdc's counter); the fc has c_in*classes
    weights, classes biases and c_in*classes MACs. ``shortcut``: "A" (zero-padded identity, no
    weights: the paper's CIFAR models) or "B" (1x1 stride-2 conv + BN at a width change).
    """
    params = macs = 0

    def conv(cin: int, cout: int, k: int, hw: int) -> None:
        nonlocal params, macs
        params += k * k * cin * cout
        macs += k * k * cin * cout * hw * hw

    def bn(c: int) -> None:
        nonlocal params
        params += 2 * c

    conv(3, 16, 3, 32)  # stem: 3x3, 16 channels, 32x32 (no max-pool)
    bn(16)
    cin, hw = 16, 32
    for planes in (16, 32, 64):
        for i in range(n):
            hw_out = hw // 2 if i == 0 and planes != 16 else hw  # stride 2 entering 32 and 64
            conv(cin, planes, 3, hw_out)
            bn(planes)
            conv(planes, planes, 3, hw_out)
            bn(planes)
            if cin != planes and shortcut == "B":
                conv(cin, planes, 1, hw_out)
                bn(planes)
            cin, hw = planes, hw_out
    assert hw == 8
    params += 64 * num_classes + num_classes
    macs += 64 * num_classes
    return params, macs


# Option B adds the two 1x1 shortcut convs with their BNs, at every depth:
#   params (16*32 + 2*32) + (32*64 + 2*64) = 576 + 2,176 = 2,752
#   MACs   16*32 at 16x16 + 32*64 at 8x8 = 131,072 + 131,072 = 262,144
OPTION_B_EXTRA = (2_752, 262_144)
# m2mdc's models (option B) at 32x32, 10 classes: (params, MACs incl. the fc's 640)
EXACT = {
    "resnet20": (272_474, 40_813_184),
    "resnet32": (466_906, 69_124_736),
    "resnet56": (855_770, 125_747_840),
    "resnet110": (1_730_714, 253_149_824),
}


@pytest.mark.parametrize("name", list(DEPTH))
def test_params_and_macs_are_the_closed_form(name):
    n = blocks_per_stage(name)
    a, b = cifar_resnet_counts(n, "A"), cifar_resnet_counts(n, "B")
    assert (b[0] - a[0], b[1] - a[1]) == OPTION_B_EXTRA
    model = create_model(name, 10)
    got = count_macs(model, 32)
    assert (count_params(model), got["macs"]) == b == EXACT[name]
    assert got["macs"] - got["conv_macs"] == 64 * 10  # the classifier


def test_option_a_closed_form_reproduces_the_published_figures():
    """The published figures are for option A (identity shortcuts, zero-padded): the closed
    form above, without the shortcut convs, rounds to every one of them."""
    a = {name: cifar_resnet_counts(blocks_per_stage(name), "A") for name in DEPTH}
    # He et al. 2016, "Deep Residual Learning for Image Recognition", Table 6 (# params)
    assert round(a["resnet20"][0] / 1e6, 2) == 0.27
    assert round(a["resnet32"][0] / 1e6, 2) == 0.46
    assert round(a["resnet56"][0] / 1e6, 2) == 0.85
    assert round(a["resnet110"][0] / 1e6, 1) == 1.7
    # Li et al. 2017, "Pruning Filters for Efficient ConvNets", Table 1 (FLOP = MACs here):
    # ResNet-56 1.25E8, ResNet-110 2.53E8; Lin et al. 2020, "HRank", Tables 1 and 2:
    # ResNet-56 125.49M, ResNet-110 252.89M
    assert round(a["resnet56"][1] / 1e8, 2) == 1.25 and round(a["resnet56"][1] / 1e6, 2) == 125.49
    assert round(a["resnet110"][1] / 1e8, 2) == 2.53
    assert round(a["resnet110"][1] / 1e6, 2) == 252.89
    # ... so m2mdc's option-B ResNet-56 is 855,770 params / 125.75M MACs, not 0.85M / 125.49M
    assert a["resnet56"] == (853_018, 125_485_696)


# ---- structure --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_adapter_finds_three_stages_of_n_blocks_with_two_transitions(name):
    n = blocks_per_stage(name)
    model = create_model(name, 10).eval()
    ad = get_adapter(model)
    stages = ["layer1", "layer2", "layer3"]
    assert ad.stages(model) == stages
    blocks = ad.blocks(model)
    assert [(b.name, b.stage, b.orig_index) for b in blocks] == [
        (f"{s}.{i}", s, i) for s in stages for i in range(n)
    ]
    # the first block of layer2 and layer3 changes width and resolution: its 1x1 shortcut
    assert [b.name for b in blocks if b.protected] == ["layer2.0", "layer3.0"]
    assert sum(not b.protected for b in blocks) == 3 * n - 2
    assert ad.plane_stages(model) == ["layer2", "layer3"]
    assert ad.plane_stages(model, include_first=True) == stages
    assert ad.widths(model)["planes"] == {"layer1": 16, "layer2": 32, "layer3": 64}
    mid = {f"{s}.{i}": c for s, c in zip(stages, (16, 32, 64), strict=True) for i in range(n)}
    assert ad.widths(model)["mid"] == mid
    assert model.conv1.kernel_size == (3, 3) and not hasattr(model, "maxpool")
    assert ad.plane_producers(model, "layer1")[0] == (model.conv1, model.bn1)  # identity layer1.0
    ds = model.layer3[0].downsample
    assert ds[0].kernel_size == (1, 1) and ds[0].stride == (2, 2)
    assert ad.plane_producers(model, "layer3")[0] == (ds[0], ds[1])
    assert ad.feature_stages(model) == {s: getattr(model, s) for s in stages}
    with torch.no_grad():
        feats, logits = ad.forward_features(model, X)
        assert torch.equal(logits, model(X)) and feats.shape == (2, 64)


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_pruning_as_far_as_allowed_leaves_one_block_per_stage(name):
    """Every free block scored and removed (ratio near 1): each stage keeps one block, the
    transition blocks layer2.0 and layer3.0 among them, and the model still runs."""
    n = blocks_per_stage(name)
    model = create_model(name, 10).eval()
    ad = get_adapter(model)
    blocks = ad.blocks(model)
    rnd = random.Random(n)
    scores = {b.name: rnd.random() for b in blocks}
    removed = select_removals(blocks, scores, 0.99)
    assert len(removed) == 3 * (n - 1)  # every stage loses all but one block
    keep = keep_cfg_from_removals(blocks, removed)
    student = ad.keep(model, keep).eval()
    survivors = [b.name for b in ad.blocks(student)]
    assert len(survivors) == 3 and survivors[1:] == ["layer2.0", "layer3.0"]
    assert ad.arch(student)["keep"]["layer2"] == [0] == ad.arch(student)["keep"]["layer3"]
    ad.check_invariants(student)
    with torch.no_grad():
        assert student(X).shape == (2, 10)
    assert count_params(student) == cifar_resnet_counts(1, "B")[0]


def test_imagenet_weights_are_refused_in_one_line():
    with pytest.raises(M2MError) as err:
        create_model("resnet56", 10, pretrained=True)
    msg = str(err.value)
    assert msg.startswith("model.pretrained=true: resnet56 has no ImageNet weights")
    assert "model.pretrained=false" in msg and "\n" not in msg
