"""Typed configuration schema (Hydra structured configs) and its validation.

The YAML tree in ``conf/`` is merged onto these dataclasses, so an unknown key or a wrongly
typed value fails at compose time. Ranges and choices are declared next to each field
(``metadata``) and checked by :func:`validate`, which names the full key, the value and what
is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from m2mdc.errors import M2MError

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "imagenet", "fake")
IMAGE_TREES = ("imagefolder", "imagenet")  # m2mdc.data.datasets: read from dataset.root
DEVICES = ("auto", "cpu", "cuda")
COMPARISONS = ("teacher_same_epochs", "torch_pruning")
PEER_MATCHES = ("macs", "latency")  # peer.match: what the Torch-Pruning peer is matched to
SELECT = ("last", "best_val")
BAD_FILES = ("error", "skip")  # m2mdc.data.datasets: what undecodable image files get
AUGMENTS = ("flip", "cifar", "imagenet")  # m2mdc.data.augment: the training batches' presets
IN_MEMORY = ("auto", "true", "false")  # m2mdc.data.datasets: hold a split in RAM or stream it


def _f(default: Any = MISSING, *, factory: Any = None, **rules: Any) -> Any:
    """A dataclass field with validation rules (ge, gt, le, lt, choices, optional; fold: a
    string compared with the choices in lower case)."""
    if factory is not None:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


@dataclass
class ModelConfig:
    # the choices are the adapter registry's (m2mdc.arch.adapters.ADAPTERS) for source=m2mdc,
    # else the library's own list of models (torchvision, timm), checked one layer up with the
    # other model settings (m2mdc.structure.check_model): the registries import torch
    name: str = MISSING
    # m2mdc: the hand-written adapters; torchvision / timm: the generic adapter (any residual
    # CNN of that library, read from its graph); choices m2mdc.arch.adapters.SOURCES
    source: str = "m2mdc"
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
    # held out of the training split (class-stratified, fixed): model selection, never test
    val_fraction: float = _f(0.0, ge=0, lt=1)
    batch_size: int = _f(128, gt=0)
    eval_batch_size: int = _f(256, gt=0)
    num_workers: int = _f(0, ge=0)
    # image folders: an image file that cannot be decoded stops the run (error), or is left out
    # with one logged line (skip)
    bad_files: str = _f("error", choices=BAD_FILES)
    # training batches: flip (horizontal flips), cifar (zero-pad 4 and random crop, plus flip),
    # imagenet (random resized crop plus flip; evaluation: resize and center crop)
    augment: str = _f("flip", choices=AUGMENTS)
    # image trees: hold each split in RAM as decoded uint8 (true), stream it from disk with
    # dataset.num_workers decoding processes (false), or hold it in RAM when its decoded size
    # fits dataset.memory_budget_gb (auto). The batches are the same either way.
    in_memory: str = _f("auto", choices=IN_MEMORY, fold=True)
    # the largest decoded split in_memory=auto holds in RAM; null: a quarter of the RAM
    memory_budget_gb: float | None = _f(None, gt=0)
    # fake dataset only: examples per split
    fake_train_size: int = _f(512, gt=0)
    fake_test_size: int = _f(128, gt=0)


LR_SCHEDULES = ("constant", "cosine")  # m2mdc.train.loop.lr_factor
OPTIMIZERS = ("adam", "sgd")  # m2mdc.train.optim


@dataclass
class OptimFields:
    """How a training section optimizes (m2mdc.train.optim), besides its lr and lr_schedule."""

    optim: str = _f("adam", choices=OPTIMIZERS)
    momentum: float = _f(0.9, ge=0, lt=1)  # sgd only
    nesterov: bool = True  # sgd only
    # null: 5e-4 for sgd, 0 for adam; never on biases and normalisation weights
    weight_decay: float | None = _f(None, ge=0)
    label_smoothing: float = _f(0.0, ge=0, lt=1)  # of the cross-entropy term
    # linear warmup per step over these epochs, then lr_schedule over the rest
    warmup_epochs: int = _f(0, ge=0)


@dataclass
class TeacherConfig(OptimFields):
    epochs: int = _f(5, ge=0)
    lr: float = _f(1e-3, gt=0)
    # constant, or cosine: decayed per step to ~0 over the stage's epochs (m2mdc.train.loop)
    lr_schedule: str = _f("constant", choices=LR_SCHEDULES)
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


KD_PRESETS = (
    "staged_cosine",
    "hinton",
    "kl",
    "cosine_kl",
    "ce_only",
    "attention_transfer",
    "ig_overlay",
    "ig_at",
    "custom",
)
# the built-in terms of m2mdc.distill.losses.KD_TERMS (kept here so validation needs no torch;
# a test checks they agree; terms registered by extensions are looked up in the registry)
KD_TERM_NAMES = ("attention_transfer", "ce", "feature_cosine", "kl", "logit_cosine")
KD_RAMPS = ("linear", "none")


@dataclass
class KDTermConfig:
    """One weighted KD term: ``weight`` is the peak, reached at the last epoch when ramped."""

    name: str = MISSING
    weight: float = 1.0
    ramp: str = "linear"  # linear: weight (t-1)/(T-1); none: weight in every epoch
    temperature: float | None = None  # kl only; null: kd.temperature


@dataclass
class IGConfig:
    """Integrated-gradients overlay (arXiv:2506.14440); ``prob=0`` turns it off."""

    prob: float = _f(0.0, ge=0, le=1)
    alpha: float = _f(0.5, ge=0, le=1)
    overlay: str = _f("blend", choices=("blend", "mask"))
    steps: int = _f(32, ge=1)
    batch_size: int = _f(32, gt=0)


@dataclass
class SparsityConfig:
    """Group-sparsity penalty on the channel groups slicing will rank (m2mdc.distill.sparsity),
    during distill and the progressive slicing repairs; ``weight=0`` turns it off."""

    weight: float = _f(0.0, ge=0)
    kind: str = _f("bn_l1", choices=("bn_l1", "group_lasso"))
    ramp: str = _f("none", choices=("none", "linear"))


@dataclass
class KDConfig(OptimFields):
    name: str = _f("staged_cosine", choices=KD_PRESETS)
    epochs: int = _f(5, ge=0)
    lr: float = _f(1e-4, gt=0)
    # every KD training (distill, each slicing repair, the peer): constant, or cosine over its
    # epochs
    lr_schedule: str = _f("constant", choices=LR_SCHEDULES)
    alpha: float = _f(0.1, ge=0)
    beta: float = _f(0.1, ge=0)
    temperature: float = _f(4.0, gt=0)
    grad_clip: float = _f(1.0, ge=0)
    feature_match: str = _f("kept_channels", choices=("kept_channels", "projection"))
    terms: list[KDTermConfig] = field(default_factory=list)
    ig: IGConfig = field(default_factory=IGConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)


REPAIR_RAMPS = ("restart", "continue")  # m2mdc.distill.losses.repair_terms


@dataclass
class SliceConfig:
    name: str = _f("planes_mid", choices=("planes_mid", "planes", "mid", "none"))
    planes_keep: Any = 0.5  # a fraction in (0, 1], or a mapping stage -> fraction
    mid_keep: Any = 0.5
    round_to: int = _f(1, ge=1)
    repair_epochs: int = _f(1, ge=0)
    selector: str = _f("bn_l1", choices=("bn_gamma", "l1", "bn_l1", "random", "cmi"))
    include_first_stage: bool = False
    # progressive: one stage per step, each repaired (Algorithm 1); oneshot: every stage cut in
    # one step from the same model, then the whole repair budget (repair_epochs per stage);
    # gradual: oneshot's selection, decayed to zero while repairing, then cut
    schedule: str = _f("progressive", choices=("progressive", "oneshot", "gradual"))
    decay: str = _f("cosine", choices=("cosine", "linear"))  # gradual: the factor's shape
    # the ramped KD terms in every slicing repair: restart their ramp over the repair's epochs
    # (a 1-epoch repair is then pure CE), or continue at the distill stage's final weights
    repair_ramp: str = _f("restart", choices=REPAIR_RAMPS)


@dataclass
class ProfileConfig:
    input_size: int | None = _f(None, gt=0)
    latency: bool = True
    latency_warmup: int = _f(5, ge=0)
    latency_repeats: int = _f(30, gt=0)
    batch_sizes: list[int] = _f(factory=lambda: [1, 64], gt=0)  # noqa: RUF009


@dataclass
class BudgetConfig:
    """MAC-budget allocator (m2mdc.budget): ``macs`` <= 1 is a fraction of the teacher's MACs,
    > 1 absolute MACs; null = off (prune.ratio and slice.*_keep are used as given)."""

    macs: float | None = _f(None, gt=0)
    tolerance: float = _f(0.02, gt=0, lt=1)
    ratios: list[float] = _f(factory=lambda: [0.0, 0.2, 0.4, 0.6], ge=0, lt=1)  # noqa: RUF009
    proxy_batches: int = _f(10, gt=0)  # BN recalibration batches per candidate
    proxy_samples: int = _f(1000, gt=0)  # probe images (training split) for the proxy top1


@dataclass
class PeerConfig:
    """``compare=torch_pruning``: Torch-Pruning (DepGraph) from the same teacher, pruned with a
    uniform channel ratio bisected to the inner_slice student's MACs (``match: [macs]``) and/or
    its measured batch-1 latency (``latency``), each then trained for the students'
    post-pruning epochs with ``terms`` at ``kd.lr``."""

    # one peer per entry: macs (row peer_torch_pruning), latency (peer_torch_pruning_latency)
    match: list[str] = _f(factory=lambda: ["macs"], choices=PEER_MATCHES)  # noqa: RUF009
    importance: str = _f("l1", choices=("l1", "bn_scale", "taylor"))
    mac_tolerance: float = _f(0.02, gt=0, lt=1)  # relative; the bisection stops inside it
    latency_tolerance: float = _f(0.05, gt=0, lt=1)  # relative, on the peer/student latency
    latency_repeats: int = _f(100, gt=0)  # timed rounds (peer and student) per bisection trial
    taylor_batches: int = _f(8, gt=0)  # batches of gradients for importance=taylor
    temperature: float = _f(4.0, gt=0)
    terms: list[KDTermConfig] = field(
        default_factory=lambda: [
            KDTermConfig(name="ce", weight=1.0, ramp="none"),
            KDTermConfig(name="kl", weight=1.0, ramp="none"),
        ]
    )


@dataclass
class PerfConfig:
    """Execution speed (m2mdc.train.perf); the defaults are plain float32 eager PyTorch with
    Adam's fused kernel.

    Not part of any stage fingerprint (like ``device``): outputs are reused across settings.
    """

    channels_last: bool = False
    amp: str = _f("none", choices=("none", "bf16", "fp16"))  # bf16: CUDA or CPU; fp16: CUDA
    compile: bool = False  # torch.compile the forward passes of training and evaluation
    fused_adam: bool = True  # Adam's fused kernel: faster; false = the per-parameter loop
    # under torchrun: BatchNorm statistics of the global batch (training and recalibration)
    sync_bn: bool = False
    # torch's intra-op threads per job; null: the cores divided among the jobs run at once
    threads: int | None = _f(None, gt=0)


@dataclass
class ExportConfig:
    format: str = _f("torchscript", choices=("torchscript", "onnx", "torch_export"))
    batch_size: int = _f(4, gt=0)
    atol: float = _f(1e-4, gt=0)


@dataclass
class QuantizeConfig:
    """Post-training static INT8 quantization in ONNX Runtime (m2mdc.stages.quantize):
    ``m2mdc quantize``, and in ``m2mdc run`` when ``enabled``."""

    enabled: bool = False  # also run by `m2mdc run` (control flow: in no fingerprint)
    calibration_samples: int = _f(256, gt=0)  # training images (fixed, seeded) for the ranges
    latency_warmup: int = _f(5, ge=0)
    latency_repeats: int = _f(30, gt=0)
    batch_sizes: list[int] = _f(factory=lambda: [1, 64], gt=0)  # noqa: RUF009


@dataclass
class UIConfig:
    """Console output; not part of any stage fingerprint."""

    # when stdout is not a terminal (SLURM, nohup, CI): seconds between progress lines
    progress_every_s: float = _f(30.0, gt=0)


LOGGERS = ("csv", "tensorboard", "mlflow")  # the logger= group (besides none): m2mdc.tracking


@dataclass
class BackendConfig:
    """One tracking backend of the ``logger`` section: on or off."""

    enabled: bool = False


@dataclass
class MLflowConfig:
    enabled: bool = False
    # null: a local file store, <run dir>/tracking/mlruns (a sweep's: <sweep dir>/tracking/mlruns)
    tracking_uri: str | None = None
    # null: experiment_name for a run, the sweep directory for the jobs of a sweep
    experiment: str | None = None


@dataclass
class LoggerConfig:
    """Experiment tracking (m2mdc.tracking), chosen with the ``logger=`` group: ``none``,
    ``csv``, ``tensorboard``, ``mlflow`` or a list of them (``logger=[csv,tensorboard]``).
    Not part of any stage fingerprint."""

    every_n_steps: int = _f(20, gt=0)  # training steps between logged step metrics, at least
    csv: BackendConfig = field(default_factory=BackendConfig)
    tensorboard: BackendConfig = field(default_factory=BackendConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)


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
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    ui: UIConfig = field(default_factory=UIConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # fair baselines beside the students: one name or a list (see comparisons())
    compare: Any = _f(factory=list, choices=COMPARISONS)  # noqa: RUF009
    # which epoch a training stage keeps: the last, or the best by validation top1
    select: str = _f("last", choices=SELECT)
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
    if rules.get("fold") and isinstance(value, str):  # true/false: Hydra reads them as bools
        value = value.lower()
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


def check_kd_terms(terms: Any, where: str = "kd.terms") -> None:
    """Validate a list of KD terms; M2MError naming ``<where>[i].key`` and the choices."""
    if terms is None:
        return
    if isinstance(terms, DictConfig | dict) or not isinstance(terms, ListConfig | list | tuple):
        raise M2MError(
            f"{where} must be a list of {{name, weight, ramp, temperature}} entries, e.g. "
            f"{where}=[{{name:ce,weight:1,ramp:none}},{{name:kl,weight:1}}]"
        )
    for i, term in enumerate(terms):
        key = f"{where}[{i}]"
        if not isinstance(term, DictConfig | dict):
            raise M2MError(f"{key}={term!r} is not valid; give {{name, weight, ramp}}")
        if isinstance(term, DictConfig) and OmegaConf.is_missing(term, "name"):
            raise M2MError(f"{key}.name is missing; choose one of: {', '.join(_term_names())}")
        name = term.get("name")
        if name is None:
            raise M2MError(f"{key}.name is missing; choose one of: {', '.join(_term_names())}")
        _check_value(f"{key}.name", name, {"choices": _term_names()})
        weight = term.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise M2MError(f"{key}.weight={weight!r} is not a number")
        _check_value(f"{key}.weight", float(weight), {"ge": 0})
        _check_value(f"{key}.ramp", term.get("ramp", "linear"), {"choices": KD_RAMPS})
        temperature = term.get("temperature")
        if temperature is not None:
            if name != "kl":
                raise M2MError(
                    f"{key}.temperature={temperature} is only used by kl; remove it from {name}"
                )
            _check_value(f"{key}.temperature", float(temperature), {"gt": 0})


def _term_names() -> tuple[str, ...]:
    """The built-in terms, plus any an extension registered (if the registry is loaded: the
    check does not import torch itself)."""
    losses = sys.modules.get("m2mdc.distill.losses")
    registered = tuple(losses.KD_TERMS.names()) if losses is not None else ()
    return tuple(sorted(set(KD_TERM_NAMES) | set(registered)))


def _validate_kd_terms(cfg: DictConfig) -> None:
    if "kd" in cfg and "terms" in cfg.kd:
        check_kd_terms(cfg.kd.terms)
    if "peer" in cfg and "terms" in cfg.peer:
        if not cfg.peer.terms:
            raise M2MError("peer.terms is empty; give at least one term, e.g. [{name: ce}]")
        check_kd_terms(cfg.peer.terms, "peer.terms")


def _validate_peer_match(cfg: DictConfig) -> None:
    if "peer" in cfg and "match" in cfg.peer and not cfg.peer.match:
        raise M2MError(
            f"peer.match is empty; choose one or both of: {', '.join(PEER_MATCHES)}, "
            "e.g. peer.match=[macs,latency]"
        )


def _validate_select(cfg: DictConfig) -> None:
    if cfg.get("select") == "best_val" and not float(cfg.dataset.get("val_fraction") or 0):
        raise M2MError(
            "select=best_val needs a validation split; set dataset.val_fraction "
            "(e.g. dataset.val_fraction=0.1), or use select=last"
        )


def _validate_nesterov(cfg: DictConfig) -> None:
    for section in ("teacher", "kd"):
        sec = cfg.get(section)
        if sec is None or sec.get("optim") != "sgd" or not sec.get("nesterov"):
            continue
        if not float(sec.get("momentum") or 0):
            raise M2MError(
                f"{section}.nesterov=true needs momentum; set {section}.momentum > 0 "
                f"(e.g. {section}.momentum=0.9), or {section}.nesterov=false"
            )


# the settings that name model parts are checked one layer up (m2mdc.structure.validate_all)
EXTRA_VALIDATORS: list[Any] = [
    _validate_nesterov,
    _validate_slice_keeps,
    _validate_kd_terms,
    _validate_peer_match,
    _validate_select,
]


def comparisons(cfg: DictConfig) -> list[str]:
    """``compare`` as a list: ``compare=teacher_same_epochs`` and ``compare=[a,b]`` both work."""
    value = cfg.get("compare")
    if value is None:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def to_plain(node: Any) -> Any:
    """A resolved, JSON-able copy of a config node."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node
