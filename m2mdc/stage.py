"""What every stage is built on: the :class:`Stage` record, the stage registry and the
:class:`Context` a stage runs in (config, run directory, device, data, models, fingerprints).

It sits below both :mod:`m2mdc.pipeline` (which orders and executes stages) and
:mod:`m2mdc.stages` (which registers them), so neither imports the other to register.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from m2mdc.arch import model_id
from m2mdc.artifacts import load_checkpoint, read_json
from m2mdc.config import IMAGE_TREES, to_plain
from m2mdc.data.datasets import (
    Split,
    has_test_split,
    load_split,
    load_train_val,
    val_fraction,
)
from m2mdc.data.loader import Batches
from m2mdc.errors import M2MError
from m2mdc.rows import finished_models
from m2mdc.train.loop import resolve_device


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
        trains: a training stage: under data-parallel training (:mod:`m2mdc.train.dist`) it
            runs on every rank (rank 0 writes); any other stage runs on rank 0 alone.
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
    # settings inside ``keys`` that do not change this stage's outputs (e.g. another stage's
    # settings in a shared section): left out of its fingerprint
    ignore: tuple[str, ...] = ()
    trains: bool = False

    def is_enabled(self, cfg: DictConfig) -> bool:
        return self.enabled is None or self.enabled(cfg)


STAGES: dict[str, Stage] = {}

# a training section's optimizer settings (teacher.*, kd.*) that train with Adam as before
OPTIM_NEUTRAL: dict[str, Any] = {
    "optim": "adam",
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": None,
    "label_smoothing": 0.0,
    "warmup_epochs": 0,
}

# Settings that were added after runs already existed, with the value that reproduces those
# runs' outputs exactly. While a setting holds this neutral value it is left out of the
# fingerprints, so run directories and cache entries made before it existed stay valid.
# ("budget": the whole section is neutral while budget.macs is null.)
NEUTRAL: dict[str, Any] = {
    "dataset.val_fraction": 0.0,
    "model.source": "m2mdc",
    "select": "last",
    "budget.macs": None,
    "slice.schedule": "progressive",
    "slice.decay": "cosine",
    "slice.repair_ramp": "restart",
    "kd.sparsity": {"weight": 0.0, "kind": "bn_l1", "ramp": "none"},
    "teacher.lr_schedule": "constant",
    "kd.lr_schedule": "constant",
    "profile.input_size": None,  # MACs are counted at dataset.image_size
    "dataset.bad_files": "error",
    "dataset.augment": "flip",
    **{
        f"{section}.{key}": value
        for section in ("teacher", "kd")
        for key, value in OPTIM_NEUTRAL.items()
    },
}


# Settings that change how the images are read, never which images a batch holds (the
# streamed batches equal the in-memory ones): left out of every stage's fingerprint.
HOW_DATA_IS_READ = ("dataset.in_memory", "dataset.memory_budget_gb")


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
        self._data: dict[str, Split] = {}

    # -- paths and fingerprints -------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        d = self.run_dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def stage_config(self, name: str) -> dict[str, Any]:
        st = STAGES[name]
        config = {k: to_plain(OmegaConf.select(self.cfg, k)) for k in st.keys}
        for path in (*st.ignore, *HOW_DATA_IS_READ):
            section, _, leaf = path.rpartition(".")
            if isinstance(config.get(section), dict):
                config[section] = {k: v for k, v in config[section].items() if k != leaf}
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
    def data(self, split: str) -> Split:
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
        if ds.name == "fake" or (ds.num_classes is not None and ds.name not in IMAGE_TREES):
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
            augment=ds.augment,
        )

    def val_batches(self) -> Batches | None:
        """The validation split (``dataset.val_fraction``), or None when there is none."""
        ds = self.cfg.dataset
        if not val_fraction(ds):
            return None
        return Batches(
            self.data("val"),
            ds.eval_batch_size,
            ds.image_size,
            device=self.device,
            split="val",
            augment=ds.augment,
        )

    @cached_property
    def eval_split(self) -> str:
        """The split every stage reports its accuracy on: ``test``, or ``val`` for an image
        tree without a test folder (the validation split then stands in for it, and every
        metric says so)."""
        return "test" if has_test_split(self.cfg.dataset) else "val"

    def eval_batches(self) -> Batches:
        """The reporting split (:attr:`eval_split`) in evaluation batches."""
        ds = self.cfg.dataset
        split = self.eval_split
        return Batches(
            self.data(split),
            ds.eval_batch_size,
            ds.image_size,
            device=self.device,
            split=split,
            augment=ds.augment,
        )

    # -- models ------------------------------------------------------------------------------
    def model_fingerprints(self) -> dict[str, str | None]:
        """Row -> fingerprint of every model the run holds: the fingerprint input of the stages
        that measure or export whatever models there are (profile, export)."""
        return {
            row: read_json(self.run_dir / st / "done.json").get("fingerprint")
            for row, st in finished_models(self.run_dir).items()
        }

    def load_model(self, stage: str, *, expect: bool = True) -> nn.Module:
        """The model a finished stage saved, on the run's device, in eval mode.

        ``expect``: refuse a model of another ``model.name`` or class count than the config's
        (stages that train or compare against the config); stages that measure whatever models
        the run holds (profile, export, summary) pass False and read neither setting.
        """
        path = self.run_dir / stage / "model.pt"
        if not expect:
            model, _ = load_checkpoint(path)
        else:
            model, _ = load_checkpoint(
                path, expect_model=model_id(self.cfg.model), expect_classes=self.num_classes
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
