"""Model creation with ImageNet or local weights, and one-line errors when weights are missing.

Example:
    >>> model = create_model("resnet18", num_classes=10)  # fresh weights
    >>> model = create_model("resnet18", 10, weights_path="resnet18-f37072fd.pth")  # offline
    >>> model.m2mdc_arch["name"]
    'resnet18'
"""

from __future__ import annotations

from torch import nn

from m2mdc.arch.adapters import get_adapter
from m2mdc.arch.weights import (
    _read_state_dict,
    fetch_state_dict,
    hub_checkpoint_path,
    load_state_dict_strict,
)

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
    """Model ``name`` with a ``num_classes`` classifier and ``model.m2mdc_arch`` set.

    Args:
        name: a model of :data:`m2mdc.arch.adapters.ADAPTERS` (``resnet18``, ``resnet56``,
            ``mobilenet_v2``, ...).
        num_classes: classes of the task head.
        pretrained: start from torchvision's ``IMAGENET1K_V1`` weights (downloaded to, or read
            from, the torch hub cache); the CIFAR ResNets have none.
        weights_path: a local torchvision state_dict (ImageNet 1000-class head, or already a
            ``num_classes`` head); takes precedence over ``pretrained`` so that offline machines
            can pass the file they have.

    Returns:
        The model; an ImageNet head is replaced by a fresh ``num_classes`` Linear, a matching
        head is kept.

    Raises:
        M2MError: unknown model, ``pretrained`` for a model without ImageNet weights, download
            failure (naming the URL and the cache path to place the file at), unreadable weights
            file, or a file that does not fit the model (naming the first mismatching key/shape).
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


def trainable_prefixes(model: nn.Module, unfreeze: str) -> tuple[str, ...]:
    """Parameter-name prefixes left trainable; ``()`` means everything."""
    if unfreeze == "all":
        return ()
    family = model.m2mdc_arch["family"]  # type: ignore[index]
    if family == "generic":  # the parameters from the first of the last third of the blocks on
        blocks = [b.name for b in get_adapter(model).blocks(model)]
        head = blocks[len(blocks) - round(len(blocks) / 3)]
        names = [n for n, _ in model.named_parameters()]
        start = next(i for i, n in enumerate(names) if n.startswith(head + "."))
        return tuple(names[start:])
    if family == "resnet":  # ResNet-18/34: layer3, layer4; the CIFAR ResNets (3 stages): layer3
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
