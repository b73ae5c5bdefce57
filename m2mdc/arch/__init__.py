"""Architecture adapters (ResNet-18/34, the CIFAR ResNets, MobileNetV2, and the generic adapter
of any residual torchvision / timm CNN), tensor surgery and model creation.

Example:
    >>> from m2mdc.arch import get_adapter
    >>> from m2mdc.arch.zoo import create_model
    >>> model = create_model("resnet18", num_classes=10)
    >>> adapter = get_adapter(model)  # or get_adapter("resnet18")
    >>> [b.name for b in adapter.blocks(model) if b.protected]
    ['layer2.0', 'layer3.0', 'layer4.0']
"""

from __future__ import annotations

from m2mdc.arch.adapters import ADAPTERS, SOURCES, get_adapter, model_id
from m2mdc.arch.base import AdapterBase, ArchAdapter, BlockRef, KeepCfg, SlicePlan
from m2mdc.arch.generic import GenericAdapter
from m2mdc.arch.mobilenet import MobileNetV2Adapter
from m2mdc.arch.resnet import ResNetAdapter
from m2mdc.arch.zoo import create_model

__all__ = [
    "ADAPTERS",
    "SOURCES",
    "AdapterBase",
    "ArchAdapter",
    "BlockRef",
    "GenericAdapter",
    "KeepCfg",
    "MobileNetV2Adapter",
    "ResNetAdapter",
    "SlicePlan",
    "create_model",
    "get_adapter",
    "model_id",
]
