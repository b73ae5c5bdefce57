"""Adapters: block lists, protection, keep errors, identity edits, invariants, helper hooks."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from m2mdc.arch import ADAPTERS, SOURCES, BlockRef, SlicePlan, get_adapter
from m2mdc.errors import M2MError
from m2mdc.hydra_args import conf_dir

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    out = {}
    for name in ("resnet18", "resnet34", "resnet20", "mobilenet_v2"):
        out[name] = get_adapter(name).create(name, num_classes=10).eval()
    return out


def _full_keep(model):
    return {s: list(v) for s, v in model.m2mdc_arch["keep"].items()}


MODELS = ["mobilenet_v2", "resnet110", "resnet18", "resnet20", "resnet32", "resnet34", "resnet56"]


def test_registry_and_get_adapter(teachers):
    assert ADAPTERS.names() == MODELS
    assert get_adapter("resnet34") is get_adapter(teachers["resnet18"])
    assert get_adapter("resnet56") is get_adapter(teachers["resnet18"])  # one ResNet adapter
    assert get_adapter(teachers["mobilenet_v2"]).family == "mobilenet_v2"
    with pytest.raises(M2MError, match=f"valid choices: {', '.join(MODELS)}$"):
        get_adapter("vgg16")
    with pytest.raises(ValueError, match="no m2mdc_arch"):
        get_adapter(nn.Linear(2, 2))
    with pytest.raises(M2MError, match="not a resnet model"):
        get_adapter("resnet18").create("mobilenet_v2", 10)


def test_every_registered_model_has_its_config_group_option():
    """``model=NAME`` (conf/model/NAME.yaml) exists for exactly the registry's models, plus
    ``model=auto``: a library of the generic adapter, the model name left to the user."""
    files = sorted((conf_dir() / "model").glob("*.yaml"))
    assert [f.stem for f in files if f.stem != "auto"] == MODELS
    assert all(yaml.safe_load(f.read_text())["name"] == f.stem for f in files if f.stem != "auto")
    auto = yaml.safe_load((conf_dir() / "model" / "auto.yaml").read_text())
    assert auto == {"source": "torchvision", "name": "???"} and auto["source"] in SOURCES


def test_resnet18_blocks_and_protection(teachers):
    m = teachers["resnet18"]
    ad = get_adapter(m)
    blocks = ad.blocks(m)
    assert [b.name for b in blocks] == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    assert [b.name for b in blocks if b.protected] == ["layer2.0", "layer3.0", "layer4.0"]
    assert blocks[3] == BlockRef("layer2.1", "layer2", 1, 1, False)
    assert ad.stages(m) == ["layer1", "layer2", "layer3", "layer4"]


def test_resnet34_blocks_and_protection(teachers):
    m = teachers["resnet34"]
    blocks = get_adapter(m).blocks(m)
    assert len(blocks) == 16
    assert [sum(b.stage == f"layer{s}" for b in blocks) for s in range(1, 5)] == [3, 4, 6, 3]
    assert [b.name for b in blocks if b.protected] == ["layer2.0", "layer3.0", "layer4.0"]


def test_mobilenet_v2_blocks_groups_and_protection(teachers):
    m = teachers["mobilenet_v2"]
    ad = get_adapter(m)
    blocks = ad.blocks(m)
    assert [b.name for b in blocks] == [f"features.{k}" for k in range(1, 18)]
    assert ad.stages(m) == ["c16", "c24", "c32", "c64", "c96", "c160", "c320"]
    protected = [b.name for b in blocks if b.protected]
    assert protected == [f"features.{k}" for k in (1, 2, 4, 7, 11, 14, 17)]
    # free blocks are exactly the residual ones
    assert all(ad.block_module(m, b.name).use_res_connect != b.protected for b in blocks)
    assert [b.stage for b in blocks[6:10]] == ["c64"] * 4


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet20", "mobilenet_v2"])
def test_keep_everything_and_slice_everything_change_no_output(teachers, name):
    m = teachers[name]
    ad = get_adapter(m)
    with torch.no_grad():
        ref = m(X)
        kept = ad.keep(m, _full_keep(m)).eval()
        assert torch.equal(kept(X), ref)
        w = ad.widths(m)
        plan = SlicePlan(
            planes={s: list(range(c)) for s, c in w["planes"].items()},
            mid={
                b: list(range(c)) for b, c in w["mid"].items() if ad.mid_producers(m, b) is not None
            },
        )
        sliced = ad.slice(m, plan).eval()
        assert torch.equal(sliced(X), ref)
        feats, logits = ad.forward_features(m, X)
        assert torch.equal(logits, ref)
    assert feats.shape == (2, {"resnet20": 64, "mobilenet_v2": 1280}.get(name, 512))
    assert ad.arch(sliced) == ad.arch(m)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"layer2": [1]}, r"keep_cfg: layer2\.0 is a protected transition block"),
        ({"layer1": []}, r"stage layer1 would be empty"),
        ({"layer3": [0, 5]}, r"layer3\.5 does not exist; valid layer3 indices: 0, 1"),
        ({"layer5": [0]}, r"unknown stage 'layer5'; stages: layer1, layer2, layer3, layer4"),
        ({"layer1": "0"}, r"prune\.keep_cfg\.layer1 must be a list"),
        ({"layer1": [True]}, r"prune\.keep_cfg\.layer1 must be a list"),
    ],
)
def test_resnet_keep_errors_name_the_block(teachers, cfg, match):
    ad = get_adapter("resnet18")
    with pytest.raises(M2MError, match=match):
        ad.keep(teachers["resnet18"], cfg)


def test_mobilenet_keep_errors_name_the_block(teachers):
    m = teachers["mobilenet_v2"]
    ad = get_adapter(m)
    with pytest.raises(M2MError, match=r"features\.7 \(c64\[0\]\) is a protected"):
        ad.keep(m, {"c64": [1, 2]})
    with pytest.raises(M2MError, match=r"c24\[4\] does not exist; valid c24 indices: 0, 1"):
        ad.keep(m, {"c24": [0, 4]})
    with pytest.raises(M2MError, match="unknown stage 'layer1'"):
        ad.keep(m, {"layer1": [0]})


def test_keep_tracks_teacher_numbering_and_copies_weights(teachers):
    m = teachers["resnet34"]
    ad = get_adapter(m)
    before = ad.arch(m)
    s = ad.keep(m, {"layer3": [5, 0, 2, 2], "layer1": [2]})
    assert ad.arch(m) == before and len(m.layer3) == 6  # input untouched
    refs = [b for b in ad.blocks(s) if b.stage == "layer3"]
    assert [(b.name, b.orig_index) for b in refs] == [
        ("layer3.0", 0),
        ("layer3.1", 2),
        ("layer3.2", 5),
    ]
    assert s.m2mdc_arch["keep"]["layer3"] == [0, 2, 5]
    for k, v in s.layer3[2].state_dict().items():
        assert torch.equal(v, m.layer3[5].state_dict()[k])
    assert s.layer3[2] is not m.layer3[5]
    # keep on a student: indices must still exist; others are listed
    with pytest.raises(M2MError, match=r"layer3\.1 does not exist; valid layer3 indices: 0, 2, 5"):
        ad.keep(s, {"layer3": [0, 1]})
    s2 = ad.keep(s, {"layer3": [0, 5]})
    assert [b.orig_index for b in ad.blocks(s2) if b.stage == "layer3"] == [0, 5]
    assert json.loads(json.dumps(ad.arch(s2))) == ad.arch(s2)


def test_mobilenet_keep_renumbers_features(teachers):
    m = teachers["mobilenet_v2"]
    ad = get_adapter(m)
    s = ad.keep(m, {"c64": [0, 3], "c160": [0]}).eval()
    assert len(s.features) == 2 + 17 - 4
    names = [b.name for b in ad.blocks(s)]
    assert names == [f"features.{k}" for k in range(1, 14)]
    c64 = [(b.name, b.orig_index) for b in ad.blocks(s) if b.stage == "c64"]
    assert c64 == [("features.7", 0), ("features.8", 3)]
    assert torch.equal(s.features[8].conv[0][0].weight, m.features[10].conv[0][0].weight)
    assert s(X).shape == (2, 10)
    assert list(s.m2mdc_arch["widths"]["mid"]) == names


def test_slice_plan_errors_are_value_errors(teachers):
    r, mb = teachers["resnet18"], teachers["mobilenet_v2"]
    ad_r, ad_m = get_adapter(r), get_adapter(mb)
    with pytest.raises(ValueError, match=r"features\.1 has no expansion conv"):
        ad_m.slice(mb, SlicePlan(mid={"features.1": [0]}))
    with pytest.raises(ValueError, match="unknown stage 'layer9'"):
        ad_r.slice(r, SlicePlan(planes={"layer9": [0]}))
    with pytest.raises(ValueError, match=r"unknown block 'layer1\.7'"):
        ad_r.slice(r, SlicePlan(mid={"layer1.7": [0]}))
    with pytest.raises(ValueError, match="out of range"):
        ad_r.slice(r, SlicePlan(planes={"layer2": [128]}))
    with pytest.raises(ValueError, match="duplicate"):
        ad_m.slice(mb, SlicePlan(mid={"features.3": [1, 1]}))


def test_check_invariants_names_the_block(teachers):
    ad = get_adapter("resnet18")
    broken = ad.keep(teachers["resnet18"], {})
    broken.layer1[1].conv2 = nn.Conv2d(64, 32, 3, padding=1, bias=False)
    with pytest.raises(RuntimeError, match=r"layer1\.1: bn2 is 64 but conv2 out is 32"):
        ad.check_invariants(broken)
    broken.layer1[1].bn2 = nn.BatchNorm2d(32)
    with pytest.raises(RuntimeError, match=r"layer1\.1: conv2 out is 32 but identity .* is 64"):
        ad.check_invariants(broken)
    ok = ad.keep(teachers["resnet18"], {})
    ok.fc = nn.Linear(256, 10)
    with pytest.raises(RuntimeError, match=r"fc: in_features is 256 but layer4\.1 output is 512"):
        ad.check_invariants(ok)
    adm = get_adapter("mobilenet_v2")
    mb = adm.keep(teachers["mobilenet_v2"], {})
    mb.features[18][0] = nn.Conv2d(300, 1280, 1, bias=False)
    with pytest.raises(RuntimeError, match=r"features\.18: conv in is 300 but features\.17 output"):
        adm.check_invariants(mb)


def test_layer1_planes_co_slice_the_stem(teachers):
    m = teachers["resnet18"]
    ad = get_adapter(m)
    assert ad.plane_stages(m) == ["layer2", "layer3", "layer4"]
    assert ad.plane_stages(m, include_first=True)[0] == "layer1"
    idx = list(range(0, 64, 4))
    s = ad.slice(m, SlicePlan(planes={"layer1": idx})).eval()
    assert s.conv1.out_channels == 16 and s.bn1.num_features == 16
    assert torch.equal(s.conv1.weight, m.conv1.weight[idx])
    assert s.layer1[0].conv1.in_channels == 16 and s.layer2[0].downsample[0].in_channels == 16
    assert s(X).shape == (2, 10)


def test_hooks_return_the_live_modules(teachers):
    r, mb = teachers["resnet18"], teachers["mobilenet_v2"]
    ad_r, ad_m = get_adapter(r), get_adapter(mb)
    pairs = ad_r.plane_producers(r, "layer2")
    assert pairs[0] == (r.layer2[0].downsample[0], r.layer2[0].downsample[1])
    assert pairs[1:] == [(r.layer2[0].conv2, r.layer2[0].bn2), (r.layer2[1].conv2, r.layer2[1].bn2)]
    assert ad_r.plane_producers(r, "layer1")[0] == (r.conv1, r.bn1)
    assert ad_r.mid_producers(r, "layer3.1") == (r.layer3[1].conv1, r.layer3[1].bn1)
    assert ad_r.stage_output(r, "layer3") is r.layer3[1]
    assert ad_r.feature_stages(r) == {f"layer{s}": getattr(r, f"layer{s}") for s in range(1, 5)}
    assert ad_r.classifier(r) is r.fc and ad_r.block_module(r, "layer2.1") is r.layer2[1]
    with pytest.raises(ValueError, match="not a block"):
        ad_r.block_module(r, "fc")
    assert ad_r.widths(r)["planes"] == {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    assert ad_m.plane_stages(mb) == ["c24", "c32", "c64", "c96", "c160", "c320"]
    assert [c.out_channels for c, _ in ad_m.plane_producers(mb, "c32")] == [32, 32, 32]
    assert ad_m.plane_producers(mb, "c32")[0] == (mb.features[4].conv[2], mb.features[4].conv[3])
    assert ad_m.mid_producers(mb, "features.1") is None
    assert ad_m.mid_producers(mb, "features.5") == (
        mb.features[5].conv[0][0],
        mb.features[5].conv[0][1],
    )
    assert ad_m.stage_output(mb, "c64") is mb.features[10]
    assert list(ad_m.feature_stages(mb).values())[-1] is mb.features[17]
    assert ad_m.classifier(mb) is mb.classifier[1]
    w = ad_m.widths(mb)
    assert (
        w["planes"]["c160"] == 160 and w["mid"]["features.1"] == 32 and w["mid"]["features.2"] == 96
    )


def test_build_rejects_bad_descriptions(teachers):
    ad = get_adapter("resnet18")
    arch = ad.arch(teachers["resnet18"])
    with pytest.raises(M2MError, match="incomplete or malformed"):
        ad.build({k: v for k, v in arch.items() if k != "widths"})
    with pytest.raises(M2MError, match="family 'mobilenet_v2'"):
        ad.build({**arch, "family": "mobilenet_v2"})
    too_wide = json.loads(json.dumps(arch))
    too_wide["widths"]["planes"]["layer2"] = 999
    with pytest.raises(M2MError, match=r"widths\.planes\.layer2=999 is not in 1\.\.128"):
        ad.build(too_wide)
    bad_keep = {**arch, "keep": {**arch["keep"], "layer2": [1]}}
    with pytest.raises(M2MError, match=r"checkpoint arch keep: layer2\.0"):
        ad.build(bad_keep)


def test_slice_returns_a_new_model_and_leaves_the_input_alone(teachers):
    m = teachers["mobilenet_v2"]
    ad = get_adapter(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    arch = ad.arch(m)
    s = ad.slice(m, SlicePlan(planes={"c96": [0, 5, 9]}, mid={"features.12": [3, 4]}))
    assert s is not m and ad.arch(m) == arch
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert s.features[11].out_channels == 3 and s.features[12].use_res_connect
    assert s.features[13].conv[0][0].in_channels == 3  # c96's later block reads the planes
    assert s.features[14].conv[0][0].in_channels == 3  # the next group's first block too
    assert s.m2mdc_arch["widths"]["mid"]["features.12"] == 2
