"""Held-out model selection: dataset.val_fraction and select=best_val|last."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch import nn

import m2mdc.train.loop as loop
from m2mdc.config import validate
from m2mdc.data.datasets import ImageData, split_validation
from m2mdc.data.loader import Batches
from m2mdc.errors import M2MError
from m2mdc.train.loop import ce_loss, fit
from tests.conftest import run_cli


def make_data(counts: dict[int, int], seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in counts.items()])
    images = torch.randint(0, 256, (len(labels), 3, 8, 8), dtype=torch.uint8, generator=g)
    return ImageData(images, labels, [str(c) for c in counts])


def test_validation_split_is_disjoint_stratified_and_fixed():
    counts = {0: 300, 1: 100, 2: 50}  # unbalanced, so stratification is visible
    data = make_data(counts)
    # tag every example with its index (first pixel bytes), to identify it after the split
    data.images[:, 0, 0, 0] = torch.arange(len(data)) % 256
    data.images[:, 0, 0, 1] = torch.arange(len(data)) // 256
    train, val = split_validation(data, 0.2)

    def ids(d: ImageData) -> set[int]:
        return set((d.images[:, 0, 0, 0].long() + 256 * d.images[:, 0, 0, 1].long()).tolist())

    assert ids(train).isdisjoint(ids(val)) and ids(train) | ids(val) == set(range(len(data)))
    assert len(val) == round(0.2 * len(data))
    per_class = Counter(val.labels.tolist())
    for c, n in counts.items():  # each class keeps its share, within one example
        assert abs(per_class[c] - 0.2 * n) <= 1
    _, again_val = split_validation(data, 0.2)
    assert ids(again_val) == ids(val)  # fixed: no dependence on global RNG or the run's seed


def test_validation_fraction_that_leaves_no_training_is_refused():
    with pytest.raises(M2MError, match=r"dataset.val_fraction=0.9 leaves too few"):
        split_validation(make_data({0: 5, 1: 5}), 0.9)


def test_best_val_without_a_validation_split_is_refused(compose_cfg):
    with pytest.raises(M2MError, match=r"select=best_val needs a validation split"):
        validate(compose_cfg("select=best_val"))
    validate(compose_cfg("select=best_val", "dataset.val_fraction=0.1"))
    with pytest.raises(M2MError, match=r"dataset.val_fraction=1.0 is out of range"):
        validate(compose_cfg("dataset.val_fraction=1.0"))


def _fit(tmp_path, val, select, epochs, monkeypatch, scripted):
    """A tiny fit whose validation accuracies are the ``scripted`` sequence."""
    real = loop.evaluate
    seq = iter(scripted)

    def fake_evaluate(model, batches, perf=None):
        if batches is val:
            return {"top1": next(seq), "loss": 0.0}
        return real(model, batches, perf)

    monkeypatch.setattr(loop, "evaluate", fake_evaluate)
    torch.manual_seed(0)
    data = make_data({0: 32, 1: 32})
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    result = fit(
        model,
        model.parameters(),
        Batches(data, 16, 8, train=True, seed=1),
        Batches(data, 64, 8),
        epochs=epochs,
        lr=5e-2,
        grad_clip=1.0,
        loss_fn=ce_loss,
        state_path=tmp_path / "state.pt",
        fingerprint="fp",
        desc="t",
        val=val,
        select=select,
    )
    return model, result


def test_best_val_keeps_the_best_epoch_weights_and_records_both(tmp_path, monkeypatch):
    val = Batches(make_data({0: 8, 1: 8}, seed=5), 16, 8)
    model, res = _fit(tmp_path / "a", val, "best_val", 3, monkeypatch, [10.0, 50.0, 30.0])
    assert res.selected == 2 and [r["val_top1"] for r in res.history] == [10.0, 50.0, 30.0]
    sel = res.selection()
    assert (sel["selected_epoch"], sel["last_epoch"]) == (2, 3)
    assert sel["selected_test_top1"] == res.history[1]["test_top1"]
    assert sel["last_test_top1"] == res.history[2]["test_top1"]
    # the weights are those after epoch 2: the same fit stopped after 2 epochs (CPU, seeded)
    ref, _ = _fit(tmp_path / "b", val, "last", 2, monkeypatch, [10.0, 50.0])
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a rerun of the finished fit resumes its state: the same selection and weights
    again, res2 = _fit(tmp_path / "a", val, "best_val", 3, monkeypatch, [])
    assert res2.selected == 2
    for a, b in zip(again.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_last_keeps_the_last_epoch_and_ties_keep_the_earliest(tmp_path, monkeypatch):
    val = Batches(make_data({0: 8, 1: 8}, seed=5), 16, 8)
    _, res = _fit(tmp_path / "a", val, "last", 3, monkeypatch, [10.0, 50.0, 30.0])
    assert res.selected == 3
    _, res = _fit(tmp_path / "b", val, "best_val", 3, monkeypatch, [40.0, 40.0, 20.0])
    assert res.selected == 1


@pytest.mark.slow
def test_run_with_best_val_reports_the_selected_epoch(tmp_path):
    from tests.test_e2e import TINY, _ok

    run = tmp_path / "run"
    tiny = [t for t in TINY if not t.startswith("teacher.epochs=")]
    _ok(
        run_cli(
            "run",
            *tiny,
            "teacher.epochs=3",
            "slice=none",
            "dataset.val_fraction=0.25",
            "select=best_val",
            f"hydra.run.dir={run}",
            cwd=tmp_path,
        )
    )
    for stage in ("teacher", "distill"):
        m = json.loads((run / stage / "metrics.json").read_text())
        vals = [e["val_top1"] for e in m["epochs"]]
        best = vals.index(max(vals)) + 1  # the earliest best epoch
        assert m["selected_epoch"] == best and m["last_epoch"] == len(vals)
        assert m["top1"] == m["epochs"][best - 1]["test_top1"]


def test_neutral_new_settings_stay_out_of_the_fingerprints(compose_cfg, tmp_path):
    import m2mdc.stages  # noqa: F401  (registers the stages)
    from m2mdc.stage import Context

    def fingerprints(*overrides):
        ctx = Context(compose_cfg(*overrides), tmp_path)
        return {s: ctx.fingerprint(s) for s in ("teacher", "prune", "distill", "slice")}, ctx

    base, ctx = fingerprints()
    assert "val_fraction" not in ctx.stage_config("teacher")["dataset"]
    assert "select" not in ctx.stage_config("teacher") and "budget" not in ctx.stage_config("prune")
    explicit, _ = fingerprints("dataset.val_fraction=0.0", "select=last", "budget.ratios=[0.5]")
    assert explicit == base  # neutral values (and the settings of an off allocator) change nothing
    selected, _ = fingerprints("dataset.val_fraction=0.1", "select=best_val")
    assert all(selected[s] != base[s] for s in base)
    budgeted, _ = fingerprints("budget.macs=0.3")
    assert budgeted["teacher"] == base["teacher"] and budgeted["prune"] != base["prune"]
