"""Low-level file helpers every m2mdc module writes through: atomic writes, JSON, hashes.

Files and directories are created with modes 0o666 / 0o777 and the kernel applies the process
umask (and any default ACL of the parent directory), as ``open()`` and ``mkdir`` do: under the
usual umask 022 lab-mates can read the results, under 077 they stay private. ``tempfile``'s
``mkstemp`` / ``mkdtemp`` are not used because they force 0o600 / 0o700 whatever the umask.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch

from m2mdc.errors import M2MError

# per-epoch resumable states, step snapshots and hidden temporaries are transient, not artifacts
TRANSIENT_PREFIXES = ("state", "step-", ".")
_ATTEMPTS = 100


def _fresh_name(parent: Path, prefix: str, suffix: str) -> Path:
    return parent / f"{prefix}{secrets.token_hex(6)}{suffix}"


def create_temp_file(parent: Path, prefix: str, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new file in ``parent`` (exclusive create, mode 0o666 minus the umask): (fd, path)."""
    for _ in range(_ATTEMPTS):
        path = _fresh_name(parent, prefix, suffix)
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {parent}")


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new directory in ``parent`` (mode 0o777 minus the umask)."""
    for _ in range(_ATTEMPTS):
        path = _fresh_name(parent, prefix, "")
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {parent}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same directory, fsync, then rename over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Pretty JSON (keys in insertion order: rows stay in pipeline order), written atomically."""
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    atomic_write_bytes(path, text.encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path) -> Any:
    """Read a JSON artifact; a missing or corrupt file is a user error naming the path."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise M2MError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise M2MError(f"corrupt JSON in {path}: {exc}") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def torch_save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` into memory, then an atomic write (a crash never leaves half a file)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
