"""The slicing plan (m2mdc.slicing), gradual channel decay and the sparsity penalty."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from m2mdc import budget
from m2mdc.arch import get_adapter
from m2mdc.arch.zoo import create_model
from m2mdc.distill.losses import preset_terms
from m2mdc.distill.repair import RepairExtras, kd_repair
from m2mdc.distill.sparsity import Sparsity
from m2mdc.scoring.channels import round_keep, select_channels
from m2mdc.slicing import ChannelDecay, plan_slice, slice_groups
from tests.test_perf import batches


def _random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and shifts, so that a zero input channel does not stay zero."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.2
            m.running_mean = torch.randn(c, generator=g) * 0.2
            m.running_var = torch.rand(c, generator=g) + 0.5
    return model.eval()


def test_plan_slice_cuts_every_planes_and_mid_group_of_its_stages():
    model = _random_bn(create_model("resnet18", 10))
    plan = plan_slice(model, 0.5, 0.4, stages=["layer3", "layer4"], round_to=8)
    assert set(plan.planes) == {"layer3", "layer4"}
    assert set(plan.mid) == {"layer3.0", "layer3.1", "layer4.0", "layer4.1"}
    prods = [model.layer3[0].downsample[0], model.layer3[0].downsample[1]]
    want = select_channels(
        "bn_l1", [tuple(prods), *[(b.conv2, b.bn2) for b in model.layer3]], round_keep(256, 0.5, 8)
    )
    assert plan.planes["layer3"] == want and len(want) == 128
    assert plan.mid["layer4.1"] == select_channels(
        "bn_l1", [(model.layer4[1].conv1, model.layer4[1].bn1)], round_keep(512, 0.4, 8)
    )
    # the allocator's students are the same plan over every sliceable stage
    full = plan_slice(model, 0.5, 0.4, stages=["layer2", "layer3", "layer4"], round_to=8)
    mine = get_adapter(model).slice(model, full)
    theirs = budget.slice_uniform(model, 0.5, 0.4, round_to=8)
    assert get_adapter(model).widths(mine) == get_adapter(theirs).widths(theirs)
    assert torch.equal(mine.layer4[1].conv1.weight, theirs.layer4[1].conv1.weight)
    assert slice_groups(model, None, None, stages=["layer2"]) == []


def test_cifar_resnet_groups_are_the_planes_of_its_three_stages_and_their_blocks_mid():
    """resnet20: stages of 3 blocks at 16, 32, 64 planes; at 0.5 every group keeps half."""
    model = _random_bn(create_model("resnet20", 10))
    stages = ["layer1", "layer2", "layer3"]
    groups = slice_groups(model, 0.5, 0.5, stages=stages)
    widths = {"layer1": 16, "layer2": 32, "layer3": 64}
    assert [(g.kind, g.name, g.width, g.keep) for g in groups] == [
        *[("planes", s, widths[s], widths[s] // 2) for s in stages],
        *[("mid", f"{s}.{i}", widths[s], widths[s] // 2) for s in stages for i in range(3)],
    ]
    ds = model.layer2[0].downsample
    assert groups[1].producers == [(ds[0], ds[1]), *[(b.conv2, b.bn2) for b in model.layer2]]
    assert groups[0].producers[0] == (model.conv1, model.bn1)  # layer1.0: identity shortcut
    sliced = get_adapter(model).slice(model, plan_slice(model, 0.5, 0.5, stages=stages))
    assert sliced.conv1.out_channels == 8 and sliced.layer3[0].downsample[0].in_channels == 16
    assert sliced.fc.in_features == 32 and sliced(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "mobilenet_v2"])
def test_decayed_channels_are_cut_without_changing_the_logits(name):
    torch.manual_seed(0)
    model = _random_bn(create_model(name, 10))
    adapter = get_adapter(model)
    stages = adapter.plane_stages(model, include_first=True)
    plan = plan_slice(model, 0.5, 0.5, stages=stages)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        decay = ChannelDecay(model, plan, total_steps=4)
        assert torch.equal(model(x), plain)  # factor 1: nothing changes
        factors = []
        for _ in range(4):
            decay.advance()
            factors.append(float(decay.factor))
        cosine = [0.5 * (1 + math.cos(math.pi * t / 4)) for t in (1, 2, 3)]
        assert factors == pytest.approx([*cosine, 0.0])
        masked = model(x)
        decay.remove()
        assert torch.equal(model(x), plain)  # hooks gone
        cut = adapter.slice(model, plan)(x)
    assert not torch.allclose(masked, plain, atol=1e-3)
    torch.testing.assert_close(cut, masked, atol=1e-5, rtol=1e-5)


class _Crash(ChannelDecay):
    """Raises once at step ``at`` (after an epoch's state was saved)."""

    at = -1

    def advance(self) -> None:
        if int(self.step) == self.at:
            type(self).at = -1
            raise KeyboardInterrupt
        super().advance()


def _repair(student, teacher, tmp_path, extras, epochs=2):
    train, test = batches(n=16, size=16, classes=4)
    return kd_repair(
        student,
        teacher,
        train,
        test,
        terms=preset_terms("staged_cosine", 0.1, 0.1),
        epochs=epochs,
        lr=1e-3,
        grad_clip=1.0,
        temperature=4.0,
        state_path=tmp_path / "s.pt",
        fingerprint="fp",
        desc="kd",
        extras=extras,
    )


def _pair():
    torch.manual_seed(0)
    teacher = create_model("resnet18", 4).eval()
    torch.manual_seed(1)
    return teacher, create_model("resnet18", 4)


def test_a_resumed_decay_continues_the_same_schedule(tmp_path):
    teacher, student = _pair()
    stages = ["layer3", "layer4"]
    plan = plan_slice(student, 0.5, 0.5, stages=stages)
    steps = 2 * 2  # 2 epochs of 16 images in batches of 8
    whole = _repair(
        student, teacher, tmp_path / "a", RepairExtras(decay=ChannelDecay(student, plan, steps))
    )
    assert [h["decay_factor"] for h in whole.history] == [pytest.approx(0.5), 0.0]

    _, resumed = _pair()
    _Crash.at = 2  # the first step of epoch 2
    with pytest.raises(KeyboardInterrupt):
        _repair(resumed, teacher, tmp_path / "b", RepairExtras(decay=_Crash(resumed, plan, steps)))
    _, resumed = _pair()  # a new process: fresh weights, a fresh counter
    again = _repair(
        resumed, teacher, tmp_path / "b", RepairExtras(decay=ChannelDecay(resumed, plan, steps))
    )
    assert again.resumed_from == 1 and again.history == whole.history
    for (k, a), b in zip(student.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def _penalty_grads(kind: str) -> set[str]:
    model = create_model("resnet18", 10)
    groups = slice_groups(model, 0.5, 0.5, stages=["layer3", "layer4"])
    Sparsity([g.producers for g in groups], 1.0, kind).penalty().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("kind", ["bn_l1", "group_lasso"])
def test_the_penalty_touches_exactly_the_sliced_groups(kind):
    want = set()
    for stage in ("layer3", "layer4"):
        want |= {f"{stage}.0.downsample.1.weight"}
        want |= {f"{stage}.{i}.bn{j}.weight" for i in (0, 1) for j in (1, 2)}
        if kind == "group_lasso":
            want |= {f"{stage}.0.downsample.0.weight"}
            want |= {f"{stage}.{i}.conv{j}.weight" for i in (0, 1) for j in (1, 2)}
    assert _penalty_grads(kind) == want


def test_group_lasso_is_the_channel_norm_of_the_coupled_weights():
    conv, bn = nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3)
    conv.weight.data = torch.arange(6.0).view(3, 2, 1, 1)
    bn.weight.data = torch.tensor([1.0, -2.0, 0.0])
    norms = [(0 + 1 + 1) ** 0.5, (4 + 9 + 4) ** 0.5, (16 + 25) ** 0.5]
    pen = Sparsity([[(conv, bn)]], 1.0, "group_lasso").penalty()
    assert pen.item() == pytest.approx(sum(norms))
    assert Sparsity([[(conv, bn)]], 1.0, "bn_l1").penalty().item() == pytest.approx(3.0)
    ramp = Sparsity([], 2.0, ramp="linear")
    assert [ramp.weight_at(e, 4) for e in (1, 2, 4)] == [0.5, 1.0, 2.0]


def test_weight_zero_trains_bitwise_like_no_penalty_and_a_weight_shrinks_the_groups(tmp_path):
    runs = {}
    for key, weight in (("off", None), ("zero", 0.0), ("on", 0.05)):
        teacher, student = _pair()
        groups = [g.producers for g in slice_groups(student, 0.5, 0.5, stages=["layer4"])]
        extras = None if weight is None else RepairExtras(sparsity=Sparsity(groups, weight))
        res = _repair(student, teacher, tmp_path / key, extras)
        runs[key] = (student.state_dict(), [h["test_top1"] for h in res.history], groups)
    (off, top_off, _), (zero, top_zero, _) = runs["off"], runs["zero"]
    assert top_off == top_zero
    assert all(torch.equal(off[k], zero[k]) for k in off)
    on = runs["on"][0]
    gamma = [k for k in off if k.startswith("layer4") and ".bn" in k and k.endswith("weight")]
    assert sum(on[k].abs().sum() for k in gamma) < sum(off[k].abs().sum() for k in gamma)


def test_the_new_settings_are_fingerprint_neutral_at_their_defaults(compose_cfg, tmp_path):
    import m2mdc.stages  # noqa: F401  (registers the stages)
    from m2mdc.stage import Context

    def fingerprints(*overrides):
        ctx = Context(compose_cfg(*overrides), tmp_path)
        return {s: ctx.fingerprint(s) for s in ("distill", "slice")}, ctx

    base, ctx = fingerprints()
    assert "sparsity" not in ctx.stage_config("distill")["kd"]
    assert "decay" not in ctx.stage_config("slice")["slice"]
    explicit, _ = fingerprints(
        "kd.sparsity.weight=0",
        "kd.sparsity.kind=bn_l1",
        "kd.sparsity.ramp=none",
        "slice.decay=cosine",
    )
    assert explicit == base
    on, _ = fingerprints("kd.sparsity.weight=1e-4")
    assert on["distill"] != base["distill"]
    # with the penalty on, the settings that pick its groups decide the distilled student too
    narrower, _ = fingerprints("kd.sparsity.weight=1e-4", "slice.planes_keep=0.3")
    assert narrower["distill"] != on["distill"]
    assert fingerprints("slice.schedule=gradual", "slice.decay=linear")[0]["slice"] != base["slice"]
