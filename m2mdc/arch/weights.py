"""Pretrained weights: where torch hub keeps them, fetching them (with a clear offline error),
reading a local state_dict, and loading one strictly with one-line mismatch errors. Below the
adapters (which load weights into the models they build) and the model zoo."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m2mdc.errors import M2MError


def hub_checkpoint_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` reads/writes the file for ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def fetch_state_dict(name: str, weights: Any) -> Mapping[str, torch.Tensor]:
    """Download (or read from the hub cache) the state_dict of a torchvision weights enum.

    Raises:
        M2MError: the download or the cached file failed; the message names the URL, the exact
            local path to place the file at, and the ``model.weights=PATH`` alternative.
    """
    url = str(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        # URLError/HTTPError/socket errors are OSErrors; a bad hash or a truncated cached file
        # raises RuntimeError/EOFError. All are fixed the same way: provide the file.
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise M2MError(
            f"cannot get ImageNet weights for {name} from {url} ({reason}); download the file "
            f"to {hub_checkpoint_path(url)} or pass model.weights=PATH"
        ) from None


def _read_state_dict(path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    if not Path(path).is_file():
        raise M2MError(f"model.weights: file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure here means "not a plain-tensor state_dict file"
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise M2MError(f"model.weights: cannot load {path} as a state_dict ({reason})") from None
    # Accept the common {"state_dict": {...}} wrapper (also m2mdc's checkpoint format).
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise M2MError(f"model.weights: {path} is not a state_dict (name -> tensor mapping)")
    return obj


def load_state_dict_strict(
    model: nn.Module,
    state: Mapping[str, Any],
    source: str,
    name: str,
    alt_classes: int | None = None,
) -> None:
    """``model.load_state_dict(state, strict=True)`` with mismatches as one-line M2MErrors.

    Args:
        model: the target module.
        state: the state_dict.
        source: file or URL named in the error.
        name: model name named in the error.
        alt_classes: when the classifier shape mismatches, also mention that a head with this
            many classes would have been accepted.

    Raises:
        M2MError: naming ``source`` and the first missing key, shape mismatch or unexpected key.
    """
    own = model.state_dict()
    problem = None
    for key, tensor in own.items():
        if key not in state:
            problem = f"missing key '{key}'"
        elif not isinstance(state[key], torch.Tensor) or state[key].shape != tensor.shape:
            got = state[key]
            shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            problem = (
                f"'{key}' has shape {shape} in the file but {name} expects {list(tensor.shape)}"
            )
            if alt_classes is not None and tensor.ndim == 2 and tensor.shape[0] == 1000:
                problem += f" (or [{alt_classes}, {tensor.shape[1]}])"
        if problem:
            break
    if problem is None:
        extra = [k for k in state if k not in own]
        if extra:
            problem = f"unexpected key '{extra[0]}'"
    if problem is not None:
        raise M2MError(f"model.weights: {source} does not fit {name}: {problem}")
    model.load_state_dict(state, strict=True)
