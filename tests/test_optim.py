"""Optimizer and schedule settings of a training section (``teacher.*``, ``kd.*``): Adam or
SGD (momentum, Nesterov, weight decay without norms and biases), label smoothing and a linear
warmup before the lr schedule; resumable exactly, and fingerprinted when not at the default."""

from __future__ import annotations

import dataclasses
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from m2mdc.cli import main
from m2mdc.config import validate
from m2mdc.data.datasets import ImageData
from m2mdc.data.loader import Batches
from m2mdc.distill.losses import KDOutputs, ce
from m2mdc.errors import M2MError
from m2mdc.train.loop import Interrupted, TrainSpec, fit, lr_factor
from m2mdc.train.optim import Optim, make
from tests.conftest import tiny_classifier

LR, CLIP, WD, MOMENTUM, SMOOTH = 0.05, 1.0, 1e-3, 0.9, 0.1
SGD = Optim("sgd", momentum=MOMENTUM, nesterov=True, weight_decay=WD)


def data() -> tuple[Batches, Batches]:
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    d = ImageData(imgs, torch.arange(40) % 3, ["a", "b", "c"])
    return Batches(d, 8, 8, train=True, seed=3, augment="cifar"), Batches(d, 20, 8)


def run(model, state_path, epochs=2, loss_fn=None, warmup_epochs=1):
    """SGD with warmup, cosine, label smoothing and cifar crops (5 batches per epoch)."""
    train, test = data()
    spec = TrainSpec(
        epochs=epochs,
        lr=LR,
        grad_clip=CLIP,
        state_path=state_path,
        fingerprint="fp",
        desc="t",
        lr_schedule="cosine",
        optim=SGD,
        label_smoothing=SMOOTH,
        warmup_epochs=warmup_epochs,
    )
    return fit(
        model, model.parameters(), train, test, spec, loss_fn=loss_fn or spec.cross_entropy()
    )


def test_warmup_is_linear_per_step_then_the_schedule_over_the_rest() -> None:
    f = lr_factor("cosine", 100, warmup_steps=10)
    assert [f(t) for t in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == 1.0  # the cosine starts over the remaining 90 steps
    assert f(55) == pytest.approx(0.5)  # halfway through those 90
    assert f(40) == pytest.approx((1 + math.cos(math.pi * 30 / 90)) / 2)
    assert f(100) == pytest.approx(0.0, abs=1e-15)
    constant = lr_factor("constant", 100, warmup_steps=4)
    assert [constant(t) for t in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_factor("cosine", 100)(50) == lr_factor("cosine", 100, 0)(50) == pytest.approx(0.5)


def test_sgd_decays_conv_and_linear_weights_but_not_biases_and_norm_weights() -> None:
    """With zero gradients only the decay moves the weights: every decayed weight moves toward
    zero (one Nesterov SGD step multiplies it by 1 - lr wd (1 + momentum)), the others stay."""
    for optim in (SGD, Optim("adam", weight_decay=WD)):
        model = tiny_classifier()
        params = list(model.parameters())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = make(params, LR, optim, None)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        for name, p in model.named_parameters():
            old = before[name]
            if name in ("0.weight", "5.weight"):  # the conv's and the linear layer's
                assert ((p - old) * old < 0).all(), (optim.name, name)  # toward zero
                if optim.name == "sgd":
                    factor = 1 - LR * WD * (1 + MOMENTUM)
                    assert torch.allclose(p, old * factor, rtol=1e-6, atol=0)
            else:  # biases, BatchNorm weight and bias
                assert torch.equal(p, old), (optim.name, name)


def test_sgd_weight_decay_defaults_to_5e_4_and_adam_to_none() -> None:
    assert Optim("sgd").decay == 5e-4 and Optim("adam").decay == 0.0
    assert Optim("adam", weight_decay=0.01).decay == 0.01
    opt = make(list(tiny_classifier().parameters()), 0.1, Optim("sgd"), None)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    adam = make(list(tiny_classifier().parameters()), 0.1, Optim(), None)
    assert isinstance(adam, torch.optim.Adam) and len(adam.param_groups) == 1


def test_label_smoothing_is_cross_entropy_against_smoothed_targets() -> None:
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 5, generator=g), torch.arange(6) % 5
    q = torch.full((6, 5), SMOOTH / 5) + (1 - SMOOTH) * F.one_hot(y, 5)
    by_hand = -(q * logits.log_softmax(1)).sum(1).mean()
    expected = F.cross_entropy(logits, y, label_smoothing=SMOOTH)
    assert torch.allclose(by_hand, expected, atol=1e-6)
    spec = TrainSpec(1, 0.1, 0.0, "s", "f", "t", label_smoothing=SMOOTH)
    loss, _, terms = spec.cross_entropy()(lambda x: x, logits, y, 1)
    assert torch.equal(loss, expected) and torch.equal(terms["ce"], expected)
    o = KDOutputs(logits, logits, logits, logits, y, label_smoothing=SMOOTH)
    assert torch.equal(ce(o), expected)
    assert torch.equal(ce(KDOutputs(logits, logits, logits, logits, y)), F.cross_entropy(logits, y))


def test_fit_is_a_hand_written_sgd_loop(tmp_path) -> None:
    """Nesterov SGD with decay only on the weights of two or more dimensions, a one-epoch
    linear warmup then cosine, label smoothing and clipping, written out step by step: the
    same weights bit for bit."""
    epochs = 3
    model = tiny_classifier()
    run(model, tmp_path / "s.pt", epochs)

    ref = tiny_classifier().train()
    params = list(ref.parameters())
    train, _ = data()
    warm, total = len(train), epochs * len(train)
    bufs: list[torch.Tensor | None] = [None] * len(params)
    t = 0
    for epoch in range(1, epochs + 1):
        for x, y in train.epoch(epoch):
            if t < warm:
                rate = LR * ((t + 1) / warm)
            else:
                rate = LR * (
                    0.5 * (1.0 + math.cos(math.pi * min(t - warm, total - warm) / (total - warm)))
                )
            loss = F.cross_entropy(ref(x), y, label_smoothing=SMOOTH)
            for p in params:
                p.grad = None
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            with torch.no_grad():
                for i, p in enumerate(params):
                    grad = p.grad.add(p, alpha=WD) if p.ndim > 1 else p.grad
                    bufs[i] = grad.clone() if bufs[i] is None else bufs[i].mul_(MOMENTUM).add_(grad)
                    p.add_(grad.add(bufs[i], alpha=MOMENTUM), alpha=-rate)
            t += 1
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("stop_epoch", "stop_call"), [(1, 5), (2, 7)])
def test_sgd_training_stopped_and_resumed_equals_two_epochs_in_one_go(
    tmp_path, stop_epoch, stop_call
) -> None:
    """Stopped after epoch 1 (a signal in its last batch) or in epoch 2's second batch, then
    resumed: the momentum buffers, the warmup-cosine position and the crops continue exactly."""
    ref = tiny_classifier()
    ref_hist = run(ref, tmp_path / "ref.pt").history
    calls = {"n": 0}

    def stopping(m, x, y, epoch):
        calls["n"] += 1
        if calls["n"] == stop_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return TrainSpec(1, LR, CLIP, "s", "f", "t", label_smoothing=SMOOTH).cross_entropy()(
            m, x, y, epoch
        )

    with pytest.raises(Interrupted, match=f"epoch {stop_epoch}"):
        run(tiny_classifier(), tmp_path / "s.pt", loss_fn=stopping)
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["optimizer"]["state"][0]["momentum_buffer"] is not None
    assert state["lr_schedule"] == {"name": "cosine", "total_steps": 10, "warmup_steps": 5}
    resumed = tiny_classifier()
    result = run(resumed, tmp_path / "s.pt")
    assert result.resumed_from == 1
    assert result.history == ref_hist
    for a, b in zip(resumed.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_state_with_another_warmup_is_not_continued(tmp_path) -> None:
    def stop_in_epoch_2(m, x, y, epoch):
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return TrainSpec(1, LR, CLIP, "s", "f", "t", label_smoothing=SMOOTH).cross_entropy()(
            m, x, y, epoch
        )

    with pytest.raises(Interrupted):
        run(tiny_classifier(), tmp_path / "s.pt", loss_fn=stop_in_epoch_2)
    other = run(tiny_classifier(), tmp_path / "s.pt", warmup_epochs=0)
    assert other.resumed_from == 0


def test_a_section_gives_its_optimizer_settings(compose_cfg) -> None:
    cfg = compose_cfg(
        "teacher.optim=sgd",
        "teacher.momentum=0.8",
        "teacher.nesterov=false",
        "teacher.weight_decay=1e-4",
        "teacher.label_smoothing=0.1",
        "teacher.warmup_epochs=2",
    )
    spec = TrainSpec.of(cfg, "teacher", epochs=3, state_path="s", fingerprint="f", desc="t")
    assert spec.optim == Optim("sgd", momentum=0.8, nesterov=False, weight_decay=1e-4)
    assert (spec.label_smoothing, spec.warmup_epochs) == (0.1, 2)
    kd = TrainSpec.of(cfg, "kd", epochs=3, state_path="s", fingerprint="f", desc="d")
    assert (kd.optim, kd.label_smoothing, kd.warmup_epochs) == (Optim(), 0.0, 0)


def fingerprints(compose_cfg, tmp_path, *overrides, cfg=None) -> dict[str, str]:
    import m2mdc.stages  # noqa: F401  (registers the stages)
    from m2mdc.stage import Context

    ctx = Context(cfg if cfg is not None else compose_cfg(*overrides), tmp_path)
    stages = ("teacher", "score", "distill", "slice", "peer_torch_pruning", "teacher_same_epochs")
    return {s: ctx.fingerprint(s) for s in stages}


NEW_KEYS = {
    "dataset": ("augment",),
    "teacher": (
        "optim",
        "momentum",
        "nesterov",
        "weight_decay",
        "label_smoothing",
        "warmup_epochs",
    ),
    "kd": ("optim", "momentum", "nesterov", "weight_decay", "label_smoothing", "warmup_epochs"),
}


def test_the_defaults_keep_the_fingerprints_of_runs_made_before_these_settings(
    compose_cfg, tmp_path, monkeypatch
) -> None:
    from m2mdc.stage import STAGES

    new = fingerprints(compose_cfg, tmp_path)
    before = OmegaConf.to_container(compose_cfg())
    for section, keys in NEW_KEYS.items():
        for key in keys:
            del before[section][key]
    peer = STAGES["peer_torch_pruning"]  # the kd settings it read before
    old_keys = ("peer", "kd.lr", "kd.lr_schedule", "kd.grad_clip", "prune.bn_recal_batches")
    monkeypatch.setitem(STAGES, peer.name, dataclasses.replace(peer, keys=(*old_keys, "select")))
    assert fingerprints(compose_cfg, tmp_path, cfg=OmegaConf.create(before)) == new


KD_STAGES = ("distill", "slice", "peer_torch_pruning", "teacher_same_epochs")


@pytest.mark.parametrize(
    ("override", "changed"),
    [
        ("dataset.augment=cifar", "all"),
        ("dataset.augment=imagenet", "all"),
        ("teacher.optim=sgd", "all"),
        ("teacher.momentum=0.5", "all"),
        ("teacher.nesterov=false", "all"),
        ("teacher.weight_decay=0.01", "all"),
        ("teacher.label_smoothing=0.1", "all"),
        ("teacher.warmup_epochs=1", "all"),
        ("kd.optim=sgd", KD_STAGES),
        ("kd.momentum=0.5", KD_STAGES),
        ("kd.nesterov=false", KD_STAGES),
        ("kd.weight_decay=0.01", KD_STAGES),
        ("kd.label_smoothing=0.1", KD_STAGES),
        ("kd.warmup_epochs=1", KD_STAGES),
    ],
)
def test_each_setting_enters_the_fingerprint_of_every_training_it_changes(
    compose_cfg, tmp_path, override, changed
) -> None:
    """So a state or output made under other settings is never resumed or reused; the peer
    trains with the kd section's optimizer, like its rate."""
    base = fingerprints(compose_cfg, tmp_path)
    new = fingerprints(compose_cfg, tmp_path, override)
    expected = set(base) if changed == "all" else set(changed)
    assert {s for s in base if new[s] != base[s]} == expected


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("teacher.optim=adamw", "teacher.optim='adamw' is not valid; choose one of: adam, sgd"),
        ("kd.optim=lion", "kd.optim='lion' is not valid; choose one of: adam, sgd"),
        ("teacher.momentum=1.0", "teacher.momentum=1.0 is out of range; allowed: >= 0 and < 1"),
        ("kd.weight_decay=-1", "kd.weight_decay=-1.0 is out of range; allowed: >= 0"),
        ("kd.label_smoothing=1", "kd.label_smoothing=1.0 is out of range; allowed: >= 0 and < 1"),
        ("teacher.warmup_epochs=-2", "teacher.warmup_epochs=-2 is out of range; allowed: >= 0"),
        (
            "dataset.augment=randaugment",
            "dataset.augment='randaugment' is not valid; choose one of: flip, cifar, imagenet",
        ),
    ],
)
def test_bad_values_are_refused_in_one_line(override, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"m2mdc: error: {expected}"
    assert not (tmp_path / "outputs").exists()


def test_nesterov_without_momentum_is_refused(compose_cfg) -> None:
    with pytest.raises(M2MError) as err:
        validate(compose_cfg("kd.optim=sgd", "kd.momentum=0"))
    assert str(err.value) == (
        "kd.nesterov=true needs momentum; set kd.momentum > 0 (e.g. kd.momentum=0.9), or "
        "kd.nesterov=false"
    )
    validate(compose_cfg("kd.optim=sgd", "kd.momentum=0", "kd.nesterov=false"))
    validate(compose_cfg("kd.momentum=0"))  # adam: momentum is not read


def test_cifar10_standard_is_the_fields_recipe(compose_cfg, tmp_path) -> None:
    cfg = compose_cfg("experiment=cifar10_standard", f"dataset.root={tmp_path}")
    validate(cfg)
    t = cfg.teacher
    assert (cfg.model.name, cfg.model.pretrained, cfg.dataset.image_size) == ("resnet18", False, 32)
    assert (cfg.dataset.augment, cfg.dataset.batch_size) == ("cifar", 128)
    assert (t.optim, t.lr, t.momentum, t.nesterov, t.weight_decay) == ("sgd", 0.1, 0.9, True, 5e-4)
    assert (t.warmup_epochs, t.lr_schedule, t.unfreeze) == (1, "cosine", "all")
