"""m2mdc from Python: compose a configuration, run commands on a run directory, load models.

The functions here do what the command line does, with the same composition, the same
checks and the same one-line errors (:class:`~m2mdc.errors.M2MError`, whose message is what
``m2mdc`` prints after ``m2mdc: error:``), the same run-directory lock and the same records
(``.hydra/``, ``manifest.json``, ``summary.json``, each stage's ``done.json``). A run directory
written here and one written by ``m2mdc`` with the same settings are interchangeable::

    from m2mdc import api

    result = api.run(["model=resnet18", "prune.ratio=0.4"], run_dir="outputs/r18")
    for row in result.rows:
        print(row["model"], row["top1"], row["macs"])
    api.stage("profile", ["model=resnet18", "prune.ratio=0.4"], run_dir="outputs/r18")
    student = api.load_model("outputs/r18/slice/model.pt")

Differences from the command line, all about Hydra's own settings: the run directory is an
argument (``run_dir``), not ``hydra.run.dir``; ``hydra.*`` overrides and sweeps (``seed=1,2``)
are refused (call :func:`run` once per job); and nothing is printed through Hydra's console
log handler: during a command the ``m2mdc`` logger is at INFO and also writes the run
directory's ``m2mdc.log`` (as on the command line), then it is put back as it was. The working
directory is never changed, and no Hydra state is left behind, so calls can follow each other
in one process (or run inside another Hydra app).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

import m2mdc.stages  # noqa: F401  (registers the stages)
from m2mdc.artifacts import load_checkpoint, read_json
from m2mdc.composition import (
    check_writable,
    compose_job,
    config_tree,
    is_hydra_setting,
    parse_overrides,
    unknown_command,
)
from m2mdc.errors import M2MError
from m2mdc.pipeline import PIPELINE, run_command
from m2mdc.stage import STAGES
from m2mdc.ui import log

__all__ = ["RunResult", "commands", "compose", "load_model", "run", "stage"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class RunResult:
    """What a command left in its run directory.

    Attributes:
        run_dir: the run directory (absolute).
        command: the command that ran (``run``, ``score``, ...).
        metrics: ``run``: the summary (``summary.json``); a stage command: the metrics of its
            last stage (``<stage>/metrics.json``).
        rows: the summary rows (teacher, students, comparisons: model, top1, params, MACs,
            latency, reductions), or none while the run has no teacher.
    """

    run_dir: Path
    command: str
    metrics: dict[str, Any] = field(repr=False)
    rows: list[dict[str, Any]]


def commands() -> tuple[str, ...]:
    """The commands :func:`run` takes: ``run`` (every stage in order) and the command of each
    registered stage, in pipeline order (``finetune-teacher``, ``score``, ..., ``export``)."""
    order = sorted(STAGES, key=lambda n: PIPELINE.index(n) if n in PIPELINE else len(PIPELINE))
    return ("run", *dict.fromkeys(STAGES[n].command for n in order))


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The configuration ``m2mdc <command> OVERRIDES`` would run with, validated as the command
    line validates it (schema ranges and choices, model parts, writable ``cache_dir``, image
    trees). Its schema is :class:`m2mdc.config.Config`.

    Raises:
        M2MError: a bad override, with the line the command line prints, e.g.
            ``prune.ratio=1.0 is out of range; allowed: >= 0 and < 1``.
    """
    parsed = parse_overrides(list(overrides))
    for o in parsed:
        if is_hydra_setting(o):
            raise M2MError(
                f"{o.input_line}: Hydra's own settings do not apply to the Python API; pass the "
                "run directory as run_dir="
            )
        if o.is_sweep_override():
            raise M2MError(
                f"{o.input_line} is a sweep; the Python API composes one job: call it once per "
                "value (or use `m2mdc <command> -m` for a sweep)"
            )
    from hydra import compose as hydra_compose

    with config_tree():
        return compose_job(list(overrides), hydra_compose("config"))


def run(overrides: Sequence[str], run_dir: PathLike, command: str = "run") -> RunResult:
    """``m2mdc COMMAND OVERRIDES hydra.run.dir=RUN_DIR``: compose and validate, refuse what
    the pre-flight refuses before anything is written, then run the command's stages under
    the run directory's lock (finished stages of the same configuration are skipped).

    Args:
        overrides: ``key=value`` settings, as on the command line.
        run_dir: the run directory (created when missing).
        command: one of :func:`commands`.

    Raises:
        M2MError: bad input, a stage run before its prerequisites, outputs of another
            configuration in ``run_dir``, or ``run_dir`` in use by another command. A refused
            command leaves ``run_dir`` as it was (and does not create it).
    """
    if command not in commands():
        raise unknown_command(command, commands())
    task = [*overrides, f"command={command}"]  # as the CLI records it
    cfg = compose(task)
    path = Path(os.path.abspath(Path(run_dir).expanduser()))
    check_writable("run_dir", str(path))
    with _removed_if_refused(path), _run_log(path):
        metrics = run_command(command, cfg, path, task)
    summary = path / "summary.json"
    rows = read_json(summary)["rows"] if summary.is_file() else []
    return RunResult(run_dir=path, command=command, metrics=metrics, rows=rows)


def stage(name: str, overrides: Sequence[str], run_dir: PathLike) -> RunResult:
    """Run one stage command (``finetune-teacher``, ``score``, ``prune``, ``distill``,
    ``slice``, ``compare``, ``profile``, ``export``: :func:`commands` but ``run``) on
    ``run_dir``; the stages it needs must have run there with the same settings."""
    names = commands()[1:]
    if name not in names:
        raise unknown_command(name, names)
    return run(overrides, run_dir, command=name)


def load_model(path: PathLike) -> nn.Module:
    """The model of an m2mdc checkpoint (``<run>/<stage>/model.pt`` of any stage, or that stage
    directory), rebuilt from its recorded architecture, weights loaded with
    ``torch.load(weights_only=True)`` after checking the run's manifest; on CPU, in eval mode.

    Raises:
        M2MError: a missing, corrupt, changed or non-m2mdc file.
    """
    p = Path(path).expanduser()
    model, _ = load_checkpoint(p / "model.pt" if p.is_dir() else p)
    return model


@contextmanager
def _run_log(run_dir: Path) -> Iterator[None]:
    """The command line's log file for the length of a command: Hydra's ``job_logging`` file
    handler (``<run_dir>/<job name>.log``, its format, opened at the first line) on the
    ``m2mdc`` logger at the configured level; the logger is put back as it was."""
    from hydra import compose as hydra_compose

    with config_tree():
        hydra_cfg = hydra_compose("config", return_hydra_config=True).hydra
    logging_cfg = hydra_cfg.job_logging
    spec = logging_cfg.handlers.file
    handler = logging.FileHandler(
        run_dir / f"{hydra_cfg.job.name}.log", delay=bool(spec.get("delay", False))
    )
    handler.setFormatter(logging.Formatter(logging_cfg.formatters[spec.formatter].format))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging_cfg.root.level)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(level)


@contextmanager
def _removed_if_refused(run_dir: Path) -> Iterator[None]:
    """Directories created for a command that then fails are removed while still empty."""
    missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for p in missing:  # deepest first; stops at the first that holds something
            try:
                p.rmdir()
            except OSError:
                break
        raise
