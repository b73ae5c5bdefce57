"""File modes follow the umask; the file helpers sit below the modules that use them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2mdc import cache
from m2mdc.fileio import atomic_write_bytes, atomic_write_json, torch_save_atomic


@pytest.fixture
def umask():
    """umask(value): set the process umask for the test; the old one is restored after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_artifacts_and_cache_entries_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    run = tmp_path / "run" / "teacher"
    atomic_write_json(run / "metrics.json", {"top1": 1.0})
    torch_save_atomic({"w": torch.zeros(2)}, run / "model.pt")
    atomic_write_bytes(run / "plan.bin", b"x")
    for name in ("metrics.json", "model.pt", "plan.bin"):
        assert _mode(run / name) == file_mode == 0o666 & ~mask, name
    cache_dir = tmp_path / "cache"
    cache.publish(cache_dir, "teacher", "k" * 64, run)
    entry = cache.entry_dir(cache_dir, "teacher", "k" * 64)
    assert _mode(entry) == dir_mode == 0o777 & ~mask
    assert all(_mode(f) == file_mode for f in entry.iterdir())


def test_a_cache_copy_is_a_new_file_under_the_fetching_umask(
    tmp_path, umask, monkeypatch: pytest.MonkeyPatch
):
    umask(0o077)  # the entry is computed by a private process...
    src = tmp_path / "src"
    atomic_write_json(src / "metrics.json", {"top1": 1.0})
    cache.publish(tmp_path / "cache", "score", "s" * 64, src)
    umask(0o022)  # ...and fetched, across file systems (no hard link), by a shared one

    def no_link(*_: object) -> None:
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    dst = tmp_path / "run" / "score"
    assert cache.fetch(tmp_path / "cache", "score", "s" * 64, dst)
    assert _mode(dst / "metrics.json") == 0o644
    assert (dst / "metrics.json").read_text() == (src / "metrics.json").read_text()


def test_manifest_and_file_helpers_sit_below_the_checkpoint_module():
    code = "import sys, m2mdc.manifest; print('m2mdc.artifacts' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
