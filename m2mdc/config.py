"""Typed configuration schema (Hydra structured configs) and its validation.

The YAML tree in ``conf/`` is merged onto these dataclasses, so an unknown key or a wrongly
typed value fails at compose time. Ranges and choices are declared next to each field
(``metadata``) and checked by :func:`validate`, which names the full key, the value and what
is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from m2mdc.errors import M2MError

MODELS = ("resnet18", "resnet34", "mobilenet_v2")
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "fake")
DEVICES = ("auto", "cpu", "cuda")


def _f(default: Any = MISSING, *, factory: Any = None, **rules: Any) -> Any:
    """A dataclass field with validation rules (ge, gt, le, lt, choices, optional)."""
    if factory is not None:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


@dataclass
class ModelConfig:
    name: str = _f(MISSING, choices=MODELS)
    pretrained: bool = False
    weights: str | None = None


@dataclass
class DatasetConfig:
    name: str = _f(MISSING, choices=DATASETS)
    root: str | None = None
    download: bool = True
    image_size: int = _f(32, gt=0)
    num_classes: int | None = _f(None, ge=2)
    limit_train: int | None = _f(None, gt=0)
    limit_test: int | None = _f(None, gt=0)
    batch_size: int = _f(128, gt=0)
    eval_batch_size: int = _f(256, gt=0)
    num_workers: int = _f(0, ge=0)
    # fake dataset only: examples per split
    fake_train_size: int = _f(512, gt=0)
    fake_test_size: int = _f(128, gt=0)


@dataclass
class TeacherConfig:
    epochs: int = _f(5, ge=0)
    lr: float = _f(1e-3, gt=0)
    unfreeze: str = _f("last_third", choices=("last_third", "all"))
    grad_clip: float = _f(1.0, ge=0)
    checkpoint: str | None = None


@dataclass
class ScoreConfig:
    method: str = _f("mi", choices=("mi", "l1", "bn_gamma", "random"))
    bins: int = _f(10, ge=2)
    probe_samples: int = _f(5000, gt=0)
    probe_batch_size: int = _f(64, gt=0)


@dataclass
class PruneConfig:
    ratio: float = _f(0.4, ge=0, lt=1)
    keep_cfg: Any = None
    bn_recal_batches: int = _f(50, ge=0)


@dataclass
class KDConfig:
    name: str = _f("staged_cosine", choices=("staged_cosine", "hinton"))
    epochs: int = _f(5, ge=0)
    lr: float = _f(1e-4, gt=0)
    alpha: float = _f(0.1, ge=0)
    beta: float = _f(0.1, ge=0)
    temperature: float = _f(4.0, gt=0)
    grad_clip: float = _f(1.0, ge=0)
    feature_match: str = _f("kept_channels", choices=("kept_channels", "projection"))


@dataclass
class SliceConfig:
    name: str = _f("planes_mid", choices=("planes_mid", "planes", "mid", "none"))
    planes_keep: Any = 0.5  # a fraction in (0, 1], or a mapping stage -> fraction
    mid_keep: Any = 0.5
    round_to: int = _f(1, ge=1)
    repair_epochs: int = _f(1, ge=0)
    selector: str = _f("bn_l1", choices=("bn_gamma", "l1", "bn_l1", "random", "cmi"))
    include_first_stage: bool = False


@dataclass
class ProfileConfig:
    input_size: int | None = _f(None, gt=0)
    latency: bool = True
    latency_warmup: int = _f(5, ge=0)
    latency_repeats: int = _f(30, gt=0)
    batch_sizes: list[int] = _f(factory=lambda: [1])  # noqa: RUF009


@dataclass
class ExportConfig:
    format: str = _f("torchscript", choices=("torchscript", "onnx", "torch_export"))
    batch_size: int = _f(4, gt=0)
    atol: float = _f(1e-4, gt=0)


@dataclass
class Config:
    command: str = "run"
    experiment_name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    slice: SliceConfig = field(default_factory=SliceConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = _f(42, ge=0)
    device: str = _f("auto", choices=DEVICES)
    cache_dir: str = "outputs/cache"
    use_cache: bool = True
    force: bool = False
    checkpoint: str | None = None


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore as ``m2mdc_schema`` (used by conf/config.yaml)."""
    ConfigStore.instance().store(name="m2mdc_schema", node=Config)


def _check_value(key: str, value: Any, rules: dict[str, Any]) -> None:
    if value is None:
        return
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        raise M2MError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise M2MError(f"{key}={value} is not a finite number")
    bounds = [
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ]
    for name, ok, _sym in bounds:
        if name in rules and not ok(value, rules[name]):
            allowed = " and ".join(f"{s} {rules[n]}" for n, _, s in bounds if n in rules)
            raise M2MError(f"{key}={value} is out of range; allowed: {allowed}")


def _walk(schema: Any, node: Any, prefix: str) -> None:
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if not isinstance(node, DictConfig) or f.name not in node:
            continue
        value = node[f.name]
        factory = f.default_factory
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            _walk(factory, value, key + ".")
            continue
        if isinstance(value, ListConfig):
            for i, item in enumerate(value):
                _check_value(f"{key}[{i}]", item, dict(f.metadata))
            continue
        if isinstance(value, DictConfig):
            continue
        _check_value(key, value, dict(f.metadata))


def validate(cfg: DictConfig) -> None:
    """Check every declared range and choice; raise M2MError naming the first offending key.

    Sections added by later schema extensions (registered in :data:`EXTRA_VALIDATORS`) are
    checked by their own functions.
    """
    _walk(Config, cfg, "")
    for check in EXTRA_VALIDATORS:
        check(cfg)


def _validate_slice_keeps(cfg: DictConfig) -> None:
    for key in ("planes_keep", "mid_keep"):
        value = cfg.slice.get(key) if "slice" in cfg else None
        items = value.items() if isinstance(value, DictConfig) else [(None, value)]
        for stage, v in items:
            name = f"slice.{key}" + (f".{stage!s}" if stage is not None else "")
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise M2MError(
                    f"{name}={v!r} is not valid; give a fraction in (0, 1] or a mapping "
                    "stage -> fraction"
                )
            _check_value(name, float(v), {"gt": 0, "le": 1})


EXTRA_VALIDATORS: list[Any] = [_validate_slice_keeps]


def to_plain(node: Any) -> Any:
    """A resolved, JSON-able copy of a config node."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node
