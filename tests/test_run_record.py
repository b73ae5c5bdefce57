"""The record of a run directory is never silently wrong: a refused command changes no byte of
it, two commands never share it, a run made stage by stage ends with a complete summary, and
the config of record is what produced the results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from m2mdc import api, rundir
from m2mdc.cli import main
from m2mdc.pipeline import objective
from tests.conftest import run_cli
from tests.test_e2e import TINY, _ok

pytestmark = pytest.mark.slow


def _snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``run_dir``: its bytes and mode (directories by their mode)."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir).as_posix()
        out[rel] = (b"<dir>" if p.is_dir() else p.read_bytes(), p.stat().st_mode)
    return out


@pytest.fixture(scope="module")
def ratio_run(tmp_path_factory, stage_cache) -> Path:
    """A finished quick run made with prune.ratio=0.5 (teacher and scores from the cache)."""
    cwd = tmp_path_factory.mktemp("record")
    run = cwd / "run"
    args = [*TINY, "prune.ratio=0.5", f"cache_dir={stage_cache}", f"hydra.run.dir={run}"]
    _ok(run_cli("run", *args, cwd=cwd))
    return run


def test_a_refused_run_changes_no_byte_of_the_run_it_refused(ratio_run):
    before = _snapshot(ratio_run)
    proc = run_cli(
        "run", *TINY, "prune.ratio=0.25", f"hydra.run.dir={ratio_run}", cwd=ratio_run.parent
    )
    assert proc.returncode == 2
    assert "prune.ratio: 0.5 -> 0.25" in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(ratio_run) == before


def test_a_later_command_does_not_rewrite_the_config_of_record(ratio_run):
    """`m2mdc profile` composes prune.ratio=0.4 (the default); the run's results were made with
    0.5, and every record of the run keeps saying so."""
    args = [*TINY, "profile.latency=false", f"hydra.run.dir={ratio_run}"]
    _ok(run_cli("profile", *args, cwd=ratio_run.parent))
    record = yaml.safe_load((ratio_run / ".hydra" / "config.yaml").read_text())
    summary = json.loads((ratio_run / "summary.json").read_text())
    assert record["prune"]["ratio"] == 0.5
    assert summary["config"]["prune"]["ratio"] == 0.5 and summary["prune_ratio"] == 0.5
    assert summary["config"]["profile"]["latency"] is False  # not a setting of any result
    overrides = yaml.safe_load((ratio_run / ".hydra" / "overrides.yaml").read_text())
    assert overrides[-2:] == ["profile.latency=false", "command=profile"]  # the last command


def test_a_second_command_on_a_run_dir_in_use_is_refused(ratio_run):
    before = _snapshot(ratio_run)
    with rundir.locked(ratio_run):
        held = _snapshot(ratio_run)
        args = [*TINY, "prune.ratio=0.5", f"hydra.run.dir={ratio_run}"]
        proc = run_cli("run", *args, cwd=ratio_run.parent)
        assert _snapshot(ratio_run) == held
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line == (
        f"m2mdc: error: {ratio_run} is in use by PID {os.getpid()} (another m2mdc command); "
        "wait for it to end, or use another hydra.run.dir"
    )
    assert _snapshot(ratio_run) == before  # the lock and PID files are gone again


def test_stage_by_stage_keeps_the_summary_complete(tmp_path, stage_cache):
    """Each command in process (the API runs what `m2mdc <command>` runs, without a start-up
    per command); teacher and scores from the session's cache."""
    run = tmp_path / "run"
    args = [*TINY, f"cache_dir={stage_cache}"]
    for command in ("finetune-teacher", "score", "prune", "distill", "slice"):
        api.stage(command, args, run_dir=run)
    summary = json.loads((run / "summary.json").read_text())
    assert [r["model"] for r in summary["rows"]] == ["teacher", "block_kd", "inner_slice"]
    assert summary["profiled"] is False and summary["rows"][1]["latency_ms"] is None
    # the counted columns equal what the profile measures later
    counted = {r["model"]: (r["params"], r["macs"]) for r in summary["rows"]}

    api.stage("compare", [*args, "compare=teacher_same_epochs"], run_dir=run)
    summary = json.loads((run / "summary.json").read_text())
    assert [r["model"] for r in summary["rows"]][-1] == "teacher_same_epochs"
    same = json.loads((run / "teacher_same_epochs" / "metrics.json").read_text())
    assert summary["rows"][-1]["top1"] == same["top1"]

    api.stage("profile", args, run_dir=run)
    summary = json.loads((run / "summary.json").read_text())
    profile = json.loads((run / "profile" / "metrics.json").read_text())["models"]
    assert summary["profiled"] is True
    for r in summary["rows"]:
        assert r["latency_ms"] == profile[r["model"]]["latency_ms"]
        if r["model"] in counted:
            assert (r["params"], r["macs"]) == counted[r["model"]]

    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert "Teacher (same epochs)" in (out / "report.md").read_text()


def test_the_sweeper_objective_is_the_final_students_top1():
    summary = {
        "rows": [
            {"model": "teacher", "top1": 90.0, "macs": 100},
            {"model": "block_kd", "top1": 91.0, "macs": 70},
            {"model": "inner_slice", "top1": 89.5, "macs": 30},
            {"model": "peer_torch_pruning", "top1": 95.0, "macs": 30},
        ]
    }
    assert objective(summary, {"direction": "maximize"}) == 89.5
    assert objective(summary, {"direction": ["maximize", "minimize"]}) == [89.5, 30]
    assert objective({"top1": 77.0}, None) == 77.0  # a single stage's metrics
    no_slice = {"rows": summary["rows"][:2]}
    assert objective(no_slice, None) == 91.0


def test_an_optuna_sweep_optimises_the_final_students_top1(tmp_path, stage_cache):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "run",
        "-m",
        *TINY,
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.direction=maximize",
        "hydra.sweeper.sampler.seed=1",
        "prune.ratio=choice(0.25,0.5)",
        f"hydra.sweep.dir={sweep}",
        f"cache_dir={stage_cache}",
        cwd=tmp_path,
    )
    _ok(proc)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    finals = [json.loads(p.read_text())["rows"][-1] for p in sorted(sweep.glob("*/summary.json"))]
    assert len(finals) == 2 and all(r["model"] == "inner_slice" for r in finals)
    assert best == max(r["top1"] for r in finals)
