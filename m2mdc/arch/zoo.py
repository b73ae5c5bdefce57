"""Model creation with ImageNet or local weights, and one-line errors when weights are missing.

Example:
    >>> model = create_model("resnet18", num_classes=10)  # fresh weights
    >>> model = create_model("resnet18", 10, weights_path="resnet18-f37072fd.pth")  # offline
    >>> model.m2mdc_arch["name"]
    'resnet18'
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m2mdc.arch.adapters import get_adapter
from m2mdc.errors import M2MError

__all__ = [
    "create_model",
    "create_model_and_head",
    "fetch_state_dict",
    "hub_checkpoint_path",
    "load_state_dict_strict",
]


def create_model(
    name: str, num_classes: int, pretrained: bool = False, weights_path: str | None = None
) -> nn.Module:
    """Torchvision model ``name`` with a ``num_classes`` classifier and ``model.m2mdc_arch`` set.

    Args:
        name: ``resnet18``, ``resnet34`` or ``mobilenet_v2``.
        num_classes: classes of the task head.
        pretrained: start from torchvision's ``IMAGENET1K_V1`` weights (downloaded to, or read
            from, the torch hub cache).
        weights_path: a local torchvision state_dict (ImageNet 1000-class head, or already a
            ``num_classes`` head); takes precedence over ``pretrained`` so that offline machines
            can pass the file they have.

    Returns:
        The model; an ImageNet head is replaced by a fresh ``num_classes`` Linear, a matching
        head is kept.

    Raises:
        M2MError: unknown model, download failure (naming the URL and the cache path to place the
            file at), unreadable weights file, or a file that does not fit the model (naming the
            first mismatching key/shape).
    """
    return create_model_and_head(name, num_classes, pretrained, weights_path)[0]


def create_model_and_head(
    name: str, num_classes: int, pretrained: bool = False, weights_path: str | None = None
) -> tuple[nn.Module, int | None]:
    """:func:`create_model`, and the class count of the weights' head when a fresh, untrained
    classifier replaced it (None: fresh weights, or the weights' head already fits)."""
    adapter = get_adapter(name)
    if weights_path is not None:
        state = _read_state_dict(weights_path)
        model = adapter.create(name, num_classes, state, source=str(weights_path))
    elif pretrained:
        enum = adapter.imagenet_weights(name)
        state = fetch_state_dict(name, enum)
        model = adapter.create(name, num_classes, state, source=str(enum.url))
    else:
        return adapter.create(name, num_classes), None
    head = adapter.classifier(model)
    key = next(n for n, m in model.named_modules() if m is head)
    classes = int(state[f"{key}.weight"].shape[0])  # create() checked every tensor's shape
    return model, None if classes == num_classes else classes


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


def trainable_prefixes(model: nn.Module, unfreeze: str) -> tuple[str, ...]:
    """Parameter-name prefixes left trainable; ``()`` means everything."""
    if unfreeze == "all":
        return ()
    family = model.m2mdc_arch["family"]  # type: ignore[index]
    if family == "resnet":
        return ("layer3.", "layer4.", "fc.")
    n = len(model.features)  # type: ignore[arg-type]
    first = n - round(n / 3)
    return (*(f"features.{i}." for i in range(first, n)), "classifier.")


def apply_unfreeze(model: nn.Module, unfreeze: str) -> int:
    """Freeze everything outside the trainable prefixes; returns the trainable parameter count."""
    prefixes = trainable_prefixes(model, unfreeze)
    for name, p in model.named_parameters():
        p.requires_grad_(not prefixes or name.startswith(prefixes))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
