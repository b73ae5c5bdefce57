"""Ordered stages over one run directory, and the Hydra entry point that dispatches commands.

Each stage reads its inputs from the run directory and writes its outputs to
``<run>/<stage>/``; ``<stage>/done.json`` is written last and records the stage's configuration
fingerprint. A stage whose outputs exist for the same configuration is skipped; outputs of a
different configuration are never overwritten silently (``force=true`` replaces them).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from m2mdc import __version__, cache
from m2mdc.artifacts import atomic_write_json, load_checkpoint, read_json
from m2mdc.config import to_plain, validate
from m2mdc.data.datasets import ImageData, load_split, load_train_val, val_fraction
from m2mdc.data.loader import Batches
from m2mdc.errors import M2MError
from m2mdc.manifest import record_stage
from m2mdc.train.loop import resolve_device, seed_everything
from m2mdc.ui import log


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
        name: its directory under the run directory.
        command: the CLI command that runs it alone.
        requires: stages whose outputs it reads.
        keys: config sections that determine its outputs (besides its upstream stages').
        run: ``run(ctx) -> metrics``; writes ``<run>/<name>/`` itself.
        version: bumped when the stage's code changes what it produces.
        extra: more fingerprint input read from the run directory (e.g. which models exist).
        cacheable: outputs are shared across runs through the content-addressed cache.
        enabled: ``enabled(cfg)``: whether ``m2mdc run`` and the stage's command run it
            (optional stages, e.g. the ``compare=...`` baselines); None = always.
        derived: outputs are cheap measurements of what is in the run directory (profile):
            stale ones are recomputed instead of refused, e.g. when a new model appears.
    """

    name: str
    command: str
    requires: tuple[str, ...]
    keys: tuple[str, ...]
    run: Callable[[Context], dict[str, Any]]
    version: int = 1
    extra: Callable[[Context], Any] | None = None
    cacheable: bool = False
    enabled: Callable[[DictConfig], bool] | None = None
    derived: bool = False

    def is_enabled(self, cfg: DictConfig) -> bool:
        return self.enabled is None or self.enabled(cfg)


STAGES: dict[str, Stage] = {}

# Settings that were added after runs already existed, with the value that reproduces those
# runs' outputs exactly. While a setting holds this neutral value it is left out of the
# fingerprints, so run directories and cache entries made before it existed stay valid.
# ("budget": the whole section is neutral while budget.macs is null.)
NEUTRAL: dict[str, Any] = {
    "dataset.val_fraction": 0.0,
    "select": "last",
    "budget.macs": None,
    "slice.schedule": "progressive",
    "teacher.lr_schedule": "constant",
    "kd.lr_schedule": "constant",
}


def register_stage(stage: Stage) -> None:
    if stage.name in STAGES:
        raise ValueError(f"stage '{stage.name}' is already registered")
    STAGES[stage.name] = stage


class Context:
    """What a stage needs: the config, the run directory, the device, data and models."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = resolve_device(cfg.device)
        self._data: dict[str, ImageData] = {}

    # -- paths and fingerprints -------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        d = self.run_dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def stage_config(self, name: str) -> dict[str, Any]:
        st = STAGES[name]
        config = {k: to_plain(OmegaConf.select(self.cfg, k)) for k in st.keys}
        return _drop_neutral(config)

    def fingerprint(self, name: str) -> str:
        st = STAGES[name]
        payload = {
            "stage": name,
            "version": st.version,
            "config": self.stage_config(name),
            "upstream": {u: self.fingerprint(u) for u in st.requires},
            "extra": st.extra(self) if st.extra is not None else None,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def is_done(self, name: str) -> bool:
        done = self.run_dir / name / "done.json"
        return done.is_file() and read_json(done).get("fingerprint") == self.fingerprint(name)

    # -- data --------------------------------------------------------------------------------
    def data(self, split: str) -> ImageData:
        if split not in self._data:
            if split == "test":
                self._data[split] = load_split(self.cfg.dataset, split, self.cache_dir)
            else:  # the training images are read once for both train and val
                train, val = load_train_val(self.cfg.dataset, self.cache_dir)
                self._data["train"] = train
                if val is not None:
                    self._data["val"] = val
        if split not in self._data:
            raise M2MError("no validation split: dataset.val_fraction is 0")
        return self._data[split]

    @property
    def cache_dir(self) -> str:
        return str(Path(self.cfg.cache_dir).expanduser().resolve())

    @cached_property
    def num_classes(self) -> int:
        ds = self.cfg.dataset
        if ds.name == "fake" or (ds.num_classes is not None and ds.name != "imagefolder"):
            return int(ds.num_classes or 10)
        return self.data("train").num_classes

    def train_batches(self, batch_size: int | None = None) -> Batches:
        ds = self.cfg.dataset
        return Batches(
            self.data("train"),
            batch_size or ds.batch_size,
            ds.image_size,
            train=True,
            seed=self.cfg.seed,
            device=self.device,
        )

    def val_batches(self) -> Batches | None:
        """The validation split (``dataset.val_fraction``), or None when there is none."""
        ds = self.cfg.dataset
        if not val_fraction(ds):
            return None
        return Batches(self.data("val"), ds.eval_batch_size, ds.image_size, device=self.device)

    def test_batches(self) -> Batches:
        ds = self.cfg.dataset
        return Batches(self.data("test"), ds.eval_batch_size, ds.image_size, device=self.device)

    # -- models ------------------------------------------------------------------------------
    def load_model(self, stage: str) -> nn.Module:
        """The model a finished stage saved, on the run's device, in eval mode."""
        path = self.run_dir / stage / "model.pt"
        model, _ = load_checkpoint(
            path, expect_model=self.cfg.model.name, expect_classes=self.num_classes
        )
        return model.to(self.device).eval()


def _drop_neutral(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without the :data:`NEUTRAL` settings that hold their neutral value."""
    for path, neutral in NEUTRAL.items():
        section, _, leaf = path.rpartition(".")
        if path in config and config[path] == neutral:
            del config[path]
        elif (
            isinstance(config.get(section), dict)
            and leaf in config[section]
            and config[section][leaf] == neutral
        ):
            if section == "budget":  # the allocator is off: none of its settings matter
                del config[section]
            else:
                config[section] = {k: v for k, v in config[section].items() if k != leaf}
    return config


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            d = _first_difference(old.get(k), new.get(k), f"{prefix}{k}.")
            if d:
                return d
        return ""
    return "" if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def execute(ctx: Context, name: str) -> dict[str, Any]:
    """Run one stage (or skip it when its outputs exist for this configuration)."""
    st = STAGES[name]
    for req in st.requires:
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
    fp = ctx.fingerprint(name)
    done = ctx.run_dir / name / "done.json"
    if done.is_file():
        rec = read_json(done)
        if rec.get("fingerprint") == fp and not ctx.cfg.force:
            log.info(
                f"[{name}] skipped: outputs in {done.parent} match this configuration "
                "(force=true reruns)"
            )
            return read_json(done.parent / "metrics.json")
        if st.derived and not ctx.cfg.force:
            log.info(f"[{name}] outputs in {done.parent} are out of date; recomputing them")
        elif not ctx.cfg.force:
            diff = _first_difference(rec.get("config", {}), ctx.stage_config(name))
            raise M2MError(
                f"{done.parent} holds outputs of a different configuration "
                f"({diff or 'upstream changed'}); use a new hydra.run.dir, "
                "or force=true to replace them"
            )
        done.unlink()
    t0 = time.perf_counter()
    cached_from = None
    if st.cacheable and ctx.cfg.use_cache:
        key = hashlib.sha256(f"{fp}:{__version__}".encode()).hexdigest()
        with cache.locked(ctx.cache_dir, name, key):  # racing jobs: one computes, others reuse
            if cache.fetch(ctx.cache_dir, name, key, ctx.stage_dir(name)) and not ctx.cfg.force:
                cached_from = str(cache.entry_dir(ctx.cache_dir, name, key))
                log.info(f"[{name}] reused from cache {cached_from}")
                metrics = read_json(ctx.run_dir / name / "metrics.json")
            else:
                metrics = _run_stage(ctx, st)
                cache.publish(ctx.cache_dir, name, key, ctx.run_dir / name)
    else:
        metrics = _run_stage(ctx, st)
    seconds = time.perf_counter() - t0
    atomic_write_json(
        done,
        {
            "fingerprint": fp,
            "stage": name,
            "config": ctx.stage_config(name),
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


def _run_stage(ctx: Context, st: Stage) -> dict[str, Any]:
    log.info(f"[{st.name}] running")
    seed_everything(int(ctx.cfg.seed))
    return st.run(ctx)


PIPELINE = (
    "teacher",
    "score",
    "prune",
    "distill",
    "slice",
    "teacher_same_epochs",
    "peer_torch_pruning",
    "profile",
)


def run_command(command: str, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Dispatch a CLI command on a run directory."""
    from m2mdc import stages  # noqa: F401  (registers the stages)
    from m2mdc.stages.summary import write_summary

    ctx = Context(cfg, run_dir)
    if command == "run":
        for name in PIPELINE:
            if name in STAGES and STAGES[name].is_enabled(cfg):
                execute(ctx, name)
        summary = write_summary(ctx)
        record_stage(ctx.run_dir, "summary", cfg)
        return summary
    # a command runs its stages (`compare`: every comparison the config enables)
    names = [s.name for s in STAGES.values() if s.command == command]
    enabled = [n for n in names if STAGES[n].is_enabled(cfg)]
    if not enabled:
        raise M2MError(
            f"{command}: nothing to run; enable it with "
            + " or ".join(f"compare={n}" for n in names)
        )
    metrics: dict[str, Any] = {}
    for name in enabled:
        metrics = execute(ctx, name)
    return metrics


# -- Hydra entry --------------------------------------------------------------------------
def _task(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)
        result = run_command(cfg.command, cfg, run_dir)
    except M2MError as exc:
        print(f"m2mdc: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    # a sweeper may optimise on the returned value: the last stage's top1 if any
    return result.get("top1") if isinstance(result, dict) else None


def hydra_main(command: str, args: Sequence[str]) -> int:
    """Run ``command`` through Hydra with ``args`` (overrides and Hydra flags) as its argv."""
    import hydra

    from m2mdc.cli import conf_dir
    from m2mdc.config import register_configs

    register_configs()
    main = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(_task)
    argv = sys.argv
    from m2mdc.cli import split_overrides

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
