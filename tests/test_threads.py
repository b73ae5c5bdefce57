"""perf.threads: torch's intra-op threads per job, by default the cores divided among the jobs
a local launcher runs at once, so a parallel sweep does not oversubscribe the machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from m2mdc.train.perf import available_cores, intra_op_threads
from tests.conftest import run_cli

TINY = [
    "dataset.limit_train=96",
    "dataset.limit_test=64",
    "dataset.batch_size=32",
    "teacher.epochs=1",
    "kd.epochs=0",
    "slice=none",
    "score.probe_samples=64",
    "prune.bn_recal_batches=2",
    "profile.latency_repeats=2",
    "profile.latency_warmup=0",
    "profile.batch_sizes=[1]",
]


@pytest.mark.parametrize(
    ("setting", "jobs", "cores", "expected"),
    [(None, 1, 2, 2), (None, 2, 2, 1), (None, 4, 2, 1), (None, 2, 8, 4), (3, 2, 2, 3)],
)
def test_threads_divide_the_cores_among_concurrent_jobs(setting, jobs, cores, expected):
    assert intra_op_threads(setting, jobs, cores) == expected


def test_available_cores_is_the_affinity_mask():
    assert available_cores() == len(os.sched_getaffinity(0))


def _threads(run: Path) -> int:
    return int(json.loads((run / "profile" / "metrics.json").read_text())["threads"])


@pytest.mark.slow
def test_each_job_of_a_parallel_sweep_gets_its_share(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "run",
        "-m",
        *TINY,
        "seed=1,2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": ""},  # what a user's shell has: torch's own default
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert [_threads(sweep / str(i)) for i in (0, 1)] == [share, share]
    for i in (0, 1):
        assert f"torch threads: {share} (" in (sweep / str(i) / "m2mdc.log").read_text()


@pytest.mark.slow
def test_an_explicit_setting_wins(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("run", *TINY, "perf.threads=1", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _threads(run) == 1
    assert "torch threads: 1 (perf.threads)" in (run / "m2mdc.log").read_text()
