"""Run artifacts: the safe checkpoint format.

A checkpoint ``model.pt`` holds only tensors and plain data and is always read with
``torch.load(..., weights_only=True)``::

    {"format": 1, "arch": {...}, "state_dict": {...}, "meta": {...}}

``arch`` lets the adapter rebuild the exact (pruned, sliced) module before
``load_state_dict(strict=True)``. A file holding pickled code is refused, never executed.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m2mdc.errors import M2MError
from m2mdc.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    sha256_file,
    torch_save_atomic,
)
from m2mdc.manifest import verify

__all__ = [  # the file helpers live in m2mdc.fileio and are re-exported for checkpoint users
    "CHECKPOINT_FORMAT",
    "atomic_write_bytes",
    "atomic_write_json",
    "load_checkpoint",
    "load_state_dict_checked",
    "read_json",
    "safe_torch_load",
    "save_checkpoint",
    "save_trained",
    "sha256_file",
    "torch_save_atomic",
]

CHECKPOINT_FORMAT = 1


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors for every way a file can be bad."""
    path = Path(path)
    if not path.is_file():
        raise M2MError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise M2MError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint (weights_only load "
            f"failed: {first[:160]}); m2mdc never unpickles code"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise M2MError(
            f"cannot read checkpoint {path}: truncated or corrupt ({first[:160]})"
        ) from None


def save_checkpoint(
    path: str | Path, model: nn.Module, meta: Mapping[str, Any] | None = None
) -> None:
    """Save ``model`` (which carries ``m2mdc_arch``) in the checkpoint contract format."""
    arch = getattr(model, "m2mdc_arch", None)
    if arch is None:
        raise ValueError("model has no m2mdc_arch; build it through an m2mdc adapter")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch_save_atomic(
        {"format": CHECKPOINT_FORMAT, "arch": arch, "state_dict": state, "meta": dict(meta or {})},
        path,
    )


def save_trained(
    out: Path, model: nn.Module, metrics: Mapping[str, Any], meta: Mapping[str, Any]
) -> None:
    """A training stage's outputs: ``model.pt`` (checkpoint contract), then ``metrics.json``,
    then the resumable ``state.pt`` is dropped (only once both are safely on disk)."""
    save_checkpoint(out / "model.pt", model, meta)
    atomic_write_json(out / "metrics.json", metrics)
    (out / "state.pt").unlink(missing_ok=True)


def load_checkpoint(
    path: str | Path,
    *,
    expect_model: str | None = None,
    expect_classes: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the module described by an m2mdc checkpoint and load its weights strictly.

    Args:
        path: ``model.pt`` in the checkpoint format.
        expect_model: when given, the checkpoint's model name must match.
        expect_classes: when given, the checkpoint's class count must match.

    Returns:
        (model in eval mode on CPU, meta dict).
    """
    from m2mdc.arch import get_adapter

    if Path(path).is_file():  # the recorded hash first: a changed file is never parsed
        verify(Path(path))
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT or "arch" not in obj:
        raise M2MError(
            f"{path} is not an m2mdc checkpoint "
            f"(format {CHECKPOINT_FORMAT} with arch and state_dict)"
        )
    arch = obj["arch"]
    name = arch.get("name")
    if expect_model is not None and name != expect_model:
        raise M2MError(f"{path} holds a {name} but model={expect_model} was requested")
    if expect_classes is not None and arch.get("num_classes") != expect_classes:
        raise M2MError(
            f"{path} has {arch.get('num_classes')} classes but the dataset has {expect_classes}"
        )
    model = get_adapter(name).build(arch)
    if arch.get("resized_by"):  # channel-pruned by another tool: widths from the tensors
        from m2mdc.arch.surgery import resize_to_state

        resize_to_state(model, obj["state_dict"])
    load_state_dict_checked(model, obj["state_dict"], path)
    model.eval()
    return model, dict(obj.get("meta") or {})


def load_state_dict_checked(model: nn.Module, state: Mapping[str, Any], path: str | Path) -> None:
    """``load_state_dict(strict=True)`` turning key/shape mismatches into one clear line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise M2MError(
            f"{path} does not match the model ({len(missing)} missing, {len(extra)} unexpected "
            f"keys; first: {what})"
        )
    for k, v in own.items():
        other = state[k]
        if not isinstance(other, torch.Tensor) or other.shape != v.shape:
            shape = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            raise M2MError(
                f"{path} does not match the model: {k} has shape {shape}, expected {tuple(v.shape)}"
            )
    model.load_state_dict(state, strict=True)
