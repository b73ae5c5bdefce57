"""Experiment tracking: a command's trainings, stage timings and summary, mirrored to CSV
files, TensorBoard and/or MLflow (the ``logger`` config section, chosen with ``logger=``;
``none``, the default, logs nothing and writes nothing). The JSON files of the run directory
stay the record; a tracker is a view of them for the tools researchers already use.

The pipeline opens one :func:`session` per command (one tracked run: a CSV/TensorBoard
``version_<n>`` directory, an MLflow run); while it is open, :func:`current` gives the
trainings (:mod:`m2mdc.train.loop`) and the pipeline its :class:`Tracker`, which outside a
session logs nothing. What is logged:

- ``<training>/step/<name>``: every ``logger.every_n_steps`` training steps (at least; read at
  the loop's own synchronisation points) the mean loss and loss terms of those steps, the
  learning rate of the last one and the images per second (x: the training's step);
- ``<training>/epoch/<name>``: every epoch's history row (x: the epoch);
- ``stage_seconds/<stage>``: the wall time of every stage the command ran;
- ``summary/<model>/<column>``: the summary rows, with the config of record, flattened
  (``prune.ratio``), as hyperparameters.

``<training>`` is the training's name (``teacher``, ``distill``, ``slice layer3``, ...).
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from m2mdc.config import LOGGERS
from m2mdc.errors import Interrupted, M2MError

# the optional backends: the module each needs, installed by the pip extra of its own name
OPTIONAL = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow"}

Scalar = str | int | float | bool


def backends(logger: Any) -> list[str]:
    """The backends a ``logger`` config section turns on, in :data:`LOGGERS` order."""
    return [name for name in LOGGERS if logger[name].enabled]


def _import(backend: str) -> Any:
    """The module an optional backend needs; a missing one is a one-line M2MError."""
    try:
        return importlib.import_module(OPTIONAL[backend])
    except ImportError as exc:
        raise M2MError(
            f"logger={backend} needs the {backend} package, which cannot be imported ({exc}); "
            f"install it with: pip install 'm2mdc[{backend}]', or choose another logger "
            f"({', '.join(('none', *LOGGERS))})"
        ) from None


def require(logger: Any) -> None:
    """Pre-flight: import what the chosen backends need (M2MError naming the pip extra)."""
    for name in backends(logger):
        if name in OPTIONAL:
            _import(name)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Nested settings as ``section.key`` -> value; lists and null as JSON text."""
    flat: dict[str, Scalar] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, str | int | float | bool):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a row (bools, text and null left out)."""
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def summary_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``summary/<model>/<column>`` -> value of every numeric column of the summary rows."""
    return {f"summary/{row['model']}/{k}": v for row in rows for k, v in numbers(row).items()}


class Tracker:
    """Where a command's metrics go. This base logs nothing (``logger=none``); a backend
    overrides what it records."""

    active = False
    every_n_steps = 0

    def log_step(self, training: str, step: int, values: Mapping[str, float]) -> None:
        """Step metrics of a training (``step`` counts its optimizer steps from 1)."""

    def log_epoch(self, training: str, row: Mapping[str, Any]) -> None:
        """An epoch's history row (its ``epoch`` is the x value)."""

    def log_stage(self, stage: str, seconds: float, how: str) -> None:
        """A stage's wall time; ``how``: ``ran`` or ``cached``."""

    def log_summary(self, rows: Sequence[Mapping[str, Any]], params: Mapping[str, Scalar]) -> None:
        """The summary rows and the flattened config of record."""

    def close(self, status: str) -> None:
        """End the run: ``FINISHED``, ``FAILED`` or ``KILLED``."""


class Trackers(Tracker):
    """Several backends at once (``logger=[csv,tensorboard]``): each call goes to each."""

    active = True

    def __init__(self, trackers: Sequence[Tracker], every_n_steps: int) -> None:
        self.trackers = list(trackers)
        self.every_n_steps = every_n_steps

    def log_step(self, training: str, step: int, values: Mapping[str, float]) -> None:
        for t in self.trackers:
            t.log_step(series_name(training), step, values)

    def log_epoch(self, training: str, row: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_epoch(series_name(training), row)

    def log_stage(self, stage: str, seconds: float, how: str) -> None:
        for t in self.trackers:
            t.log_stage(stage, seconds, how)

    def log_summary(self, rows: Sequence[Mapping[str, Any]], params: Mapping[str, Scalar]) -> None:
        for t in self.trackers:
            t.log_summary(rows, params)

    def close(self, status: str) -> None:
        for t in self.trackers:
            t.close(status)


class _ScalarTracker(Tracker):
    """A backend of named scalar series (TensorBoard, MLflow): :meth:`scalars` is its one
    writer; the tags are the ones the module docstring lists."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_step(self, training: str, step: int, values: Mapping[str, float]) -> None:
        self.scalars({f"{training}/step/{k}": v for k, v in values.items()}, step)

    def log_epoch(self, training: str, row: Mapping[str, Any]) -> None:
        values = numbers({k: v for k, v in row.items() if k != "epoch"})
        self.scalars({f"{training}/epoch/{k}": v for k, v in values.items()}, int(row["epoch"]))

    def log_stage(self, stage: str, seconds: float, how: str) -> None:
        self.scalars({f"stage_seconds/{stage}": seconds}, 0)


class CSVTracker(Tracker):
    """CSV files in ``root``: ``<training>/steps.csv`` and ``<training>/epochs.csv``,
    ``stages.csv``, ``summary.csv`` and ``params.csv`` (key, value). A file gains a column when
    a row brings a new key (it is then rewritten with the wider header)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tables: dict[Path, tuple[list[str], list[Mapping[str, Any]]]] = {}
        root.mkdir(parents=True, exist_ok=True)

    def append(self, rel: str, *rows: Mapping[str, Any]) -> None:
        path = self.root / rel
        header, kept = self.tables.setdefault(path, ([], []))
        kept += rows
        new = [k for row in rows for k in row if k not in header]
        header.extend(dict.fromkeys(new))
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w" if new else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            if new:
                writer.writeheader()
            writer.writerows(kept if new else rows)

    def log_step(self, training: str, step: int, values: Mapping[str, float]) -> None:
        self.append(f"{training}/steps.csv", {"step": step, **values})

    def log_epoch(self, training: str, row: Mapping[str, Any]) -> None:
        self.append(f"{training}/epochs.csv", row)

    def log_stage(self, stage: str, seconds: float, how: str) -> None:
        self.append("stages.csv", {"stage": stage, "seconds": seconds, "how": how})

    def log_summary(self, rows: Sequence[Mapping[str, Any]], params: Mapping[str, Scalar]) -> None:
        self.append("summary.csv", *rows)
        self.append("params.csv", *({"key": k, "value": v} for k, v in params.items()))


class TensorBoardTracker(_ScalarTracker):
    """Event files in ``logdir`` (``torch.utils.tensorboard.SummaryWriter``); the summary and
    the config of record also go to the HParams dashboard (one session per run)."""

    def __init__(self, logdir: Path) -> None:
        self.writer = _import("tensorboard").SummaryWriter(log_dir=str(logdir))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_summary(self, rows: Sequence[Mapping[str, Any]], params: Mapping[str, Scalar]) -> None:
        from torch.utils.tensorboard.summary import hparams

        metrics = summary_metrics(rows)
        # what SummaryWriter.add_hparams writes, but into this run's directory, not a new one
        for proto in hparams(dict(params), metrics):
            self.writer.file_writer.add_summary(proto)
        self.scalars(metrics, 0)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MLflowTracker(_ScalarTracker):
    """A run in experiment ``experiment`` of the tracking server or store ``uri``; the
    config of record becomes the run's params, the summary its ``summary/...`` metrics."""

    def __init__(self, uri: str, experiment: str, name: str, tags: Mapping[str, str]) -> None:
        _import("mlflow")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        if uri.startswith("file:"):  # local stores need MLflow >= 3.7's explicit opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = MlflowClient(tracking_uri=uri)
            exp_id = self._experiment(experiment)
            self.run_id = self.client.create_run(exp_id, run_name=name, tags=dict(tags)).info.run_id
        except MlflowException as exc:
            raise M2MError(f"logger.mlflow.tracking_uri={uri}: {exc.message}") from None

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except MlflowException:  # another job of the sweep created it meanwhile
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_metric_key(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_summary(self, rows: Sequence[Mapping[str, Any]], params: Mapping[str, Scalar]) -> None:
        from mlflow.entities import Param
        from mlflow.utils import validation

        limit = int(getattr(validation, "MAX_PARAM_VAL_LENGTH", 500))
        ps = [Param(_metric_key(k), str(v)[:limit]) for k, v in params.items()]
        for i in range(0, len(ps), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=ps[i : i + 100])
        self.scalars(summary_metrics(rows), 0)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def series_name(training: str) -> str:
    """A training's name as every backend shows it: one level of a tag, one path component
    and an MLflow key (``slice layer2+layer3`` -> ``slice layer2_layer3``)."""
    return re.sub(r"[^\w\-. ]", "_", training)


def _metric_key(name: str) -> str:
    """``name`` in the characters MLflow accepts in a key."""
    return re.sub(r"[^\w\-. /]", "_", name)


def _new_version(parent: Path) -> Path:
    """``parent/version_<n>``: one past the highest there (0 for the first)."""
    taken = [int(m.group(1)) for p in parent.glob("version_*") if (m := _VERSION.match(p.name))]
    return parent / f"version_{max(taken, default=-1) + 1}"


_VERSION = re.compile(r"version_(\d+)$")
_NONE = Tracker()
_current: Tracker = _NONE


def current() -> Tracker:
    """The open session's tracker; outside a session, one that logs nothing."""
    return _current


def _open(
    cfg: Any, run_dir: Path, sweep_dir: Path | None, tags: Mapping[str, str]
) -> list[Tracker]:
    """One tracker per chosen backend (the ones that can refuse first: nothing half-open)."""
    logger, root = cfg.logger, run_dir / "tracking"
    opened: list[Tracker] = []
    try:
        for name in reversed(backends(logger)):
            if name == "mlflow":
                store = (sweep_dir or run_dir) / "tracking" / "mlruns"
                uri = logger.mlflow.tracking_uri or store.resolve().as_uri()
                sweep = str(sweep_dir) if sweep_dir is not None else None
                experiment = logger.mlflow.experiment or sweep or str(cfg.experiment_name)
                opened.append(MLflowTracker(uri, experiment, run_dir.name, tags))
            elif name == "tensorboard":
                opened.append(TensorBoardTracker(_new_version(root / "tensorboard")))
            else:
                opened.append(CSVTracker(_new_version(root / "csv")))
    except BaseException:
        for t in opened:
            t.close("FAILED")
        raise
    return opened[::-1]


@contextmanager
def session(
    cfg: Any,
    run_dir: Path,
    *,
    command: str,
    sweep_dir: Path | None = None,
    overrides: Sequence[str] = (),
) -> Iterator[Tracker]:
    """Track one command on ``run_dir`` with the backends ``cfg.logger`` chooses (a job of a
    sweep: ``sweep_dir`` groups it with the other jobs). :func:`current` gives the tracker
    until the command ends; its run is then closed as finished, failed or killed."""
    global _current
    tags = {
        "m2mdc.command": command,
        "m2mdc.run_dir": str(run_dir),
        "m2mdc.overrides": " ".join(overrides),
        **({"m2mdc.sweep_dir": str(sweep_dir)} if sweep_dir is not None else {}),
    }
    opened = _open(cfg, run_dir, sweep_dir, tags)
    if not opened:
        yield _NONE
        return
    tracker = Trackers(opened, int(cfg.logger.every_n_steps))
    _current, status = tracker, "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except (Interrupted, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        _current = _NONE
        tracker.close(status)
