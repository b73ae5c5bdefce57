"""Shared fixtures: composed configs, the CIFAR-10 subset, a CLI runner, one stage cache and one
finished quick run for the whole session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
CIFAR_ZIP = ROOT.parent / "shared" / "data" / "cifar10-subset.zip"

# tiny models: thread start-up costs more than it saves, and the machine is shared by one
# pytest worker per core (make test: -n auto); the m2mdc subprocesses (run_cli) inherit the
# environment and use one thread too
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> DictConfig composed from conf/ like the CLI does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from m2mdc.config import register_configs
    from m2mdc.hydra_args import conf_dir

    register_configs()

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


def tiny_classifier() -> torch.nn.Module:
    """A seeded 3-class conv net small enough for exact training-loop comparisons."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


# the quickstart experiment (the default) shrunk to seconds: 5 training batches per epoch
TINY = [
    "dataset.limit_train=160",
    "dataset.limit_test=80",
    "dataset.batch_size=32",
    "teacher.epochs=2",
    "kd.epochs=2",
    "score.probe_samples=96",
    "prune.bn_recal_batches=4",
    "profile.latency_repeats=3",
    "profile.latency_warmup=1",
    "slice.repair_epochs=1",
]


def _ok(proc):
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


def run_cli(
    *args: str, cwd: Path, timeout: int = 900, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the real ``m2mdc`` console script in a subprocess."""
    exe = Path(sys.executable).parent / "m2mdc"
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """The CIFAR-10 subset from ../shared/data, extracted once per session."""
    if not CIFAR_ZIP.is_file():
        pytest.skip(f"{CIFAR_ZIP} not present")
    out = tmp_path_factory.mktemp("cifar10-subset")
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        z.extractall(out)
    candidates = [p.parent for p in out.rglob("train") if p.is_dir()]
    return candidates[0]


def _session_dir(tmp_path_factory) -> Path:
    """A directory of this test session that every pytest-xdist worker sees (the workers'
    base temporary directories share a parent that is new for each session)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def stage_cache(tmp_path_factory) -> Path:
    """One stage cache (``cache_dir=``) for the session, shared by the xdist workers: a teacher
    and block scores of one configuration are trained once (m2mdc's cache takes a lock per
    entry, so racing commands compute an entry once). Tests about the cache itself keep their
    own ``cache_dir``; the default of a command run in ``tiny_run.parent`` is this one too."""
    path = _session_dir(tmp_path_factory) / "shared" / "outputs" / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, stage_cache) -> Path:
    """One finished ``m2mdc run`` of TINY (real console script) for the whole session, made
    once across the xdist workers (a file lock). Read it; a test that runs a command on it
    works on a ``shutil.copytree`` copy. Run in ``stage_cache``'s working directory, so commands
    run with ``cwd=tiny_run.parent`` find its teacher and scores in their default cache."""
    cwd = stage_cache.parents[1]
    run_dir = cwd / "tiny_run"
    with FileLock(str(cwd / "tiny_run.lock")):
        if not (run_dir / "profile" / "done.json").is_file():
            shutil.rmtree(run_dir, ignore_errors=True)  # a failed attempt of another worker
            _ok(run_cli("run", *TINY, f"hydra.run.dir={run_dir}", cwd=cwd))
    return run_dir
