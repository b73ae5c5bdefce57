"""A non-editable install ships the config tree (and py.typed) inside the wheel and composes
from it, through the command line's composition and the Python API."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_wheel_ships_conf_and_composes_outside_the_checkout(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("m2mdc-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"m2mdc/conf/{p.relative_to(ROOT / 'conf').as_posix()}"
        for p in (ROOT / "conf").rglob("*.yaml")
    }
    assert expected and expected <= names
    assert "m2mdc/py.typed" in names  # the annotations are for users' type checkers (PEP 561)
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import m2mdc, m2mdc.cli as c; from m2mdc import api, composition; "
        f"assert str(c.conf_dir()).startswith({str(target)!r}), c.conf_dir(); "
        "composition.compose_jobs(['model=mobilenet_v2', 'experiment=paper_resnet34']); "
        "assert api.compose(['model=mobilenet_v2']).model.name == 'mobilenet_v2'; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
