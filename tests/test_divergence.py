"""Divergence stops training: a loss that explodes or turns non-finite is a one-line error
naming the stage, epoch, batch, loss, reference and the learning-rate setting to lower."""

from __future__ import annotations

import re

import pytest
import torch

from m2mdc.data.datasets import ImageData
from m2mdc.data.loader import Batches
from m2mdc.errors import M2MError
from m2mdc.train.loop import ce_loss, fit
from tests.conftest import run_cli, tiny_classifier
from tests.test_e2e import TINY

FACTOR = 1e3  # the documented rule: over 1000x the mean of the first 20 positive batch losses


def data() -> tuple[Batches, Batches]:
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (48, 3, 8, 8), generator=g, dtype=torch.uint8)
    d = ImageData(imgs, torch.arange(48) % 3, ["a", "b", "c"])
    return Batches(d, 8, 8, train=True, seed=3), Batches(d, 16, 8)


def run(model, state_path, loss_fn=ce_loss, lr=1e-2, epochs=3):
    train, test = data()
    return fit(
        model,
        model.parameters(),
        train,
        test,
        epochs=epochs,
        lr=lr,
        grad_clip=0.0,
        loss_fn=loss_fn,
        state_path=state_path,
        fingerprint="fp",
        desc="teacher",
        lr_key="teacher.lr",
    )


def recording(losses: list[float], scale=lambda epoch: 1.0):
    def loss_fn(m, x, y, epoch):
        loss, logits, terms = ce_loss(m, x, y, epoch)
        loss = loss * scale(epoch)
        losses.append(float(loss.detach()))
        return loss, logits, terms

    return loss_fn


def test_an_absurd_learning_rate_stops_at_the_first_exploding_batch(tmp_path) -> None:
    losses: list[float] = []
    with pytest.raises(M2MError) as err:
        run(tiny_classifier(), tmp_path / "s.pt", recording(losses), lr=1e3)
    msg = str(err.value)
    # the first batch over FACTOR x the mean of the positive batch losses before it
    bad = next(i for i in range(1, len(losses)) if losses[i] > FACTOR * sum(losses[:i]) / i)
    ref = sum(losses[:bad]) / bad
    assert msg.startswith(f"teacher: diverged at epoch 1, batch {bad}: ")
    assert f"loss {losses[bad]:.4g} is over 1000x the mean of the first batches ({ref:.4g})" in msg
    assert "teacher.lr (it is 1000; e.g. teacher.lr=100)" in msg
    assert "no state of this training was saved yet" in msg and "\n" not in msg
    assert not (tmp_path / "s.pt").exists()


def test_divergence_after_an_epoch_names_the_state_that_resumes(tmp_path) -> None:
    ref_model = tiny_classifier()
    ref = run(ref_model, tmp_path / "ref.pt")
    state = tmp_path / "s.pt"
    with pytest.raises(M2MError) as err:  # epoch 2's loss blows up by 1e6
        run(tiny_classifier(), state, recording([], lambda e: 1e6 if e == 2 else 1.0))
    msg = str(err.value)
    assert msg.startswith("teacher: diverged at epoch 2, batch 0: ")
    named = re.search(r"the last good state \(after epoch 1\) is (\S+);", msg)
    assert named and named.group(1) == str(state) and state.is_file()
    assert torch.load(state, weights_only=True)["epoch"] == 1
    resumed = tiny_classifier()
    result = run(resumed, state)  # the same command with the fault gone continues exactly
    assert result.resumed_from == 1 and result.history == ref.history
    for a, b in zip(resumed.state_dict().values(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_healthy_training_does_not_trip_whatever_the_loss_scale(tmp_path) -> None:
    """A loss scaled by 1e6 (a sum of heavily weighted terms) trains as usual: the rule is a
    ratio. A first epoch with zero loss (every ramped weight still 0) sets no reference."""
    losses: list[float] = []
    run(tiny_classifier(), tmp_path / "a.pt", recording(losses, lambda e: 1e6), lr=1e-2)
    assert len(losses) == 18 and min(losses) > 1e5
    losses = []
    result = run(tiny_classifier(), tmp_path / "b.pt", recording(losses, lambda e: e - 1.0))
    assert losses[:6] == [0.0] * 6 and min(losses[6:]) > 0
    assert len(result.history) == 3


@pytest.mark.slow
def test_run_with_a_diverging_teacher_exits_2_before_any_later_stage(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli("run", *TINY, "teacher.lr=1e3", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("m2mdc: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert re.match(r"m2mdc: error: teacher: diverged at epoch 1, batch \d+: loss ", errors[0])
    assert "teacher.lr (it is 1000; e.g. teacher.lr=100)" in errors[0]
    assert not (run_dir / "teacher" / "model.pt").exists()
    assert not (run_dir / "score").exists()
