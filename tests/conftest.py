"""Shared fixtures: composed configs, the CIFAR-10 subset, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

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
