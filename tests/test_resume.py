"""Resumable training: a stopped fit continues to exactly the uninterrupted result."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn

from m2mdc.data.datasets import ImageData
from m2mdc.data.loader import Batches
from m2mdc.errors import M2MError
from m2mdc.train.loop import Interrupted, ce_loss, fit


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def data():
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (48, 3, 8, 8), generator=g, dtype=torch.uint8)
    d = ImageData(imgs, torch.arange(48) % 3, ["a", "b", "c"])
    return Batches(d, 8, 8, train=True, seed=3), Batches(d, 16, 8)


def run_fit(model, state_path, loss_fn, epochs=3):
    train, test = data()
    return fit(
        model,
        model.parameters(),
        train,
        test,
        epochs=epochs,
        lr=1e-2,
        grad_clip=1.0,
        loss_fn=loss_fn,
        state_path=state_path,
        fingerprint="fp",
        desc="t",
    )


def test_sigterm_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    ref = tiny()
    ref_hist = run_fit(ref, tmp_path / "ref.pt", ce_loss).history

    calls = {"n": 0}

    def stopping(m, x, y, epoch):
        calls["n"] += 1
        if epoch == 2 and calls["n"] == 9:  # second batch of epoch 2 (6 batches per epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return ce_loss(m, x, y, epoch)

    model = tiny()
    with pytest.raises(Interrupted, match="epoch 2, batch 3"):
        run_fit(model, tmp_path / "s.pt", stopping)
    resumed = tiny()  # a fresh process would rebuild the model from scratch
    result = run_fit(resumed, tmp_path / "s.pt", ce_loss)
    assert result.resumed_from == 1
    assert [h["test_top1"] for h in result.history] == [h["test_top1"] for h in ref_hist]
    assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in ref_hist]
    for a, b in zip(resumed.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_after_completed_epoch_is_exact(tmp_path):
    ref = tiny()
    ref_hist = run_fit(ref, tmp_path / "ref.pt", ce_loss).history
    first = tiny()
    run_fit(first, tmp_path / "s.pt", ce_loss, epochs=3)  # leaves the state of epoch 3
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["epoch"] == 3 and state["partial"] is None
    again = tiny()
    result = run_fit(again, tmp_path / "s.pt", ce_loss, epochs=3)
    assert result.resumed_from == 3 and result.history == ref_hist


def test_state_of_another_configuration_is_not_resumed(tmp_path):
    run_fit(tiny(), tmp_path / "s.pt", ce_loss, epochs=1)
    train, test = data()
    m = tiny()
    res = fit(
        m,
        m.parameters(),
        train,
        test,
        epochs=1,
        lr=1e-2,
        grad_clip=1.0,
        loss_fn=ce_loss,
        state_path=tmp_path / "s.pt",
        fingerprint="other",
        desc="t",
    )
    assert res.resumed_from == 0


def test_non_finite_loss_names_epoch_and_batch_and_keeps_last_good_state(tmp_path):
    def exploding(m, x, y, epoch):
        loss, logits, terms = ce_loss(m, x, y, epoch)
        if epoch == 2:
            loss = loss * float("nan")
        return loss, logits, terms

    with pytest.raises(M2MError, match="non-finite loss at epoch 2, batch 0"):
        run_fit(tiny(), tmp_path / "s.pt", exploding)
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
