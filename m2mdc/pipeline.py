"""Ordered stages over one run directory, and the Hydra entry point that dispatches commands.

Each stage reads its inputs from the run directory and writes its outputs to
``<run>/<stage>/``; ``<stage>/done.json`` is written last and records the stage's configuration
fingerprint. A stage whose outputs exist for the same configuration is skipped; outputs of a
different configuration are never overwritten silently (``force=true`` replaces them).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from m2mdc import __version__, cache, rundir, tracking, ui
from m2mdc.artifacts import atomic_write_json, read_json
from m2mdc.config import to_plain
from m2mdc.errors import M2MError, error_line
from m2mdc.manifest import record_stage
from m2mdc.rows import STUDENT_ROWS
from m2mdc.rundir import get_path, set_path
from m2mdc.stage import STAGES, Context, Stage
from m2mdc.structure import validate_all
from m2mdc.train import dist
from m2mdc.train.loop import seed_everything
from m2mdc.train.perf import available_cores, intra_op_threads
from m2mdc.ui import log


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            d = _first_difference(old.get(k), new.get(k), f"{prefix}{k}.")
            if d:
                return d
        return ""
    return "" if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def _check_inputs(ctx: Context, st: Stage, planned: Sequence[str] = ()) -> None:
    """Refuse a stage whose prerequisites are missing or were made by another configuration
    (prerequisites in ``planned`` run first in the same command and are not checked)."""
    for req in st.requires:
        if req in planned:
            continue
        if not (ctx.run_dir / req / "done.json").is_file():
            raise M2MError(
                f"{st.command} needs the outputs of `m2mdc {STAGES[req].command}` in "
                f"{ctx.run_dir}; run that first (same hydra.run.dir), or `m2mdc run`"
            )
        if not ctx.is_done(req):
            rec = read_json(ctx.run_dir / req / "done.json")
            diff = _first_difference(rec.get("config", {}), ctx.stage_config(req))
            raise M2MError(
                f"{req}/ in {ctx.run_dir} was produced by a different configuration "
                f"({diff or 'upstream changed'}); rerun `m2mdc {STAGES[req].command}` with this "
                "configuration or use the original settings"
            )


def _check_outputs(ctx: Context, name: str) -> str:
    """What to do with a stage's existing outputs: ``run``, ``skip`` or ``recompute``; refuse
    outputs of a different configuration (unless ``force=true``)."""
    done = ctx.run_dir / name / "done.json"
    if not done.is_file():
        return "run"
    if ctx.cfg.force:
        return "recompute"
    rec = read_json(done)
    if rec.get("fingerprint") == ctx.fingerprint(name):
        return "skip"
    if STAGES[name].derived:
        return "recompute"
    diff = _first_difference(rec.get("config", {}), ctx.stage_config(name))
    raise M2MError(
        f"{done.parent} holds outputs of a different configuration "
        f"({diff or 'upstream changed'}); use a new hydra.run.dir, or force=true to replace them"
    )


def preflight(ctx: Context, names: Sequence[str]) -> None:
    """Everything :func:`execute` would refuse, checked before any stage writes a byte."""
    for i, name in enumerate(names):
        _check_inputs(ctx, STAGES[name], planned=names[:i])
        _check_outputs(ctx, name)


def execute(ctx: Context, name: str) -> dict[str, Any]:
    """Run one stage (or skip it when its outputs exist for this configuration).

    Data-parallel (:mod:`m2mdc.train.dist`): rank 0 decides, reads and writes the run
    directory and the cache; a training stage (``Stage.trains``) runs on every rank, any other
    on rank 0 alone while the others wait; every rank leaves with the same metrics."""
    st = STAGES[name]
    _check_inputs(ctx, st)
    action = dist.broadcast_object(_check_outputs(ctx, name))
    if dist.is_main():
        metrics = _execute(ctx, st, action)
    else:
        if st.trains and action != "skip" and st.cacheable and ctx.cfg.use_cache:
            action = dist.broadcast_object(None)  # rank 0's: "skip" when the cache has it
        metrics = _run_stage(ctx, st) if st.trains and action != "skip" else {}
    return dist.broadcast_object(metrics)  # also: rank 0's outputs are on disk now


def _execute(ctx: Context, st: Stage, action: str) -> dict[str, Any]:
    """:func:`execute` on rank 0 (or in one process)."""
    name = st.name
    done = ctx.run_dir / name / "done.json"
    if action == "skip":
        log.info(
            f"[{name}] skipped: outputs in {done.parent} match this configuration "
            "(force=true reruns)"
        )
        return read_json(done.parent / "metrics.json")
    if action == "recompute":
        if not ctx.cfg.force:
            log.info(f"[{name}] outputs in {done.parent} are out of date; recomputing them")
        done.unlink()
    fp = ctx.fingerprint(name)
    t0 = time.perf_counter()
    cached_from = None
    if st.cacheable and ctx.cfg.use_cache:
        key = hashlib.sha256(f"{fp}:{__version__}".encode()).hexdigest()
        with cache.locked(ctx.cache_dir, name, key):  # racing jobs: one computes, others reuse
            hit = cache.fetch(ctx.cache_dir, name, key, ctx.stage_dir(name)) and not ctx.cfg.force
            if st.trains:  # the other ranks train with rank 0 unless it found the outputs
                dist.broadcast_object("skip" if hit else action)
            if hit:
                cached_from = str(cache.entry_dir(ctx.cache_dir, name, key))
                log.info(f"[{name}] reused from cache {cached_from}")
                metrics = read_json(ctx.run_dir / name / "metrics.json")
            else:
                metrics = _run_stage(ctx, st)
                cache.publish(ctx.cache_dir, name, key, ctx.run_dir / name)
    else:
        metrics = _run_stage(ctx, st)
    seconds = time.perf_counter() - t0
    tracking.current().log_stage(name, seconds, "cached" if cached_from else "ran")
    atomic_write_json(
        done,
        {
            "fingerprint": fp,
            "stage": name,
            "config": ctx.stage_config(name),
            # every setting of the command that ran the stage: the config of record reads the
            # stage's keys from here (recorded_config)
            "run_config": run_config(ctx.cfg),
            "seconds": round(seconds, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "m2mdc_version": __version__,
            "torch_version": torch.__version__,
            "cached_from": cached_from,
        },
    )
    record_stage(ctx.run_dir, name, ctx.cfg)
    log.info(f"[{name}] done in {seconds:.1f}s")
    return metrics


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed configuration as plain data, without Hydra's own node."""
    plain = to_plain(cfg)
    plain.pop("hydra", None)
    return plain


def recorded_config(ctx: Context) -> dict[str, Any]:
    """The config of record of a run directory: for every finished stage, the settings of its
    fingerprint (``Stage.keys``) as the command that ran it had them; every other setting as
    the current command has it (they do not change results)."""
    record = run_config(ctx.cfg)
    for name in STAGES:
        done = ctx.run_dir / name / "done.json"
        if not done.is_file():
            continue
        ran_with = read_json(done).get("run_config")
        if ran_with is None:  # written before run_config was recorded: its own keys only
            ran_with = {}
            for key, value in read_json(done).get("config", {}).items():
                set_path(ran_with, key, value)
        for key in STAGES[name].keys:
            value = get_path(ran_with, key, _MISSING)
            if value is not _MISSING:
                set_path(record, key, value)
    return record


_MISSING = object()


def _run_stage(ctx: Context, st: Stage) -> dict[str, Any]:
    log.info(f"[{st.name}] running")
    seed_everything(int(ctx.cfg.seed))
    if st.trains:
        return st.run(ctx)
    with dist.solo():  # data-parallel: rank 0 alone (the others wait in execute)
        return st.run(ctx)


PIPELINE = (
    "teacher",
    "score",
    "prune",
    "distill",
    "slice",
    "teacher_same_epochs",
    "peer_torch_pruning",
    "peer_torch_pruning_latency",
    "profile",
    "quantize",
)


def plan(command: str, cfg: DictConfig) -> list[str]:
    """The stages a command runs, in order (`compare`: every comparison the config enables)."""
    from m2mdc import stages  # noqa: F401  (registers the stages)

    if command == "run":
        return [n for n in PIPELINE if n in STAGES and STAGES[n].is_enabled(cfg)]
    names = [s.name for s in STAGES.values() if s.command == command]
    enabled = [n for n in names if STAGES[n].is_enabled(cfg)]
    if not enabled:
        raise M2MError(
            f"{command}: nothing to run; enable it with "
            + " or ".join(f"compare={n}" for n in names)
        )
    return enabled


def run_command(
    command: str,
    cfg: DictConfig,
    run_dir: Path,
    overrides: Sequence[str] = (),
    concurrent_jobs: int | None = None,
    *,
    sweep_dir: Path | None = None,
) -> dict[str, Any]:
    """Run a CLI command on a run directory, holding its lock; returns the last stage's
    metrics, or the summary for ``run``.

    ``concurrent_jobs``: the jobs running at once on this machine (the CLI passes its
    launcher's), which ``perf.threads``' default divides the cores among; None (a caller in
    Python) leaves torch's thread count as the caller set it unless ``perf.threads`` is set.

    Nothing is written before every stage of the command has been checked (prerequisites,
    outputs of another configuration). On success the summary (when the run has a teacher)
    and ``.hydra/`` are brought up to date. The command is one tracked run of the ``logger``
    backends (:mod:`m2mdc.tracking`); a job of a sweep is grouped by its ``sweep_dir``.
    """
    from m2mdc.stages.summary import write_summary

    names = plan(command, cfg)
    ui.configure(progress_every_s=float(cfg.ui.progress_every_s))
    tracking.require(cfg.logger)
    main = dist.is_main()
    with rundir.locked(run_dir) if main else contextlib.nullcontext(), _quiet(not main):
        ctx = Context(cfg, run_dir)
        preflight(ctx, names)
        # after the checks: a refused command writes nothing, not even this log line
        if concurrent_jobs is not None or cfg.perf.threads is not None or dist.active():
            apply_threads(cfg, (concurrent_jobs or 1) * dist.local_world_size())
        with (
            tracking.session(
                cfg, run_dir, command=command, sweep_dir=sweep_dir, overrides=overrides
            )
            if main
            else contextlib.nullcontext(tracking.current())
        ) as tracker:
            metrics: dict[str, Any] = {}
            for name in names:
                metrics = execute(ctx, name)
            if main and (run_dir / "teacher" / "done.json").is_file():
                record = recorded_config(ctx)
                summary = write_summary(ctx, record)
                record_stage(run_dir, "summary", cfg)
                tracker.log_summary(summary["rows"], tracking.flatten(record))
                if command == "run":
                    metrics = summary
        if main:
            rundir.write_record(run_dir, recorded_config(ctx), overrides)
    return dist.broadcast_object(metrics)


@contextlib.contextmanager
def _quiet(on: bool) -> Iterator[None]:
    """Data-parallel ranks other than 0: warnings and errors only, on the console only (rank
    0 logs the run, into the run directory's log file)."""
    if not on:
        yield
        return
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    level = log.level
    for h in files:
        root.removeHandler(h)
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
        for h in files:
            root.addHandler(h)


def objective(result: dict[str, Any], sweeper: Any) -> Any:
    """What a sweeper optimises: the final student's top1 (the last student row of the
    summary, or the stage's own top1), and for a two-objective sweeper [top1, MACs]."""
    rows = [r for r in result.get("rows", []) if r.get("model") in STUDENT_ROWS]
    final = rows[-1] if rows else result
    top1 = final.get("top1")
    directions = sweeper.get("direction") if sweeper else None
    if isinstance(directions, list | ListConfig) and len(directions) == 2:
        return [top1, final.get("macs")]
    return top1


# -- Hydra entry --------------------------------------------------------------------------
def _task(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep_dir = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        validate_all(cfg)
        dist.init()  # a data-parallel job (torchrun, or SLURM tasks through submitit)
        overrides = list(hydra_cfg.overrides.task)
        jobs = _concurrent_jobs(hydra_cfg)
        result = run_command(cfg.command, cfg, run_dir, overrides, jobs, sweep_dir=sweep_dir)
    except M2MError as exc:
        print(error_line(exc), file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    return objective(result, hydra_cfg.sweeper)


def _concurrent_jobs(hydra_cfg: Any) -> int:
    """How many jobs a local launcher runs at once (joblib's ``n_jobs``; -1: one per core)."""
    from hydra.types import RunMode

    n_jobs = OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=None)
    if n_jobs is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return 1
    return available_cores() if int(n_jobs) < 0 else int(n_jobs)


def apply_threads(cfg: DictConfig, jobs: int = 1) -> None:
    """``perf.threads`` for this job: set explicitly, or the cores divided among the ``jobs``
    that run at once on this machine; with ``perf.threads`` unset, an ``OMP_NUM_THREADS``
    the user exported is left in force (torch read it at start-up)."""
    if cfg.perf.threads is not None:
        threads, how = int(cfg.perf.threads), "perf.threads"
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        threads, how = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        threads = intra_op_threads(None, jobs)
        how = f"{available_cores()} cores / {jobs}"
    torch.set_num_threads(threads)
    log.info(f"torch threads: {threads} ({how})")


def hydra_main(command: str, args: Sequence[str]) -> int:
    """Run ``command`` through Hydra with ``args`` (overrides and Hydra flags) as its argv."""
    import hydra

    from m2mdc.config import register_configs
    from m2mdc.hydra_args import conf_dir, split_overrides

    register_configs()
    main = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_task)
    argv = sys.argv
    overrides, flags = split_overrides(args)
    # overrides before flags: `--cfg job` must stay followed by its value
    sys.argv = ["m2mdc", *overrides, f"command={command}", *flags]
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = argv
    return 0
