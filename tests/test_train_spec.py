"""TrainSpec: one training section's settings, read from its config section once."""

from __future__ import annotations

import pytest
import torch

from m2mdc.data.datasets import ImageData
from m2mdc.data.loader import Batches
from m2mdc.train.loop import TrainSpec, ce_loss, fit
from tests.conftest import tiny_classifier


def test_a_section_gives_its_rate_clip_schedule_and_the_run_settings(compose_cfg) -> None:
    cfg = compose_cfg("kd.lr=0.003", "kd.grad_clip=2.5", "kd.lr_schedule=cosine", "teacher.lr=0.5")
    spec = TrainSpec.of(cfg, "kd", epochs=4, state_path="s.pt", fingerprint="f", desc="distill")
    assert (spec.lr, spec.grad_clip, spec.lr_schedule, spec.lr_key) == (
        0.003,
        2.5,
        "cosine",
        "kd.lr",
    )
    assert (spec.select, spec.perf, spec.epochs, spec.epoch_offset) == (
        str(cfg.select),
        cfg.perf,
        4,
        0,
    )
    teacher = TrainSpec.of(cfg, "teacher", epochs=1, state_path="s", fingerprint="f", desc="t")
    assert (teacher.lr, teacher.lr_key) == (0.5, "teacher.lr")


def test_the_spec_and_its_fields_as_keywords_train_alike(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    d = ImageData(
        torch.randint(0, 256, (24, 3, 8, 8), generator=g, dtype=torch.uint8),
        torch.arange(24) % 3,
        ["a", "b", "c"],
    )
    fields = {"epochs": 2, "lr": 1e-2, "grad_clip": 1.0, "fingerprint": "fp", "desc": "t"}
    runs = []
    for name in ("spec", "keywords"):
        model = tiny_classifier()
        train, test = Batches(d, 8, 8, train=True, seed=3), Batches(d, 24, 8)
        path = tmp_path / f"{name}.pt"
        if name == "spec":
            res = fit(
                model,
                model.parameters(),
                train,
                test,
                TrainSpec(state_path=path, **fields),
                loss_fn=ce_loss,
            )
        else:
            res = fit(
                model, model.parameters(), train, test, state_path=path, loss_fn=ce_loss, **fields
            )
        runs.append((res.history, model.state_dict()))
    (hist_a, state_a), (hist_b, state_b) = runs
    assert hist_a == hist_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    spec = TrainSpec(state_path=tmp_path / "x.pt", **fields)
    with pytest.raises(TypeError, match="not both: epochs"):
        fit(model, model.parameters(), train, test, spec, loss_fn=ce_loss, epochs=3)
