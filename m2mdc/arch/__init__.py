"""Architecture adapters (ResNet-18/34, MobileNetV2), tensor surgery and model creation.

Example:
    >>> from m2mdc.arch import get_adapter
    >>> from m2mdc.arch.zoo import create_model
    >>> model = create_model("resnet18", num_classes=10)
    >>> adapter = get_adapter(model)  # or get_adapter("resnet18")
    >>> [b.name for b in adapter.blocks(model) if b.protected]
    ['layer2.0', 'layer3.0', 'layer4.0']
"""

from __future__ import annotations

from torch import nn

from m2mdc.arch.base import AdapterBase, ArchAdapter, BlockRef, KeepCfg, SlicePlan
from m2mdc.arch.mobilenet import MobileNetV2Adapter
from m2mdc.arch.resnet import ResNetAdapter
from m2mdc.registry import Registry

__all__ = [
    "ADAPTERS",
    "AdapterBase",
    "ArchAdapter",
    "BlockRef",
    "KeepCfg",
    "MobileNetV2Adapter",
    "ResNetAdapter",
    "SlicePlan",
    "create_model",
    "get_adapter",
]

ADAPTERS: Registry[ArchAdapter] = Registry("model")
"""Model name (``resnet18``, ``resnet34``, ``mobilenet_v2``) -> the adapter of its family."""

for _adapter in (ResNetAdapter(), MobileNetV2Adapter()):
    for _name in _adapter.model_names:
        ADAPTERS.add(_name, _adapter)


def get_adapter(name_or_model: str | nn.Module) -> ArchAdapter:
    """The adapter for a model name, or for a model carrying ``m2mdc_arch``.

    Raises:
        M2MError: unknown model name (the message lists the valid names).
        ValueError: a module without ``m2mdc_arch`` (it was not built by m2mdc).
    """
    if isinstance(name_or_model, nn.Module):
        arch = getattr(name_or_model, "m2mdc_arch", None)
        if not isinstance(arch, dict) or "name" not in arch:
            raise ValueError(
                f"{type(name_or_model).__name__} carries no m2mdc_arch; create it with "
                "m2mdc.arch.zoo.create_model"
            )
        return ADAPTERS.get(str(arch["name"]))
    return ADAPTERS.get(name_or_model)


from m2mdc.arch.zoo import create_model  # noqa: E402  (zoo imports get_adapter lazily)
