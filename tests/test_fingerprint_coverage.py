"""What a stage reads decides its fingerprint: every setting a stage reads while it runs must be
covered by what its fingerprint hashes (its own keys, its upstream stages', its extra input).

Each stage runs under a config that records every key read: attribute and item access, ``get``,
``OmegaConf.select`` and whole-node conversions (``to_container``). The same recording around
``ctx.fingerprint(stage)`` gives the keys the fingerprint covers. A read outside them is a
setting that changes the stage's outputs without invalidating them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from omegaconf import Container, DictConfig, ListConfig, OmegaConf

from m2mdc import pipeline
from m2mdc.stage import STAGES, Context

pytestmark = pytest.mark.slow

# settings that never change what a stage produces (speed, where things live, control flow)
NOT_RESULTS = ("perf", "device", "cache_dir", "use_cache", "force", "command")

TINY = [  # what a stage reads does not depend on how much data it reads: 3 batches an epoch
    "dataset.limit_train=96",
    "dataset.limit_test=32",
    "dataset.batch_size=32",
    "teacher.epochs=1",
    "kd.epochs=1",
    "score.probe_samples=96",
    "prune.bn_recal_batches=4",
    "profile.latency_repeats=2",
    "profile.latency_warmup=0",
    "profile.batch_sizes=[1]",
    "slice.repair_epochs=1",
    "budget.proxy_batches=2",
    "budget.proxy_samples=64",
]


class Reads:
    """The full keys read from any config node while :meth:`tracking` is active."""

    def __init__(self) -> None:
        self.keys: set[str] | None = None

    def add(self, node: Container, key: object, value: object) -> None:
        if self.keys is None or (isinstance(value, Container) and not isinstance(key, str)):
            return
        if isinstance(value, Container):  # navigation: what is read below it is recorded
            return
        full = node._get_full_key(key)  # type: ignore[arg-type]
        self.keys.add(re.sub(r"\[\d+\]", "", full))

    def add_node(self, node: object) -> None:
        if self.keys is not None and isinstance(node, Container):
            self.keys.add(node._get_full_key(None) or "<root>")

    @contextmanager
    def tracking(self) -> Iterator[set[str]]:
        outer, self.keys = self.keys, set()
        try:
            yield self.keys
        finally:
            inner, self.keys = self.keys, outer
            if outer is not None:
                outer |= inner


@pytest.fixture
def reads(monkeypatch) -> Reads:
    r = Reads()
    get_attr, get_item, get = DictConfig.__getattr__, DictConfig.__getitem__, DictConfig.get
    list_item = ListConfig.__getitem__
    select, to_container = OmegaConf.select, OmegaConf.to_container

    def _getattr(self, key):
        value = get_attr(self, key)
        r.add(self, key, value)
        return value

    def _getitem(self, key):
        value = get_item(self, key)
        r.add(self, key, value)
        return value

    def _get(self, key, default_value=None):
        value = get(self, key, default_value)
        r.add(self, key, value)
        return value

    def _list_item(self, index):
        value = list_item(self, index)
        if not isinstance(value, Container) and r.keys is not None:
            r.add_node(self)
        return value

    def _select(cfg, key, **kw):
        value = select(cfg, key, **kw)
        if r.keys is not None:
            prefix = cfg._get_full_key(None) if isinstance(cfg, Container) else ""
            r.keys.add(f"{prefix}.{key}" if prefix else key)
        return value

    def _to_container(cfg, **kw):
        r.add_node(cfg)
        return to_container(cfg, **kw)

    monkeypatch.setattr(DictConfig, "__getattr__", _getattr)
    monkeypatch.setattr(DictConfig, "__getitem__", _getitem)
    monkeypatch.setattr(DictConfig, "get", _get)
    monkeypatch.setattr(ListConfig, "__getitem__", _list_item)
    monkeypatch.setattr(OmegaConf, "select", staticmethod(_select))
    monkeypatch.setattr(OmegaConf, "to_container", staticmethod(_to_container))
    return r


def _covered(key: str, prefixes: set[str]) -> bool:
    if "<root>" in prefixes or key.split(".")[0] in NOT_RESULTS:
        return True
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _run_tracked(cfg: DictConfig, run_dir: Path, reads: Reads, monkeypatch) -> dict[str, set]:
    """Run every stage of ``m2mdc run`` (and export); stage -> keys read but not covered."""
    uncovered: dict[str, set[str]] = {}

    def tracked(name: str, run):
        def _run(ctx: Context):
            ctx = Context(ctx.cfg, ctx.run_dir)  # nothing cached from an earlier stage's reads
            with reads.tracking() as fp_keys:
                ctx.fingerprint(name)
            with reads.tracking() as run_keys:
                metrics = run(ctx)
            ignored = set(STAGES[name].ignore)  # left out of the fingerprint on purpose
            uncovered[name] = {
                k
                for k in run_keys
                if not _covered(k, fp_keys) or any(k == i or k.startswith(i + ".") for i in ignored)
            }
            return metrics

        return _run

    from m2mdc import stages  # noqa: F401

    for name, st in list(STAGES.items()):
        monkeypatch.setitem(STAGES, name, dataclasses.replace(st, run=tracked(name, st.run)))
    pipeline.run_command("run", cfg, run_dir)
    pipeline.run_command("export", cfg, run_dir)
    return uncovered


@pytest.mark.parametrize(
    "overrides",
    [
        # the default recipe with both comparisons (both peers), a validation split and
        # held-out selection
        [
            "compare=[teacher_same_epochs,torch_pruning]",
            "peer.match=[macs,latency]",
            "peer.latency_tolerance=0.3",  # a shared machine times noisily
            "peer.latency_repeats=10",  # what is read matters here, not the match's precision
            "dataset.val_fraction=0.1",
            "select=best_val",
            "profile.input_size=32",  # the size every stage counts MACs at
        ],
        # the MAC-budget allocator, progressive slicing with the CMI selector, IG overlay,
        # INT8 quantization of the students
        [
            "quantize.enabled=true",
            "quantize.calibration_samples=32",
            "quantize.latency_repeats=2",
            "quantize.latency_warmup=0",
            "quantize.batch_sizes=[1]",
            "recipe=budget",
            "budget.ratios=[0.0,0.4]",
            "slice.schedule=progressive",
            "slice.selector=cmi",
            "kd=ig_overlay",
            "kd.ig.steps=2",
            "kd.ig.prob=0.2",
        ],
    ],
    ids=["default+compare", "budget+cmi+ig+int8"],
)
def test_every_setting_a_stage_reads_is_in_its_fingerprint(
    overrides, compose_cfg, reads, monkeypatch, tmp_path
):
    cfg = compose_cfg("experiment=quickstart", *TINY, f"cache_dir={tmp_path / 'cache'}", *overrides)
    uncovered = _run_tracked(cfg, tmp_path / "run", reads, monkeypatch)
    ran = {"teacher", "score", "prune", "distill", "slice", "profile"}
    ran |= {"quantize"} if "quantize.enabled=true" in overrides else set()
    assert set(uncovered) >= ran
    assert {k: sorted(v) for k, v in uncovered.items() if v} == {}


def test_the_recorder_sees_a_read_outside_the_fingerprint(compose_cfg, reads, monkeypatch):
    """The check itself: a stage reading a setting its fingerprint leaves out is reported."""
    from m2mdc import stages  # noqa: F401

    cfg = compose_cfg("experiment=quickstart")
    ctx = Context(cfg, Path("unused"))
    with reads.tracking() as fp_keys:
        ctx.fingerprint("score")
    with reads.tracking() as run_keys:
        _ = cfg.kd.lr, cfg.score.bins, cfg.perf.amp
    assert {k for k in run_keys if not _covered(k, fp_keys)} == {"kd.lr"}
