"""Content-addressed cache of stage outputs shared by the jobs of a sweep.

Stages whose outputs depend on less than the whole configuration (the teacher: model, dataset,
teacher settings, seed; the block scores: those plus ``score``) are stored once under
``cache_dir/<stage>/<key>/``, where ``key`` hashes exactly that configuration, the stage's
upstream keys and its code version. A 3-seed x 4-ratio sweep trains 3 teachers, not 12.

Concurrent jobs racing for one entry take a file lock: the first computes it, the others wait
and then reuse it. An entry is published by renaming a finished temporary directory, so an
interrupted computation never leaves a half entry. Entries are created under the umask of the
process that computes them (hard links share their mode), so a shared ``cache_dir`` is readable
by lab-mates under the usual umask 022.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from m2mdc.fileio import TRANSIENT_PREFIXES, make_temp_dir


def entry_dir(cache_dir: str | Path, stage: str, key: str) -> Path:
    return Path(cache_dir) / stage / key[:32]


def _copy_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.startswith(TRANSIENT_PREFIXES):
            target = dst / f.name
            target.unlink(missing_ok=True)
            try:  # hard links cost no space; fall back to a copy across file systems
                os.link(f, target)
            except OSError:  # a new file: its mode follows this process's umask
                shutil.copyfile(f, target)


def fetch(cache_dir: str | Path, stage: str, key: str, dst: Path) -> bool:
    """Copy a published entry into ``dst``; False when there is none."""
    entry = entry_dir(cache_dir, stage, key)
    if not (entry / "COMPLETE").is_file():
        return False
    _copy_tree(entry, dst)
    (dst / "COMPLETE").unlink(missing_ok=True)
    return True


def publish(cache_dir: str | Path, stage: str, key: str, src: Path) -> None:
    """Publish the outputs in ``src`` as the entry for ``key`` (atomic rename)."""
    entry = entry_dir(cache_dir, stage, key)
    if (entry / "COMPLETE").is_file():
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(entry.parent, f".{entry.name}.")
    try:
        _copy_tree(src, tmp)
        (tmp / "COMPLETE").write_text(key + "\n")
        if entry.exists():  # a stale incomplete entry from an older layout
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def locked(cache_dir: str | Path, stage: str, key: str) -> Iterator[None]:
    """Hold the entry's lock (released by the OS if the holder dies)."""
    lock_dir = Path(cache_dir) / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f"{stage}-{key[:32]}.lock")):
        yield


def count_entries(cache_dir: str | Path, stage: str) -> int:
    d = Path(cache_dir) / stage
    return sum((e / "COMPLETE").is_file() for e in d.iterdir()) if d.is_dir() else 0
