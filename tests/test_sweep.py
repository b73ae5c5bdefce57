"""Sweeps: the content-addressed cache trains each teacher once; launchers; racing jobs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from m2mdc import cache
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

SMALL = [
    "dataset.limit_train=160",
    "dataset.limit_test=80",
    "dataset.batch_size=32",
    "teacher.epochs=1",
    "kd.epochs=1",
    "slice=none",
    "score.probe_samples=96",
    "prune.bn_recal_batches=2",
    "profile.latency=false",
]


def _ok(proc):
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("summary.json"))]


def test_two_seed_two_ratio_sweep_trains_two_teachers(tmp_path):
    cache_dir = tmp_path / "cache"
    proc = _ok(
        run_cli(
            "run",
            "-m",
            *SMALL,
            "seed=1,2",
            "prune.ratio=0.2,0.4",
            f"cache_dir={cache_dir}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            cwd=tmp_path,
        )
    )
    runs = _summaries(tmp_path / "sweep")
    assert len(runs) == 4
    assert cache.count_entries(cache_dir, "teacher") == 2
    assert cache.count_entries(cache_dir, "score") == 2
    assert proc.stdout.count("[teacher] reused from cache") == 2
    # runs of the same seed share the teacher exactly
    by_seed: dict[int, set[float]] = {}
    for s in runs:
        by_seed.setdefault(s["seed"], set()).add(s["rows"][0]["top1"])
    assert all(len(v) == 1 for v in by_seed.values())
    # without the cache every job trains its own teacher (its own command is enough to show it)
    proc = _ok(
        run_cli(
            "finetune-teacher",
            "-m",
            *SMALL,
            "seed=1",
            "prune.ratio=0.2,0.4",
            "use_cache=false",
            f"cache_dir={tmp_path / 'cache2'}",
            f"hydra.sweep.dir={tmp_path / 'sweep2'}",
            cwd=tmp_path,
        )
    )
    assert proc.stdout.count("[teacher] running") == 2
    assert cache.count_entries(tmp_path / "cache2", "teacher") == 0


def test_racing_jobs_compute_a_cache_entry_once(tmp_path):
    exe = Path(sys.executable).parent / "m2mdc"
    procs = [
        subprocess.Popen(
            [
                str(exe),
                "finetune-teacher",
                *SMALL,
                f"cache_dir={tmp_path / 'c'}",
                f"hydra.run.dir={tmp_path / f'r{i}'}",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    text = "".join(o for o, _ in outs)
    assert text.count("[teacher] running") == 1
    assert text.count("[teacher] reused from cache") == 1
    assert cache.count_entries(tmp_path / "c", "teacher") == 1
    a, b = ((tmp_path / f"r{i}" / "teacher" / "model.pt").read_bytes() for i in range(2))
    assert a == b
    assert not list((tmp_path / "c" / "teacher").glob(".*")), "no temporary entries left"


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_hydra_launchers_run_a_sweep_sharing_the_cache(tmp_path, launcher):
    extra = (
        ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=20"]
    )
    _ok(
        run_cli(
            "run",
            "-m",
            f"hydra/launcher={launcher}",
            *extra,
            *SMALL,
            "seed=3",
            "prune.ratio=0.2,0.4",
            f"cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            cwd=tmp_path,
            timeout=1200,
        )
    )
    assert len(_summaries(tmp_path / "sweep")) == 2
    assert cache.count_entries(tmp_path / "cache", "teacher") == 1


def test_report_on_a_real_sweep(tmp_path):
    from m2mdc.cli import main

    sweep = tmp_path / "sweep"
    _ok(
        run_cli(
            "run",
            "-m",
            *SMALL,
            "seed=1,2",
            f"cache_dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={sweep}",
            cwd=tmp_path,
        )
    )
    assert main(["report", str(sweep)]) == 0
    md = (sweep / "report.md").read_text()
    assert "Mean ± Std" in md
    assert (sweep / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
