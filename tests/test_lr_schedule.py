"""``teacher.lr_schedule`` / ``kd.lr_schedule``: constant (the default, unchanged training) or
a per-step cosine decay, resumable, fingerprinted only when not constant."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from m2mdc.data.datasets import ImageData
from m2mdc.data.loader import Batches
from m2mdc.train.loop import Interrupted, ce_loss, fit, lr_factor
from tests.conftest import tiny_classifier

LR, CLIP = 1e-2, 1.0
NO_FUSED = {"fused_adam": False}  # the hand-written loop below uses PyTorch's default Adam


tiny = tiny_classifier


def data() -> tuple[Batches, Batches]:
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    d = ImageData(imgs, torch.arange(40) % 3, ["a", "b", "c"])
    return Batches(d, 8, 8, train=True, seed=3), Batches(d, 20, 8)


def run(model, state_path, schedule, epochs=3, loss_fn=ce_loss, perf=NO_FUSED):
    train, test = data()
    return fit(
        model,
        model.parameters(),
        train,
        test,
        epochs=epochs,
        lr=LR,
        grad_clip=CLIP,
        loss_fn=loss_fn,
        state_path=state_path,
        fingerprint="fp",
        desc="t",
        perf=perf,
        lr_schedule=schedule,
    )


def test_cosine_factor_runs_from_one_to_zero() -> None:
    f = lr_factor("cosine", 10)
    assert f(0) == 1.0 and f(10) == pytest.approx(0.0, abs=1e-15)
    assert f(5) == pytest.approx(0.5)
    assert f(2) == pytest.approx((1 + math.cos(math.pi / 5)) / 2)
    assert all(f(t) > f(t + 1) for t in range(10))
    assert lr_factor("constant", 10)(7) == 1.0
    with pytest.raises(ValueError, match="constant, cosine"):
        lr_factor("step", 10)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_fit_is_a_hand_written_loop_with_the_scheduled_rate(tmp_path, schedule) -> None:
    """The same weights as Adam stepped by hand at lr (constant) or lr * (1 + cos(pi t / T))
    / 2 at step t (cosine); cosine rows record the rate of their epoch's last step."""
    epochs = 3
    model = tiny()
    result = run(model, tmp_path / "s.pt", schedule, epochs)

    ref = tiny().train()
    train, _ = data()
    total = epochs * len(train)

    def rate(t: int) -> float:
        return LR if schedule == "constant" else LR * 0.5 * (1 + math.cos(math.pi * t / total))

    opt = torch.optim.Adam(ref.parameters(), lr=LR)
    t = 0
    for epoch in range(1, epochs + 1):
        for x, y in train.epoch(epoch):
            if schedule == "cosine":  # the constant run never touches the rate
                for group in opt.param_groups:
                    group["lr"] = rate(t)
            loss = F.cross_entropy(ref(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(ref.parameters()), CLIP)
            opt.step()
            t += 1
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    if schedule == "constant":
        assert all("lr" not in h for h in result.history)
    else:
        expected = [rate(e * len(train) - 1) for e in range(1, epochs + 1)]
        assert [h["lr"] for h in result.history] == pytest.approx(expected)


def test_interrupted_cosine_run_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    ref = tiny()
    ref_hist = run(ref, tmp_path / "ref.pt", "cosine", perf=None).history
    calls = {"n": 0}

    def stopping(m, x, y, epoch):
        calls["n"] += 1
        if epoch == 2 and calls["n"] == 7:  # second batch of epoch 2 (5 batches per epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return ce_loss(m, x, y, epoch)

    with pytest.raises(Interrupted):
        run(tiny(), tmp_path / "s.pt", "cosine", loss_fn=stopping, perf=None)
    resumed = tiny()
    result = run(resumed, tmp_path / "s.pt", "cosine", perf=None)
    assert result.resumed_from == 1
    assert result.history == ref_hist
    for a, b in zip(resumed.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_cosine_state_is_not_continued_by_a_fit_of_another_length(tmp_path) -> None:
    """A 3-epoch cosine run's epoch-2 state decayed for 3 epochs: a 4-epoch fit starts over."""

    def stop_after_epoch_2(m, x, y, epoch):
        if epoch == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return ce_loss(m, x, y, epoch)

    with pytest.raises(Interrupted):
        run(tiny(), tmp_path / "s.pt", "cosine", epochs=3, loss_fn=stop_after_epoch_2)
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["lr_schedule"] == {"name": "cosine", "total_steps": 15}
    longer = run(tiny(), tmp_path / "s.pt", "cosine", epochs=4)
    assert longer.resumed_from == 0 and len(longer.history) == 4
    fresh = run(tiny(), tmp_path / "fresh.pt", "cosine", epochs=4)
    assert longer.history == fresh.history


def test_lr_schedules_enter_the_fingerprints_only_when_not_constant(compose_cfg, tmp_path):
    import m2mdc.stages  # noqa: F401  (registers the stages)
    from m2mdc.stage import Context

    def fingerprints(*overrides):
        ctx = Context(compose_cfg(*overrides), tmp_path)
        stages = ("teacher", "distill", "slice", "peer_torch_pruning", "teacher_same_epochs")
        return {s: ctx.fingerprint(s) for s in stages}

    paper = "recipe=paper"  # a recipe with the constant rate (the default's KD rate is cosine)
    base = fingerprints(paper)
    assert fingerprints(paper, "teacher.lr_schedule=constant", "kd.lr_schedule=constant") == base
    kd = fingerprints(paper, "kd.lr_schedule=cosine")
    assert kd["teacher"] == base["teacher"]
    # the comparisons build on the slice stage (their epoch budget is the students')
    downstream = ("distill", "slice", "peer_torch_pruning", "teacher_same_epochs")
    assert all(kd[s] != base[s] for s in downstream)
    teacher = fingerprints(paper, "teacher.lr_schedule=cosine")
    assert all(teacher[s] != base[s] for s in base)  # every later stage builds on the teacher
