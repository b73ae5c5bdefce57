"""The KD toolbox: composable terms, attention transfer, integrated-gradients maps and overlay,
the presets end to end."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from m2mdc.arch import SlicePlan, get_adapter
from m2mdc.config import KD_TERM_NAMES, validate
from m2mdc.data.datasets import ImageData
from m2mdc.data.loader import IMAGENET_MEAN, IMAGENET_STD, Batches, Overlay, preprocess
from m2mdc.distill import ig
from m2mdc.distill.losses import (
    KD_TERMS,
    KDOutputs,
    attention_transfer,
    combine,
    preset_terms,
    term_weights,
    terms_from_config,
)
from m2mdc.distill.repair import StageTap
from m2mdc.errors import M2MError
from tests.conftest import run_cli

PRESETS = ("ce_only", "staged_cosine", "hinton", "attention_transfer", "ig_overlay", "ig_at")
ALL_PRESETS = (*PRESETS, "kl", "cosine_kl")  # kl: the default recipe's loss (tests/test_recipe.py)


def _images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _tiny_net(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Softplus(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, classes),
    ).eval()


# ---- terms configuration --------------------------------------------------------------------
def _plain(terms):
    return [(t.name, t.weight, t.ramped, t.log_as or t.name, t.temperature) for t in terms]


def test_builtin_term_names_are_the_registry():
    assert sorted(KD_TERM_NAMES) == KD_TERMS.names()


@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_every_preset_composes_and_builds_its_terms(compose_cfg, preset):
    cfg = compose_cfg("experiment=kd_comparison", f"kd={preset}")
    validate(cfg)
    terms = terms_from_config(cfg.kd)
    assert terms[0].name == "ce" and not terms[0].ramped
    assert (float(cfg.kd.ig.prob) > 0) == preset.startswith("ig_")
    assert any(t.name == "attention_transfer" for t in terms) == preset.endswith(
        ("_at", "transfer")
    )


def test_staged_cosine_terms_equal_the_legacy_preset_and_follow_alpha_beta(compose_cfg):
    cfg = compose_cfg("kd=staged_cosine", "kd.alpha=0.3", "kd.beta=0.2")
    assert _plain(terms_from_config(cfg.kd)) == _plain(preset_terms("staged_cosine", 0.3, 0.2))
    weights = term_weights(terms_from_config(cfg.kd), 2, 2)
    assert weights == {"w_ce": 1.0, "alpha": 0.3, "beta": 0.2}
    hinton = compose_cfg("kd=hinton")
    assert [(t.name, t.weight, t.log_as) for t in terms_from_config(hinton.kd)] == [
        ("ce", 1.0, "ce"),
        ("kl", 1.0, "kl"),
    ]


def test_empty_terms_fall_back_to_the_legacy_presets(compose_cfg):
    cfg = compose_cfg("kd=hinton", "kd.terms=[]", "kd.alpha=0.5")
    assert _plain(terms_from_config(cfg.kd)) == _plain(preset_terms("hinton", 0.5, 0.0))


def test_terms_from_the_command_line_with_temperature_and_no_ramp(compose_cfg):
    cfg = compose_cfg(
        "kd.terms=[{name:ce,weight:1,ramp:none},{name:kl,weight:2,ramp:none,temperature:2},"
        "{name:kl,weight:1}]"
    )
    validate(cfg)
    terms = terms_from_config(cfg.kd)
    assert [(t.log_as, t.weight, t.ramped, t.temperature) for t in terms] == [
        ("ce", 1.0, False, None),
        ("kl", 2.0, False, 2.0),
        ("kl_2", 1.0, True, None),
    ]
    g = torch.Generator().manual_seed(0)
    o = KDOutputs(*(torch.randn(4, 5, generator=g) for _ in range(4)), torch.arange(4), 4.0)
    _, logged = combine(terms, o, 1, 3)
    assert float(logged["kl"]) != pytest.approx(float(logged["kl_2"]))  # T=2 vs kd.temperature
    assert term_weights(terms, 1, 3) == {"w_ce": 1.0, "alpha": 2.0, "w_kl_2": 0.0}


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            "kd.terms.1.name=foo",
            "kd.terms[1].name='foo' is not valid; choose one of: attention_transfer, ce, "
            "feature_cosine, kl, logit_cosine",
        ),
        ("kd.terms.0.weight=-1", "kd.terms[0].weight=-1.0 is out of range; allowed: >= 0"),
        ("kd.terms.2.ramp=cosine", "kd.terms[2].ramp='cosine' is not valid; choose one of: linear"),
        ("kd.terms.0.temperature=2", "kd.terms[0].temperature=2.0 is only used by kl"),
        ("kd.terms=[{weight:1}]", "kd.terms[0].name is missing; choose one of: attention_transfer"),
        ("kd.ig.prob=1.5", "kd.ig.prob=1.5 is out of range; allowed: >= 0 and <= 1"),
        ("kd.ig.overlay=add", "kd.ig.overlay='add' is not valid; choose one of: blend, mask"),
        ("kd=hinton", None),
    ],
)
def test_terms_validation_names_the_key_in_one_line(compose_cfg, override, expected):
    if expected is None:
        validate(compose_cfg(override))
        return
    with pytest.raises(M2MError) as err:
        validate(compose_cfg(override))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_cli_names_a_misspelt_term_key(capsys, tmp_path, monkeypatch):
    from m2mdc.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", "kd.terms=[{name:ce,wieght:1}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "m2mdc: error: unknown setting 'wieght' in a kd.terms entry (did you mean 'weight'?); "
        "settings of a term: name, weight, ramp, temperature"
    )
    assert not (tmp_path / "outputs").exists()


# ---- attention transfer -----------------------------------------------------------------------
def _at(s_stages, t_stages):
    z = torch.zeros(2, 3)
    return attention_transfer(KDOutputs(z, z, z, z, torch.zeros(2), 4.0, s_stages, t_stages))


def test_attention_transfer_zero_for_equal_maps_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a = {"s1": torch.randn(2, 8, 4, 4, generator=g), "s2": torch.randn(2, 8, 2, 2, generator=g)}
    assert float(_at(a, a)) == 0.0
    b = {k: v + torch.randn(v.shape, generator=g) for k, v in a.items()}
    assert float(_at(b, a)) > 0
    # other channel counts (a sliced student), and another spatial size (resized)
    narrow = {
        "s1": torch.randn(2, 3, 4, 4, generator=g),
        "s2": torch.randn(2, 5, 4, 4, generator=g),
    }
    value = _at(narrow, a)
    assert torch.isfinite(value) and 0 < float(value) <= 2
    # a 1x1 stage carries no spatial information and is skipped; none left: 0
    assert float(_at({"s": torch.randn(2, 4, 1, 1)}, {"s": torch.randn(2, 4, 1, 1)})) == 0.0


def test_attention_transfer_through_stage_hooks_on_resnets():
    adapter = get_adapter("resnet18")
    teacher = adapter.create("resnet18", num_classes=10).eval()
    # a student whose layer3 planes are sliced to half: 128 vs 256 channels (sliced before
    # any hook exists: a deep copy would copy the hooks too)
    student = adapter.slice(teacher, SlicePlan(planes={"layer3": list(range(0, 256, 2))}))
    twin = copy.deepcopy(teacher)
    x = torch.randn(2, 3, 32, 32)
    t_tap = StageTap(teacher)
    with torch.no_grad(), t_tap.collect() as t_stages:
        teacher(x)
    assert list(t_stages) == ["layer1", "layer2", "layer3", "layer4"]
    s_tap = StageTap(twin)
    with torch.no_grad(), s_tap.collect() as s_stages:
        twin(x)
    assert float(_at(s_stages, t_stages)) == 0.0
    s_tap.remove()
    student.train()
    s_tap = StageTap(student)
    with s_tap.collect() as s_stages:
        student(x)
    assert s_stages["layer3"].shape[1] == 128 and t_stages["layer3"].shape[1] == 256
    loss = _at(s_stages, t_stages)
    assert float(loss.detach()) > 0
    loss.backward()
    grads = [p.grad for p in student.layer3.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for tap in (s_tap, t_tap):
        tap.remove()
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])
    # outside collect() nothing is kept
    with torch.no_grad():
        teacher(x)
    assert t_tap._active is None


# ---- integrated gradients ---------------------------------------------------------------------
def test_ig_attributions_satisfy_completeness():
    model = _tiny_net()
    images, labels = _images(3), torch.tensor([0, 1, 2])
    attr = ig.integrated_gradients(model, images, labels, image_size=12, steps=64)
    assert attr.shape == (3, 3, 8, 8)
    f = ig._AsTrained(model, 12)
    with torch.no_grad():
        x = images.float() / 255
        gap = (f(x) - f(torch.zeros_like(x))).gather(1, labels[:, None]).squeeze(1)
    assert attr.sum(dim=(1, 2, 3)) == pytest.approx(gap, rel=1e-3, abs=1e-5)
    maps = ig.to_maps(attr)
    assert maps.dtype == torch.uint8 and maps.shape == (3, 8, 8)
    assert (maps.amax(dim=(1, 2)) == 255).all() and (maps.amin(dim=(1, 2)) == 0).all()


def test_ig_maps_are_cached_and_reused(tmp_path, monkeypatch):
    model = _tiny_net()
    data = ImageData(_images(5), torch.tensor([0, 1, 2, 0, 1]), ["a", "b", "c"])
    kw = dict(teacher_sha256="t" * 64, image_size=8, steps=4, batch_size=2, cache_dir=tmp_path)
    first = ig.ig_maps(model, data, **kw)
    assert not first.reused and first.maps.shape == (5, 8, 8)
    assert (first.entry / "COMPLETE").is_file() and (first.entry / "ig.json").is_file()

    def boom(*a, **k):
        raise AssertionError("recomputed despite a cache entry")

    monkeypatch.setattr(ig, "compute_maps", boom)
    second = ig.ig_maps(model, data, **kw)
    assert second.reused and second.entry == first.entry
    assert torch.equal(second.maps, first.maps)
    # another teacher, other steps or other data are other entries
    monkeypatch.undo()
    other = ig.ig_maps(model, data, **{**kw, "teacher_sha256": "u" * 64})
    assert not other.reused and other.key != first.key
    assert ig.ig_maps(model, data, **{**kw, "steps": 5}).key != first.key


# ---- the overlay in the batch pipeline ----------------------------------------------------------
def _denorm(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x * std + mean


def test_overlay_keeps_shape_dtype_labels_and_flips_map_with_image():
    n = 8
    data = ImageData(_images(n, size=6, seed=3), torch.arange(n), [str(i) for i in range(n)])
    plain = Batches(data, n, 12, train=True, seed=5)  # resized 6 -> 12 on the batch
    # the map is the image's own red channel: after the same resize and flip they must agree
    over = plain.with_overlay(Overlay(data.images[:, 0].clone(), prob=1.0, alpha=1.0))
    (x, y), (xo, yo) = next(plain.epoch(1)), next(over.epoch(1))
    assert torch.equal(y, yo) and xo.shape == x.shape and xo.dtype == x.dtype
    red = _denorm(x)[:, :1]
    assert torch.allclose(_denorm(xo), red.expand(-1, 3, -1, -1), atol=1e-5)
    # this epoch mirrors some images and not others (labels are the example indices)
    unflipped = _denorm(preprocess(data.images[y], 12))
    flipped = [not torch.allclose(_denorm(x)[i], unflipped[i], atol=1e-5) for i in range(n)]
    assert any(flipped) and not all(flipped)
    # images are asymmetric, so an unflipped map would not have matched a flipped image
    assert not torch.allclose(unflipped[:, :1].flip(-1), unflipped[:, :1], atol=1e-3)


def test_overlay_draws_depend_only_on_seed_and_epoch_and_leave_plain_batches_unchanged():
    n = 16
    data = ImageData(_images(n, size=6, seed=4), torch.arange(n), [str(i) for i in range(n)])
    maps = torch.randint(0, 256, (n, 6, 6), dtype=torch.uint8)
    plain = Batches(data, 4, 6, train=True, seed=1)
    over = plain.with_overlay(Overlay(maps, prob=0.5, alpha=0.5, mode="mask"))
    assert plain.overlay is None and over.images is plain.images
    full = list(over.epoch(2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, over.epoch(2), strict=True))
    resumed = list(over.epoch(2, start_batch=2))  # a resumed epoch sees the same batches
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[2:], resumed, strict=True))
    base = list(plain.epoch(2))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(full, base, strict=True))
    changed = sum(
        int(not torch.allclose(a[0][i], b[0][i], atol=1e-5))  # resize order: ~1e-6
        for a, b in zip(full, base, strict=True)
        for i in range(4)
    )
    assert 0 < changed < n
    none = plain.with_overlay(Overlay(maps, prob=0.0, alpha=0.5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(none.epoch(2), base, strict=True))
    with pytest.raises(ValueError, match="uint8"):
        plain.with_overlay(Overlay(maps[:3], prob=0.5, alpha=0.5))


# ---- every preset end to end on digits -------------------------------------------------------
TINY = [  # on a shared 2-core machine every forward counts: 2 batches per epoch at 24x24
    "dataset.limit_train=64",
    "dataset.limit_test=40",
    "dataset.batch_size=32",
    "dataset.image_size=24",  # layer3 still 2x2, so AT compares 128 with 256 channels there
    "teacher.epochs=1",
    "kd.epochs=2",
    "score.probe_samples=64",
    "prune.bn_recal_batches=2",
    "profile.latency=false",
    "slice=planes",
    "slice.planes_keep={layer3:0.5}",  # one slicing step, AT across 128 vs 256 channels
    "slice.repair_epochs=1",
    "kd.ig.steps=4",
    "kd.ig.batch_size=64",
]
EXPECTED_KEYS = {
    "ce_only": {"ce", "w_ce"},
    "staged_cosine": {"ce", "logit_align", "feat_align", "alpha", "beta"},
    "hinton": {"ce", "kl", "alpha"},
    "attention_transfer": {"ce", "attention_transfer", "w_attention_transfer", "kl", "alpha"},
    "ig_overlay": {"ce", "kl", "alpha"},
    "ig_at": {"ce", "kl", "alpha", "attention_transfer", "w_attention_transfer"},
}


def _ok(proc):
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """`m2mdc run kd=ce_only` (the plain fine-tuning preset) whose teacher, scores and pruned
    student the other presets share."""
    cwd = tmp_path_factory.mktemp("kd_toolbox")
    _ok(run_cli("run", "kd=ce_only", *TINY, f"hydra.run.dir={cwd / 'ce_only'}", cwd=cwd))
    return cwd / "ce_only"


def _distill_epochs(run: Path) -> list[dict]:
    return json.loads((run / "distill" / "metrics.json").read_text())["epochs"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_end_to_end(base_run, preset):
    run = base_run
    if preset != "ce_only":
        run = base_run.parent / preset
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(
            base_run,
            run,
            ignore=shutil.ignore_patterns("distill", "slice", "profile", "summary.json"),
        )
        # ig_at runs distill, slice and profile (AT on the sliced widths, IG maps reused)
        command = "run" if preset == "ig_at" else "distill"
        proc = _ok(run_cli(command, f"kd={preset}", *TINY, f"hydra.run.dir={run}", cwd=run.parent))
        if preset.startswith("ig_"):
            assert "ig: computed 64 maps" in proc.stdout or "ig: reused 64" in proc.stdout
        if preset == "ig_at":
            assert "ig: reused 64 cached maps" in proc.stdout  # the slice repair's
    epochs = _distill_epochs(run)
    assert len(epochs) == 2
    for e in epochs:
        assert EXPECTED_KEYS[preset] <= set(e), sorted(e)
        assert all(torch.isfinite(torch.tensor(float(v))) for v in e.values())
    metrics = json.loads((run / "distill" / "metrics.json").read_text())
    assert metrics["kd"] == preset and metrics["terms"][0]["name"] == "ce"
    if preset in ("ce_only", "ig_at"):
        sl = json.loads((run / "slice" / "metrics.json").read_text())
        assert [s["stage"] for s in sl["steps"]] == ["layer3"]
        assert (run / "summary.json").is_file()
        repair = sl["steps"][0]["repair"][0]
        assert EXPECTED_KEYS[preset] <= set(repair)
