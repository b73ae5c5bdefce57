"""Progress without a terminal: a log line every ``ui.progress_every_s`` seconds during long
loops, with done/total, the rate and the remaining time."""

from __future__ import annotations

import logging
import re

import pytest

from m2mdc.ui import HeadlessProgress, progress
from tests.conftest import run_cli


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_per_interval_with_rate_and_eta(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="m2mdc")
    with HeadlessProgress(30.0, clock=clock) as bar:
        outer = bar.add_task("teacher", total=15, completed=2, unit="epoch")
        task = bar.add_task("  epoch 3/15", total=352, unit="img", per_step=128)
        for step in range(1, 353):
            clock.now += 0.5  # 2 steps/s = 256 img/s
            bar.update(task, completed=step, info=f"loss {1 / step:.3f}")
    lines = [r.getMessage() for r in caplog.records]
    # 352 steps x 0.5 s = 176 s: a line at every 30 s boundary crossed (60 steps each)
    assert len(lines) == 176 // 30
    first = lines[0]
    assert first.startswith("teacher 2/15 | epoch 3/15 60/352")
    assert "256.0 img/s" in first
    # 292 steps left at 2 steps/s
    assert "ETA 0:02:26" in first and "loss 0.017" in first
    assert bar.tasks == {} and outer == 1


def test_quiet_before_the_first_interval(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger="m2mdc")
    with HeadlessProgress(30.0, clock=clock) as bar:
        task = bar.add_task("score probe", total=1000, unit="img")
        clock.now += 29.9
        bar.update(task, completed=999)
    assert caplog.records == []


def test_progress_is_headless_without_a_terminal():
    # pytest captures stdout: not a terminal
    assert isinstance(progress(), HeadlessProgress)


@pytest.mark.slow
def test_cli_prints_progress_lines_when_piped(tmp_path):
    proc = run_cli(
        "run",
        "dataset.limit_train=320",
        "dataset.limit_test=160",
        "dataset.batch_size=32",
        "teacher.epochs=1",
        "kd.epochs=0",
        "slice=none",
        "score.probe_samples=128",
        "profile.latency=false",
        "ui.progress_every_s=0.01",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    train = [ln for ln in out.splitlines() if re.search(r"epoch 1/1 \d+/10, [\d.,]+ img/s", ln)]
    assert train and all("ETA" in ln for ln in train)
    assert re.search(r"score probe \d+/128", out)
    log_file = (tmp_path / "run" / "m2mdc.log").read_text()
    assert any(ln in log_file for ln in train)  # and in the run's log
