"""The run directory as a whole: one command at a time, and the record of what produced it.

* :func:`locked` takes an exclusive lock on a run directory for the length of a command, so a
  second command on the same directory stops at once with "in use by PID N" instead of running
  every stage beside the first. The lock and PID files are removed when the command ends.
* :func:`write_record` writes ``.hydra/config.yaml`` (the *config of record*: every setting a
  finished stage read, taken from that stage's own ``done.json``, plus the last command's other
  settings) and ``.hydra/overrides.yaml`` (the last successful command's overrides). Hydra's
  own writing of ``.hydra/`` is turned off (``hydra.output_subdir: null``): it happens before a
  command is checked, so a refused command would overwrite the record of the run it refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from m2mdc.errors import M2MError
from m2mdc.fileio import atomic_write_bytes

LOCK_FILE = ".m2mdc.lock"
PID_FILE = ".m2mdc.pid"


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` exclusively; M2MError naming the holder's PID when it is taken."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            pid = (run_dir / PID_FILE).read_text().strip() or "unknown"
        except OSError:
            pid = "unknown"
        raise M2MError(
            f"{run_dir} is in use by PID {pid} (another m2mdc command); wait for it to end, "
            "or use another hydra.run.dir"
        ) from None
    try:
        (run_dir / PID_FILE).write_text(f"{os.getpid()}\n")
        yield
    finally:
        (run_dir / PID_FILE).unlink(missing_ok=True)
        lock.release()
        (run_dir / LOCK_FILE).unlink(missing_ok=True)


def set_path(doc: dict[str, Any], key: str, value: Any) -> None:
    """``doc[a][b] = value`` for ``key="a.b"`` (intermediate dicts are created)."""
    *parents, leaf = key.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def get_path(doc: Mapping[str, Any], key: str, default: Any = None) -> Any:
    node: Any = doc
    for p in key.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return default
        node = node[p]
    return node


def write_record(run_dir: Path, config: Mapping[str, Any], overrides: Sequence[str]) -> None:
    """``.hydra/config.yaml`` (the config of record) and ``.hydra/overrides.yaml``."""
    record = run_dir / ".hydra"
    atomic_write_bytes(record / "config.yaml", OmegaConf.to_yaml(dict(config)).encode())
    atomic_write_bytes(record / "overrides.yaml", OmegaConf.to_yaml(list(overrides)).encode())
