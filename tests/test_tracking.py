"""``logger=``: experiment tracking to CSV, TensorBoard and MLflow (m2mdc.tracking).

Unit tests drive :func:`m2mdc.train.loop.fit` with a recording tracker; the end-to-end tests
run the real command once with all three backends and read each store back, checking it
against the run's own JSON files.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from m2mdc import cli, pipeline, tracking
from m2mdc.data.datasets import ImageData
from m2mdc.data.loader import Batches
from m2mdc.errors import Interrupted, M2MError
from m2mdc.train.loop import LOG_EVERY, ce_loss, fit
from tests.conftest import run_cli, tiny_classifier
from tests.test_e2e import TINY
from tests.test_report import R18, recorded_cfg, write_run


class Recorder(tracking.Tracker):
    active = True

    def __init__(self, every_n_steps: int = 1) -> None:
        self.every_n_steps = every_n_steps
        self.steps: list[tuple[str, int, dict]] = []
        self.epochs: list[tuple[str, dict]] = []
        self.closed: str | None = None

    def log_step(self, training, step, values):
        self.steps.append((training, step, dict(values)))

    def log_epoch(self, training, row):
        self.epochs.append((training, dict(row)))

    def close(self, status):
        self.closed = status


# -- the training loop's step and epoch metrics ----------------------------------------------
N_IMAGES, BATCH, LR = 170, 4, 1e-2  # 43 steps per epoch, the last of 2 images


def _fit_recorded(tmp_path: Path, monkeypatch, every_n_steps: int) -> tuple[Recorder, list, list]:
    """Two cosine epochs under a recording tracker; (tracker, per-step (loss, ce, batch size)
    as the loss function saw them, the history)."""
    rec = Recorder(every_n_steps)
    monkeypatch.setattr(tracking, "_current", rec)
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (N_IMAGES, 3, 8, 8), generator=g, dtype=torch.uint8)
    data = ImageData(imgs, torch.arange(N_IMAGES) % 3, ["a", "b", "c"])
    seen: list[tuple[float, float, int]] = []

    def loss_fn(model, x, y, epoch):
        loss, logits, terms = ce_loss(model, x, y, epoch)
        seen.append((float(loss.detach()), float(terms["ce"].detach()), y.numel()))
        return loss * 2, logits, terms  # loss and the ce term differ

    model = tiny_classifier()
    result = fit(
        model,
        model.parameters(),
        Batches(data, BATCH, 8, train=True, seed=3),
        Batches(data, 64, 8),
        epochs=2,
        lr=LR,
        grad_clip=1.0,
        loss_fn=loss_fn,
        state_path=tmp_path / "state.pt",
        fingerprint="fp",
        desc="distill",
        lr_schedule="cosine",
    )
    return rec, seen, result.history


def test_step_metrics_are_the_means_since_the_last_logged_step(tmp_path, monkeypatch):
    rec, seen, _ = _fit_recorded(tmp_path, monkeypatch, every_n_steps=1)
    per_epoch = math.ceil(N_IMAGES / BATCH)
    total = 2 * per_epoch
    # logged at the loop's synchronisation points: every LOG_EVERY steps and an epoch's last
    syncs = [s for s in range(1, per_epoch + 1) if s % LOG_EVERY == 0 or s == per_epoch]
    expected_steps = [e * per_epoch + s for e in range(2) for s in syncs]
    assert [s for _, s, _ in rec.steps] == expected_steps
    last = 0
    for training, step, values in rec.steps:
        assert training == "distill"
        epoch_start = (step - 1) // per_epoch * per_epoch
        window = seen[max(last, epoch_start) : step]  # the steps since the last logged one
        images = sum(b for _, _, b in window)
        assert values["ce"] == pytest.approx(sum(c * b for _, c, b in window) / images)
        assert values["loss"] == pytest.approx(2 * values["ce"])
        cosine = 0.5 * (1 + math.cos(math.pi * (step - 1) / total))
        assert values["lr"] == pytest.approx(LR * cosine)
        assert values["images_per_s"] > 0
        last = step


def test_step_metrics_at_most_every_n_steps_and_epoch_rows_as_history(tmp_path, monkeypatch):
    rec, seen, history = _fit_recorded(tmp_path, monkeypatch, every_n_steps=30)
    per_epoch = math.ceil(N_IMAGES / BATCH)
    # 30 steps after the epoch's start: the sync point at 40; the 3 left are in the epoch row
    assert [s for _, s, _ in rec.steps] == [40, per_epoch + 40]
    first = seen[:40]
    assert rec.steps[0][2]["ce"] == pytest.approx(sum(c for _, c, _ in first) / 40)
    assert [row for _, row in rec.epochs] == history
    assert [row["epoch"] for _, row in rec.epochs] == [1, 2]


def test_outside_a_session_nothing_is_tracked(tmp_path, compose_cfg):
    assert not tracking.current().active
    run_dir = tmp_path / "run"
    with tracking.session(compose_cfg(), run_dir, command="run") as tracker:
        assert not tracker.active and tracking.current() is tracker
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("error", "status"),
    [(None, "FINISHED"), (M2MError("bad"), "FAILED"), (Interrupted("stop"), "KILLED")],
)
def test_a_session_closes_its_run_as_finished_failed_or_killed(
    tmp_path, compose_cfg, monkeypatch, error, status
):
    rec = Recorder()
    monkeypatch.setattr(tracking, "_open", lambda *a: [rec])
    raises = pytest.raises(type(error)) if error else contextlib.nullcontext()
    with raises, tracking.session(compose_cfg("logger=csv"), tmp_path, command="run") as t:
        assert tracking.current() is t and t.active
        if error:
            raise error
    assert rec.closed == status and not tracking.current().active


def test_every_backend_gets_a_training_under_one_name_mlflow_accepts():
    rec = Recorder()
    tracking.Trackers([rec], 1).log_epoch("slice layer2+layer3", {"epoch": 1})
    assert rec.epochs == [("slice layer2_layer3", {"epoch": 1})]


def test_csv_files_widen_when_a_row_brings_a_new_column(tmp_path):
    t = tracking.CSVTracker(tmp_path)
    t.log_epoch("distill", {"epoch": 1, "train_loss": 0.5})
    t.log_epoch("distill", {"epoch": 2, "train_loss": 0.25, "lr": 1e-3})
    t.log_epoch("distill", {"epoch": 3, "train_loss": 0.125, "lr": 5e-4})
    with open(tmp_path / "distill" / "epochs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"epoch": "1", "train_loss": "0.5", "lr": ""},
        {"epoch": "2", "train_loss": "0.25", "lr": "0.001"},
        {"epoch": "3", "train_loss": "0.125", "lr": "0.0005"},
    ]


def test_flatten_gives_dotted_keys_and_json_for_lists_and_null():
    flat = tracking.flatten({"prune": {"ratio": 0.4, "keep_cfg": None}, "kd": {"terms": [1, 2]}})
    assert flat == {"prune.ratio": 0.4, "prune.keep_cfg": "null", "kd.terms": "[1, 2]"}


# -- configuration: fingerprints, reports, missing packages ---------------------------------
# every_n_steps: at most TINY's 5 steps an epoch, so each epoch's end logs one step row
ALL = ["logger=[csv,tensorboard,mlflow]", "logger.every_n_steps=4"]


def test_logger_settings_change_no_fingerprint(tmp_path, compose_cfg):
    from m2mdc import stages  # noqa: F401  (registers the stages)
    from m2mdc.stage import STAGES, Context

    plain = Context(compose_cfg("compare=[teacher_same_epochs,torch_pruning]"), tmp_path)
    tracked = Context(
        compose_cfg(
            "compare=[teacher_same_epochs,torch_pruning]",
            *ALL,
            "logger.mlflow.tracking_uri=file:///elsewhere",
            "logger.mlflow.experiment=x",
        ),
        tmp_path,
    )
    assert tracked.cfg.logger.tensorboard.enabled and not plain.cfg.logger.csv.enabled
    for name in STAGES:
        assert tracked.fingerprint(name) == plain.fingerprint(name), name


def test_runs_that_differ_in_logger_only_form_one_report_group(tmp_path):
    from m2mdc.report import aggregate, find_runs

    on = {"csv": {"enabled": True}, "mlflow": {"enabled": True, "tracking_uri": "x"}}
    off = {"csv": {"enabled": False}, "mlflow": {"enabled": False, "tracking_uri": None}}
    for seed, logger in ((42, on), (99, off)):
        write_run(
            tmp_path, f"s{seed}", seed=seed, rows=R18, recorded=recorded_cfg(seed, logger=logger)
        )
    groups = aggregate(find_runs([tmp_path]))
    assert [g["seeds"] for g in groups] == [[42, 99]]


@pytest.mark.parametrize(("backend", "module"), sorted(tracking.OPTIONAL.items()))
def test_a_missing_optional_package_is_one_line_naming_the_extra(
    tmp_path, capsys, monkeypatch, compose_cfg, backend, module
):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    run_dir = tmp_path / "run"
    assert cli.main(["run", f"logger=[csv,{backend}]", f"hydra.run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"m2mdc: error: logger={backend} needs")
    assert f"pip install 'm2mdc[{backend}]'" in err
    assert not run_dir.exists()
    # the pipeline's own pre-flight (callers that do not go through the CLI) says the same
    with pytest.raises(M2MError, match=rf"pip install 'm2mdc\[{backend}\]'"):
        pipeline.run_command("run", compose_cfg(f"logger={backend}"), run_dir)
    assert not run_dir.exists()


def test_an_mlflow_uri_mlflow_cannot_use_is_one_line_naming_the_setting():
    with pytest.raises(M2MError, match=r"^logger\.mlflow\.tracking_uri=foo://x: .*unsupported URI"):
        tracking.MLflowTracker("foo://x", "e", "r", {})


def test_an_unknown_backend_in_a_list_names_the_choices(tmp_path, capsys):
    assert cli.main(["run", "logger=[csv,wandb]", f"hydra.run.dir={tmp_path / 'r'}"]) == 2
    assert capsys.readouterr().err == (
        "m2mdc: error: logger=wandb is not a valid choice; choose one of: "
        "csv, mlflow, none, tensorboard\n"
    )


# -- end to end -------------------------------------------------------------------------------
def _ok(proc):
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    """The quickstart shrunk, with all three backends; step metrics at every sync point."""
    cwd = tmp_path_factory.mktemp("tracked")
    run_dir = cwd / "run"
    _ok(run_cli("run", *TINY, "profile.batch_sizes=[1]", *ALL, f"hydra.run.dir={run_dir}", cwd=cwd))
    return run_dir


def _metrics(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "metrics.json").read_text())


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


TRAININGS = ("teacher", "distill")


@pytest.mark.slow
def test_csv_files_hold_the_runs_metrics(tracked_run):
    root = tracked_run / "tracking" / "csv" / "version_0"
    summary = json.loads((tracked_run / "summary.json").read_text())
    for stage in TRAININGS:
        history = _metrics(tracked_run, stage)["epochs"]
        rows = _csv(root / stage / "epochs.csv")
        assert [int(r["epoch"]) for r in rows] == [h["epoch"] for h in history]
        for row, h in zip(rows, history, strict=True):
            assert float(row["train_loss"]) == h["train_loss"]
            assert float(row["test_top1"]) == h["test_top1"]
        # an epoch is shorter than LOG_EVERY steps: one step row per epoch, over all its steps
        steps = _csv(root / stage / "steps.csv")
        assert [float(r["loss"]) for r in steps] == pytest.approx(
            [h["train_loss"] for h in history], rel=1e-12
        )
        assert all(float(r["images_per_s"]) > 0 and float(r["lr"]) > 0 for r in steps)
    slicing = [p.name for p in root.iterdir() if p.name.startswith("slice ")]
    assert slicing and all((root / s / "epochs.csv").is_file() for s in slicing)
    by_model = {r["model"]: float(r["top1"]) for r in _csv(root / "summary.csv")}
    assert by_model == {r["model"]: r["top1"] for r in summary["rows"]}
    params = {r["key"]: r["value"] for r in _csv(root / "params.csv")}
    assert float(params["prune.ratio"]) == summary["config"]["prune"]["ratio"]
    stages = {r["stage"]: float(r["seconds"]) for r in _csv(root / "stages.csv")}
    done = {s: json.loads((tracked_run / s / "done.json").read_text()) for s in stages}
    assert set(stages) == {"teacher", "score", "prune", "distill", "slice", "profile"}
    assert all(stages[s] == pytest.approx(done[s]["seconds"], abs=1e-3) for s in stages)


@pytest.mark.slow
def test_tensorboard_events_hold_the_runs_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    (logdir,) = (tracked_run / "tracking" / "tensorboard").iterdir()
    ea = EventAccumulator(str(logdir))
    ea.Reload()
    for stage in TRAININGS:
        history = _metrics(tracked_run, stage)["epochs"]
        for key in ("train_loss", "test_top1"):
            events = ea.Scalars(f"{stage}/epoch/{key}")
            assert [e.step for e in events] == [h["epoch"] for h in history]
            assert [e.value for e in events] == pytest.approx([h[key] for h in history], 1e-6)
        assert len(ea.Scalars(f"{stage}/step/lr")) == len(history)
    summary = json.loads((tracked_run / "summary.json").read_text())
    for row in summary["rows"]:
        (event,) = ea.Scalars(f"summary/{row['model']}/top1")
        assert event.value == pytest.approx(row["top1"], rel=1e-6)
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["prune.ratio"].number_value == summary["config"]["prune"]["ratio"]
    assert hparams["model.name"].string_value == summary["model"]


@pytest.mark.slow
def test_mlflow_store_holds_the_runs_metrics(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((tracked_run / "tracking" / "mlruns").as_uri())
    summary = json.loads((tracked_run / "summary.json").read_text())
    exp = client.get_experiment_by_name(summary["experiment"])
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == tracked_run.name
    assert float(run.data.params["prune.ratio"]) == summary["config"]["prune"]["ratio"]
    assert run.data.tags["m2mdc.run_dir"] == str(tracked_run)
    for stage in TRAININGS:
        history = _metrics(tracked_run, stage)["epochs"]
        for key in ("train_loss", "test_top1"):
            got = client.get_metric_history(run.info.run_id, f"{stage}/epoch/{key}")
            assert [(m.step, m.value) for m in got] == [(h["epoch"], h[key]) for h in history]
    for row in summary["rows"]:
        assert run.data.metrics[f"summary/{row['model']}/top1"] == row["top1"]
    done = json.loads((tracked_run / "teacher" / "done.json").read_text())
    assert run.data.metrics["stage_seconds/teacher"] == pytest.approx(done["seconds"], abs=1e-3)


@pytest.mark.slow
def test_a_command_without_a_logger_writes_no_tracking_file(tracked_run):
    before = _files(tracked_run / "tracking")
    tiny = [*TINY, "profile.batch_sizes=[1]"]
    _ok(run_cli("run", *tiny, f"hydra.run.dir={tracked_run}", cwd=tracked_run.parent))
    assert _files(tracked_run / "tracking") == before
    assert [p.name for p in tracked_run.parent.iterdir() if p.name != "outputs"] == ["run"]


@pytest.mark.slow
def test_a_sweep_is_one_mlflow_experiment_with_a_run_per_job(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "sweep"
    shrunk = ["dataset.limit_train=64", "dataset.limit_test=32", "dataset.batch_size=32"]
    args = ["-m", "seed=1,2", "teacher.epochs=1", *shrunk, "logger=[csv,mlflow]"]
    _ok(run_cli("finetune-teacher", *args, f"hydra.sweep.dir={sweep}", cwd=tmp_path))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((sweep / "tracking" / "mlruns").as_uri())
    names = [e.name for e in client.search_experiments() if e.name != "Default"]
    assert names == [str(sweep)]
    exp = client.get_experiment_by_name(str(sweep))
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["0", "1"]
    for job, seed in (("0", 1), ("1", 2)):
        run = runs[job]
        assert run.data.params["seed"] == str(seed) and run.info.status == "FINISHED"
        assert run.data.tags["m2mdc.sweep_dir"] == str(sweep)
        history = _metrics(sweep / job, "teacher")["epochs"]
        got = client.get_metric_history(run.info.run_id, "teacher/epoch/train_loss")
        assert [m.value for m in got] == [h["train_loss"] for h in history]
        csv_rows = _csv(sweep / job / "tracking" / "csv" / "version_0" / "teacher" / "epochs.csv")
        assert [float(r["train_loss"]) for r in csv_rows] == [h["train_loss"] for h in history]
