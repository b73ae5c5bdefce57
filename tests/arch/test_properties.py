"""Property tests: any legal keep_cfg + slice plan yields a working, exactly-sliced, rebuildable
model whose parameter count matches closed-form layer formulas computed here from the widths."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2mdc.arch import SlicePlan, get_adapter

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
TEACHER_DEPTHS = {
    "resnet18": {"layer1": 2, "layer2": 2, "layer3": 2, "layer4": 2},
    "resnet34": {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3},
    # the CIFAR ResNets: three stages of n = (depth - 2) / 6 blocks
    "resnet20": {"layer1": 3, "layer2": 3, "layer3": 3},
    "resnet56": {"layer1": 9, "layer2": 9, "layer3": 9},
    "mobilenet_v2": {"c16": 1, "c24": 2, "c32": 3, "c64": 4, "c96": 3, "c160": 3, "c320": 1},
}
MBV2_EXPANSION = {"c16": 1, "c24": 6, "c32": 6, "c64": 6, "c96": 6, "c160": 6, "c320": 6}


# ---- closed-form parameter counts (independent of the code under test) --------------------
def conv(cin: int, cout: int, k: int, groups: int = 1) -> int:
    return k * k * (cin // groups) * cout  # torchvision's convs here have no bias


def bn(c: int) -> int:
    return 2 * c


def linear(cin: int, cout: int) -> int:
    return cin * cout + cout


def resnet_params(arch: dict) -> int:
    planes, mid, nc = arch["widths"]["planes"], arch["widths"]["mid"], arch["num_classes"]
    stem = planes["layer1"]  # layer1.0 has an identity shortcut: the stem feeds it directly
    cifar = arch["name"] in ("resnet20", "resnet56")  # 3x3 stem (ImageNet ResNets: 7x7)
    total = conv(3, stem, 3 if cifar else 7) + bn(stem)
    cin = stem
    for stage in TEACHER_DEPTHS[arch["name"]]:
        p = planes[stage]
        for i in range(len(arch["keep"][stage])):
            m = mid[f"{stage}.{i}"]
            block_in = cin if i == 0 else p
            total += conv(block_in, m, 3) + bn(m) + conv(m, p, 3) + bn(p)
            if i == 0 and stage != "layer1":  # the protected downsample block
                total += conv(block_in, p, 1) + bn(p)
        cin = p
    return total + linear(cin, nc)


def mobilenet_params(arch: dict) -> int:
    planes, mid, nc = arch["widths"]["planes"], arch["widths"]["mid"], arch["num_classes"]
    total = conv(3, 32, 3) + bn(32)
    cin, k = 32, 1
    for group, kept in arch["keep"].items():
        p = planes[group]
        for i in range(len(kept)):
            h = mid[f"features.{k}"]
            block_in = cin if i == 0 else p
            if MBV2_EXPANSION[group] == 1:
                assert h == block_in
            else:
                total += conv(block_in, h, 1) + bn(h)
            total += conv(h, h, 3, groups=h) + bn(h) + conv(h, p, 1) + bn(p)
            k += 1
        cin = p
    return total + conv(cin, 1280, 1) + bn(1280) + linear(1280, nc)


def closed_form(arch: dict) -> int:
    return resnet_params(arch) if arch["family"] == "resnet" else mobilenet_params(arch)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teachers():
    torch.manual_seed(0)
    return {n: get_adapter(n).create(n, num_classes=10).eval() for n in TEACHER_DEPTHS}


def test_closed_form_matches_known_totals(teachers):
    r18 = get_adapter("resnet18").arch(teachers["resnet18"])
    assert resnet_params(r18) == 11_181_642 == n_params(teachers["resnet18"])
    assert resnet_params({**r18, "num_classes": 1000}) == 11_689_512  # torchvision's meta
    r34 = get_adapter("resnet34").arch(teachers["resnet34"])
    assert resnet_params({**r34, "num_classes": 1000}) == 21_797_672
    r56 = get_adapter("resnet56").arch(teachers["resnet56"])
    assert resnet_params(r56) == 855_770 == n_params(teachers["resnet56"])  # test_cifar_resnet
    mb = get_adapter("mobilenet_v2").arch(teachers["mobilenet_v2"])
    assert mobilenet_params({**mb, "num_classes": 1000}) == 3_504_872
    assert mobilenet_params(mb) == n_params(teachers["mobilenet_v2"])


# ---- strategies -----------------------------------------------------------------------------
@st.composite
def keep_cfgs(draw, name: str) -> dict[str, list[int]]:
    """Random legal keep_cfg: the first block of protected stages always survives."""
    cfg: dict[str, list[int]] = {}
    for stage, n in TEACHER_DEPTHS[name].items():
        if not draw(st.booleans()):
            continue  # stage not named: keeps everything
        required = set() if stage == "layer1" else {0}
        chosen = draw(st.sets(st.integers(0, n - 1), min_size=0 if required else 1))
        cfg[stage] = sorted(required | chosen)
    return cfg


def _subset(rnd: random.Random, size: int, k: int) -> list[int]:
    return rnd.sample(range(size), k)  # deliberately unsorted: the adapters sort


@st.composite
def slice_plans(draw, ad, model) -> SlicePlan:
    """Random kept-channel subsets for random plane stages and random mid-sliceable blocks."""
    rnd = draw(st.randoms(use_true_random=False))
    widths = ad.widths(model)
    plan = SlicePlan()
    for stage in ad.plane_stages(model, include_first=True):
        if draw(st.booleans()):
            c = widths["planes"][stage]
            plan.planes[stage] = _subset(rnd, c, draw(st.integers(1, c)))
    for block in ad.blocks(model):
        if ad.mid_producers(model, block.name) is not None and draw(st.booleans()):
            c = widths["mid"][block.name]
            plan.mid[block.name] = _subset(rnd, c, draw(st.integers(1, c)))
    return plan


# ---- the property ---------------------------------------------------------------------------
def _sel(t: torch.Tensor, dim: int, idx: list[int] | None) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, torch.tensor(sorted(idx)))


def _check_slices(name: str, student, sliced, plan: SlicePlan) -> None:
    """Spot-check that kept tensors are exactly the selected slices of the student's."""
    if name.startswith("resnet"):
        for stage, p in plan.planes.items():
            i = len(getattr(student, stage)) - 1
            src, dst = getattr(student, stage)[i], getattr(sliced, stage)[i]
            m = plan.mid.get(f"{stage}.{i}")
            assert torch.equal(dst.conv2.weight, _sel(_sel(src.conv2.weight, 0, p), 1, m))
            assert torch.equal(dst.bn2.running_var, _sel(src.bn2.running_var, 0, p))
        last = list(TEACHER_DEPTHS[name])[-1]
        if last in plan.planes:
            assert torch.equal(sliced.fc.weight, _sel(student.fc.weight, 1, plan.planes[last]))
        for block, m in plan.mid.items():
            src, dst = student.get_submodule(block), sliced.get_submodule(block)
            stage, i = block.split(".")
            feeding = stage if int(i) > 0 or stage == "layer1" else f"layer{int(stage[-1]) - 1}"
            p_in = plan.planes.get(feeding)
            assert torch.equal(dst.bn1.weight, _sel(src.bn1.weight, 0, m))
            assert torch.equal(dst.conv1.weight, _sel(_sel(src.conv1.weight, 0, m), 1, p_in))
    else:
        ad = get_adapter(student)
        for group, p in plan.planes.items():
            last = ad.stage_output(student, group)
            bname = next(n for n, mod in student.named_modules() if mod is last)
            src, dst = last.conv, sliced.get_submodule(bname).conv
            pos = len(src) - 2  # projection conv, then its BN
            m = plan.mid.get(bname)
            assert torch.equal(dst[pos].weight, _sel(_sel(src[pos].weight, 0, p), 1, m))
            assert torch.equal(dst[pos + 1].running_mean, _sel(src[pos + 1].running_mean, 0, p))
        if "c320" in plan.planes:
            w = student.features[-1][0].weight
            assert torch.equal(sliced.features[-1][0].weight, _sel(w, 1, plan.planes["c320"]))
        for block, m in plan.mid.items():
            src, dst = student.get_submodule(block).conv, sliced.get_submodule(block).conv
            assert torch.equal(dst[1][0].weight, _sel(src[1][0].weight, 0, m))  # depthwise
            assert torch.equal(dst[0][1].bias, _sel(src[0][1].bias, 0, m))  # expand BN


def _run_property(teachers, name: str, data) -> None:
    teacher = teachers[name]
    ad = get_adapter(teacher)
    cfg = data.draw(keep_cfgs(name), label="keep_cfg")
    student = ad.keep(teacher, cfg).eval()
    depths = TEACHER_DEPTHS[name]
    for ref in ad.blocks(student):  # kept blocks are weight-identical teacher blocks
        assert ref.orig_index in cfg.get(ref.stage, range(depths[ref.stage]))
        if name.startswith("resnet"):
            orig_name = f"{ref.stage}.{ref.orig_index}"
        else:
            before = sum(
                n
                for g, n in depths.items()
                if list(depths).index(g) < list(depths).index(ref.stage)
            )
            orig_name = f"features.{1 + before + ref.orig_index}"
        src = teacher.get_submodule(orig_name).state_dict()
        for key, value in student.get_submodule(ref.name).state_dict().items():
            assert torch.equal(value, src[key]), (ref.name, orig_name, key)
    plan = data.draw(slice_plans(ad, student), label="plan")
    sliced = ad.slice(student, plan).eval()

    with torch.no_grad():
        out = sliced(X)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    ad.check_invariants(sliced)
    arch = ad.arch(sliced)
    assert json.loads(json.dumps(arch)) == arch
    for stage, idx in plan.planes.items():
        assert arch["widths"]["planes"][stage] == len(idx)
    for block, idx in plan.mid.items():
        assert arch["widths"]["mid"][block] == len(idx)
    assert n_params(sliced) == closed_form(arch)
    _check_slices(name, student, sliced, plan)

    rebuilt = ad.build(arch)
    own, other = sliced.state_dict(), rebuilt.state_dict()
    assert list(own) == list(other)
    assert all(own[k].shape == other[k].shape for k in own)
    rebuilt.load_state_dict(own, strict=True)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(X), out)


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@settings(max_examples=10, **_SETTINGS)
@given(data=st.data())
def test_resnet18_keep_and_slice_property(teachers, data):
    _run_property(teachers, "resnet18", data)


@settings(max_examples=6, **_SETTINGS)
@given(data=st.data())
def test_resnet34_keep_and_slice_property(teachers, data):
    _run_property(teachers, "resnet34", data)


@settings(max_examples=10, **_SETTINGS)
@given(data=st.data())
def test_resnet20_keep_and_slice_property(teachers, data):
    _run_property(teachers, "resnet20", data)


@settings(max_examples=4, **_SETTINGS)
@given(data=st.data())
def test_resnet56_keep_and_slice_property(teachers, data):
    _run_property(teachers, "resnet56", data)


@settings(max_examples=10, **_SETTINGS)
@given(data=st.data())
def test_mobilenet_v2_keep_and_slice_property(teachers, data):
    _run_property(teachers, "mobilenet_v2", data)
