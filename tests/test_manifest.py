"""Hash checks: refuse a changed file, say loudly when a run's file cannot be checked."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from m2mdc.errors import M2MError
from m2mdc.manifest import record_stage, verify


def _run_dir(root: Path) -> Path:
    """A run directory with one finished stage holding ``model.pt``."""
    stage = root / "run" / "teacher"
    stage.mkdir(parents=True)
    (stage / "model.pt").write_bytes(b"weights")
    (stage / "done.json").write_text("{}")
    return root / "run"


def _unverified(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "m2mdc" and r.levelno == logging.WARNING and "UNVERIFIED" in r.getMessage()
    ]


def test_a_run_without_manifest_is_unverified_once(tmp_path, caplog):
    model = _run_dir(tmp_path) / "teacher" / "model.pt"
    with caplog.at_level(logging.WARNING, logger="m2mdc"):
        verify(model)
        verify(model)
    [msg] = _unverified(caplog)
    assert str(model.resolve()) in msg and "no manifest.json" in msg


def test_a_file_the_manifest_does_not_record_is_unverified(tmp_path, caplog):
    run = _run_dir(tmp_path)
    record_stage(run, "teacher", OmegaConf.create({}))
    extra = run / "teacher" / "extra.pt"
    extra.write_bytes(b"added later")
    with caplog.at_level(logging.WARNING, logger="m2mdc"):
        verify(run / "teacher" / "model.pt")  # recorded: checked quietly
        verify(extra)
    [msg] = _unverified(caplog)
    assert "teacher/extra.pt is not recorded in" in msg and str(run / "manifest.json") in msg


def test_a_changed_recorded_file_is_refused(tmp_path, caplog):
    run = _run_dir(tmp_path)
    record_stage(run, "teacher", OmegaConf.create({}))
    (run / "teacher" / "model.pt").write_bytes(b"tampered")
    with pytest.raises(M2MError, match="changed after it was written"):
        verify(run / "teacher" / "model.pt")


def test_files_outside_runs_and_resume_states_stay_quiet(tmp_path, caplog):
    own = tmp_path / "mine" / "ckpt" / "model.pt"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"a user's checkpoint")
    step = _run_dir(tmp_path) / "teacher" / "step-1.pt"
    step.write_bytes(b"resume state")
    with caplog.at_level(logging.WARNING, logger="m2mdc"):
        verify(own)
        verify(step)
    assert _unverified(caplog) == []


def test_a_manifest_without_an_artifacts_table_is_refused(tmp_path):
    run = _run_dir(tmp_path)
    (run / "manifest.json").write_text('{"config_hash": "x"}')
    with pytest.raises(M2MError, match="no artifacts table"):
        verify(run / "teacher" / "model.pt")
