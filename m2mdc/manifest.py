"""Provenance and integrity: ``<run>/manifest.json``.

After every stage the manifest records each artifact of that stage with its sha256 and size,
plus the run's config hash, the package versions and the m2mdc git commit (when installed from
a checkout). Loading a model from a run verifies its hash first and refuses a file that changed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from m2mdc import __version__
from m2mdc.errors import M2MError
from m2mdc.fileio import TRANSIENT_PREFIXES, atomic_write_json, read_json, sha256_file
from m2mdc.ui import log

MANIFEST = "manifest.json"
DONE = "done.json"
_PACKAGES = ("torch", "torchvision", "hydra-core", "omegaconf", "numpy", "scikit-learn", "fvcore")
_warned: set[Path] = set()  # files already reported unverified by this process


def config_hash(cfg: DictConfig) -> str:
    plain = OmegaConf.to_container(cfg, resolve=True)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def git_commit() -> str | None:
    """The commit of the m2mdc checkout this package runs from (``+dirty`` if modified)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "m2mdc"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"m2mdc": __version__}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def record_stage(run_dir: Path, stage: str, cfg: DictConfig) -> None:
    """Add (or replace) the artifacts of ``stage`` in the run's manifest."""
    path = run_dir / MANIFEST
    with FileLock(str(path) + ".lock"):
        doc: dict[str, Any] = read_json(path) if path.is_file() else {"artifacts": {}}
        arts = {k: v for k, v in doc.get("artifacts", {}).items() if v.get("stage") != stage}
        stage_dir = run_dir / stage
        files = sorted(stage_dir.rglob("*")) if stage_dir.is_dir() else []
        files += [run_dir / "summary.json"] if stage == "summary" else []
        for f in files:
            if not f.is_file() or f.name.startswith(TRANSIENT_PREFIXES):
                continue
            rel = f.relative_to(run_dir).as_posix()
            arts[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size, "stage": stage}
        doc.update(
            {
                "config_hash": config_hash(cfg),
                "packages": _versions(),
                "git_commit": git_commit(),
                "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "artifacts": arts,
            }
        )
        atomic_write_json(path, doc)


def verify(path: Path) -> None:
    """Refuse ``path`` if its run's manifest records a different hash.

    A file of a run directory that cannot be checked (no ``manifest.json``, or no entry for it)
    is used, with a WARNING saying so (once per file and process). A file outside any run
    directory, e.g. a checkpoint of the user's own, and a transient resume state (never
    recorded), are used quietly.
    """
    path = Path(path).resolve()
    run_dir = _run_dir_of(path)
    if run_dir is None or path.name.startswith(TRANSIENT_PREFIXES):
        return
    manifest = run_dir / MANIFEST
    rel = path.relative_to(run_dir).as_posix()
    if not manifest.is_file():
        _warn_unverified(path, f"{run_dir} has no {MANIFEST}")
        return
    doc = read_json(manifest)
    if not isinstance(doc, dict) or not isinstance(doc.get("artifacts"), dict):
        raise M2MError(f"{manifest} has no artifacts table; refusing to use {path} unchecked")
    entry = doc["artifacts"].get(rel)
    if entry is None:
        _warn_unverified(path, f"{rel} is not recorded in {manifest}")
        return
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise M2MError(f"{manifest}: the entry for {rel} has no sha256; refusing to use {path}")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise M2MError(
            f"{path} changed after it was written (sha256 {actual[:12]}... != "
            f"{entry['sha256'][:12]}... in {manifest}); refusing to use it"
        )


def is_run_dir(d: Path) -> bool:
    """A run directory holds a manifest or a stage subdirectory with ``done.json``."""
    return (d / MANIFEST).is_file() or any(d.glob(f"*/{DONE}"))


def _run_dir_of(path: Path) -> Path | None:
    """The run directory ``path`` belongs to: its stage's parent (``<run>/<stage>/file``) or
    its own directory (``<run>/summary.json``); None outside run directories."""
    for d in (path.parent.parent, path.parent):
        if is_run_dir(d):
            return d
    return None


def _warn_unverified(path: Path, why: str) -> None:
    if path in _warned:
        return
    _warned.add(path)
    log.warning(f"{path} is UNVERIFIED: {why}, so its sha256 cannot be checked; using it as is")
