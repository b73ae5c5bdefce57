"""A training tree without a test split (``train/`` only) runs on ``dataset.val_fraction``: the
validation split stands in for the test split in every metric, the summary and the report, and
is labelled as validation, never as test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from m2mdc.artifacts import load_checkpoint
from m2mdc.data.datasets import load_train_val
from m2mdc.data.loader import Batches
from m2mdc.train.loop import evaluate
from tests.conftest import run_cli
from tests.test_data import ds_cfg

pytestmark = pytest.mark.slow

PER_CLASS = 24
SETTINGS = [
    "experiment=cifar10_subset",
    "dataset.val_fraction=0.25",
    "dataset.batch_size=32",
    "teacher.epochs=1",
    "kd.epochs=1",
    "slice.repair_epochs=1",
    "score.probe_samples=64",
    "prune.bn_recal_batches=2",
    "profile.latency_repeats=2",
    "profile.latency_warmup=1",
    "compare=[torch_pruning]",
]


@pytest.fixture(scope="module")
def train_only(cifar_root, tmp_path_factory) -> Path:
    """The subset's first PER_CLASS training images of each class, with no test folder."""
    root = tmp_path_factory.mktemp("train-only")
    for cls in sorted((cifar_root / "train").iterdir()):
        (root / "train" / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:PER_CLASS]:
            shutil.copy(f, root / "train" / cls.name / f.name)
    return root


@pytest.fixture(scope="module")
def val_run(train_only, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("val-run")
    run = cwd / "run"
    proc = run_cli("run", *SETTINGS, f"dataset.root={train_only}", f"hydra.run.dir={run}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


def _metrics(run: Path) -> dict[str, dict]:
    return {
        st: json.loads((run / st / "metrics.json").read_text())
        for st in ("teacher", "prune", "distill", "slice", "peer_torch_pruning")
    }


def test_every_stage_reports_the_validation_split(val_run):
    run, proc = val_run
    metrics = _metrics(run)
    assert {st: m["top1_split"] for st, m in metrics.items()} == dict.fromkeys(metrics, "val")
    for st in ("teacher", "distill", "peer_torch_pruning"):
        rows = metrics[st]["epochs"]
        assert rows and all("val_top1" in r and "test_top1" not in r for r in rows), st
    summary = json.loads((run / "summary.json").read_text())
    assert summary["top1_split"] == "val"
    out = proc.stdout + proc.stderr
    assert "val top1" in out and "test top1" not in out


def test_reported_top1_is_the_validation_splits(val_run, train_only):
    """The teacher's recorded top1 is its accuracy on the held-out quarter of train/."""
    run, _ = val_run
    ds = ds_cfg(name="imagefolder", root=str(train_only), val_fraction=0.25, image_size=32)
    train, val = load_train_val(ds)
    assert val is not None and (len(train), len(val)) == (10 * PER_CLASS * 3 // 4, 60)
    teacher, _ = load_checkpoint(run / "teacher" / "model.pt")
    measured = evaluate(teacher, Batches(val, 64, 32))["top1"]
    assert _metrics(run)["teacher"]["top1"] == pytest.approx(measured, abs=1e-6)


def test_report_names_the_validation_split(val_run, tmp_path):
    run, _ = val_run
    proc = run_cli("report", str(run), "--out", str(tmp_path / "rep"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = next((tmp_path / "rep").glob("*.md")).read_text()
    assert "Top-1 per seed (%, validation split)" in md
    assert "test split" not in md
