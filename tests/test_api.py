"""The Python API composes, refuses and runs exactly as the command line does."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from m2mdc import api, cli
from m2mdc.artifacts import load_checkpoint, safe_torch_load
from m2mdc.errors import M2MError, error_line
from m2mdc.fileio import sha256_file
from m2mdc.stage import Context
from tests.conftest import run_cli

# the quickstart experiment (the default), shrunk further than the end-to-end tests' TINY
TINY = [  # 3 training batches an epoch
    "dataset.limit_train=96",
    "dataset.limit_test=48",
    "dataset.batch_size=32",
    "teacher.epochs=1",
    "kd.epochs=1",
    "score.probe_samples=96",
    "prune.bn_recal_batches=2",
    "profile.latency_repeats=2",
    "profile.latency_warmup=1",
    "slice.repair_epochs=1",
]

# what a measurement of time leaves in a record: these may differ between two equal runs
_TIMED = re.compile(r"(^|_)(seconds|at)$|latency|speedup")


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> list[str]:
    """TINY, with one dataset cache for both runs and no stage cache (each run trains)."""
    return [*TINY, f"cache_dir={tmp_path_factory.mktemp('cache')}", "use_cache=false"]


@pytest.fixture(scope="module")
def api_run(tmp_path_factory, settings) -> api.RunResult:
    return api.run(settings, run_dir=tmp_path_factory.mktemp("api") / "run")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, settings) -> Path:
    cwd = tmp_path_factory.mktemp("cli")
    proc = run_cli("run", *settings, f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "run"


def _untimed(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _untimed(v) for k, v in doc.items() if not _TIMED.search(str(k))}
    if isinstance(doc, list):
        return [_untimed(v) for v in doc]
    return doc


def _files(run_dir: Path) -> set[str]:
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}


def _log_lines(path: Path) -> list[str]:
    """The log's messages without their timestamps and durations, nor the CLI's note of the
    thread count it runs with (the API leaves the caller's alone)."""
    lines = [ln.split("]", 1)[1] for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if "torch threads: " not in ln]
    return [re.sub(r"done in [\d.]+s", "done in Ns", ln) for ln in lines]


# -- composition ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        ["prune.ratio=1.0"],
        ["model=resnet19"],
        ["prune.ration=0.2"],
        ["teacher.epochs=abc"],
        ["prune.keep_cfg={layer2:[1]}"],
        ["prune.keep_cfg={layer2:[1]"],
    ],
)
def test_compose_refuses_bad_input_with_the_clis_line(bad, monkeypatch, tmp_path, capsys):
    import m2mdc.pipeline

    monkeypatch.setattr(m2mdc.pipeline, "hydra_main", lambda *a: pytest.fail("reached Hydra"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", *bad]) == 2
    cli_line = capsys.readouterr().err.strip()
    with pytest.raises(M2MError) as exc:
        api.compose(bad)
    assert error_line(exc.value) == cli_line
    with pytest.raises(M2MError) as exc:
        api.run(bad, run_dir=tmp_path / "new" / "run")
    assert error_line(exc.value) == cli_line
    assert list(tmp_path.iterdir()) == []


def test_compose_returns_the_clis_configuration(compose_cfg):
    cfg = api.compose(["model=mobilenet_v2", "prune.ratio=0.3"])
    assert not GlobalHydra.instance().is_initialized()
    assert cfg.model.name == "mobilenet_v2" and cfg.prune.ratio == 0.3
    assert cfg == compose_cfg("model=mobilenet_v2", "prune.ratio=0.3")


def test_compose_refuses_what_only_the_command_line_takes():
    with pytest.raises(M2MError, match=r"^seed=1,2 is a sweep; the Python API composes one job"):
        api.compose(["seed=1,2"])
    with pytest.raises(M2MError, match=r"^hydra.run.dir=x: Hydra's own settings .* run_dir="):
        api.compose(["hydra.run.dir=x"])


def test_compose_inside_a_hydra_app_leaves_its_state():
    from hydra import compose, initialize_config_dir

    from m2mdc.hydra_args import conf_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):  # the caller's
        assert api.compose(["seed=7"]).seed == 7
        assert GlobalHydra.instance().is_initialized()
        assert compose("config").seed == 42  # the caller's Hydra still composes


def test_commands_are_the_clis_hydra_commands(tmp_path):
    assert set(api.commands()) == set(cli.COMMANDS) - {"report"}
    assert api.commands()[0] == "run"
    with pytest.raises(M2MError, match=r"^unknown command 'prun' \(did you mean 'prune'\?\)"):
        api.run([], run_dir=tmp_path / "run", command="prun")
    with pytest.raises(M2MError, match=r"did you mean 'finetune-teacher'.*commands: finetune"):
        api.stage("teacher", [], run_dir=tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


# -- runs -------------------------------------------------------------------------------
@pytest.mark.slow
def test_api_and_cli_write_the_same_run_directory(api_run, cli_run):
    ours = api_run.run_dir
    assert _files(ours) == _files(cli_run)
    for rel in sorted(_files(ours)):
        a, b = ours / rel, cli_run / rel
        if rel == "manifest.json":  # the same files recorded; their hashes are checked below
            ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
            stages = [{k: r["stage"] for k, r in m.pop("artifacts").items()} for m in (ma, mb)]
            assert stages[0] == stages[1]
            assert _untimed(ma) == _untimed(mb)
        elif rel.endswith(".json"):
            assert _untimed(json.loads(a.read_text())) == _untimed(json.loads(b.read_text())), rel
        elif rel.endswith(".yaml"):
            assert a.read_text() == b.read_text(), rel
        elif rel.endswith(".log"):
            assert _log_lines(a) == _log_lines(b)
    for run_dir in (ours, cli_run):  # every record in each manifest is the file on disk
        manifest = json.loads((run_dir / "manifest.json").read_text())["artifacts"]
        assert manifest, run_dir
        for rel, rec in manifest.items():
            assert sha256_file(run_dir / rel) == rec["sha256"], rel


@pytest.mark.slow
def test_same_fingerprints_rows_and_weights(api_run, cli_run):
    ours = api_run.run_dir
    stages = sorted(p.parent.name for p in ours.glob("*/done.json"))
    assert stages == ["distill", "profile", "prune", "score", "slice", "teacher"]
    for st in stages:
        fp = json.loads((ours / st / "done.json").read_text())["fingerprint"]
        assert fp == json.loads((cli_run / st / "done.json").read_text())["fingerprint"], st
    summary = json.loads((cli_run / "summary.json").read_text())
    assert [r["model"] for r in api_run.rows] == ["teacher", "block_kd", "inner_slice"]
    assert _untimed(api_run.rows) == _untimed(summary["rows"])
    assert api_run.metrics == json.loads((ours / "summary.json").read_text())
    for st in ("teacher", "prune", "distill", "slice"):
        a, b = safe_torch_load(ours / st / "model.pt"), safe_torch_load(cli_run / st / "model.pt")
        assert a["arch"] == b["arch"] and list(a["state_dict"]) == list(b["state_dict"]), st
        for key, t in a["state_dict"].items():
            other = b["state_dict"][key]
            assert t.dtype == other.dtype and torch.equal(t, other), f"{st}: {key}"


@pytest.mark.slow
def test_load_model_reproduces_each_stages_recorded_top1(api_run, cli_run, settings):
    ctx = Context(api.compose(settings), api_run.run_dir)
    images = list(ctx.eval_batches())
    for st in ("teacher", "prune", "distill", "slice"):
        model = api.load_model(api_run.run_dir / st / "model.pt")
        assert isinstance(model, torch.nn.Module) and not model.training
        cli_model, _ = load_checkpoint(cli_run / st / "model.pt")
        with torch.no_grad():
            logits = [model(x) for x, _ in images]
            assert torch.equal(torch.cat(logits), torch.cat([cli_model(x) for x, _ in images]))
        correct = sum(
            int((lg.argmax(1) == y).sum()) for lg, (_, y) in zip(logits, images, strict=True)
        )
        top1 = 100.0 * correct / sum(len(y) for _, y in images)
        recorded = json.loads((api_run.run_dir / st / "metrics.json").read_text())["top1"]
        assert top1 == pytest.approx(recorded, abs=1e-9), st
    by_dir = api.load_model(api_run.run_dir / "slice")  # a stage directory stands for its model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in by_dir.state_dict().items())


@pytest.mark.slow
def test_a_second_run_in_the_same_process(api_run, settings, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(api_run.run_dir, run_dir)
    done = {p: p.read_bytes() for p in run_dir.glob("*/done.json")}
    logged = len(_log_lines(run_dir / "m2mdc.log"))
    log = logging.getLogger("m2mdc")
    state = (os.getcwd(), log.level, list(log.handlers), list(logging.getLogger().handlers))
    again = api.run(settings, run_dir=run_dir)
    assert (os.getcwd(), log.level, list(log.handlers), list(logging.getLogger().handlers)) == (
        state
    )
    assert not GlobalHydra.instance().is_initialized()
    assert {p: p.read_bytes() for p in run_dir.glob("*/done.json")} == done
    skipped = [ln for ln in _log_lines(run_dir / "m2mdc.log")[logged:] if "skipped" in ln]
    assert len(skipped) == len(done) == 6
    assert again.rows == api_run.rows and again.run_dir == run_dir


@pytest.mark.slow
def test_a_refused_run_writes_nothing(api_run, settings, tmp_path):
    new = tmp_path / "new" / "run"
    with pytest.raises(M2MError, match=r"^prune needs the outputs of `m2mdc score` in "):
        api.stage("prune", settings, run_dir=new)
    assert not (tmp_path / "new").exists()
    run_dir = api_run.run_dir
    snapshot = {
        p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()
    }
    changed = [s.replace("teacher.epochs=1", "teacher.epochs=2") for s in settings]
    with pytest.raises(M2MError, match=r"different configuration \(teacher.epochs: 1 -> 2\)"):
        api.run(changed, run_dir=run_dir)
    assert {
        p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()
    } == snapshot
