"""The adapter registry: model name -> the adapter of its family."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from m2mdc.arch.base import ArchAdapter
from m2mdc.arch.generic import SOURCES as GENERIC_SOURCES
from m2mdc.arch.generic import GenericAdapter
from m2mdc.arch.mobilenet import MobileNetV2Adapter
from m2mdc.arch.resnet import ResNetAdapter
from m2mdc.registry import Registry

ADAPTERS: Registry[ArchAdapter] = Registry("model")
"""Model name -> the adapter of its family; the one list of the models m2mdc builds (the
``model.name`` choices, checked by :func:`m2mdc.structure.check_model`)."""

GENERIC = GenericAdapter()
"""The adapter of every ``<source>:<name>`` model (torchvision, timm), read from its graph."""
SOURCES = ("m2mdc", *GENERIC_SOURCES)
"""``model.source`` choices: m2mdc's own adapters (the names of :data:`ADAPTERS`), then the
libraries the generic adapter builds from."""

for _adapter in (ResNetAdapter(), MobileNetV2Adapter()):
    for _name in _adapter.model_names:
        ADAPTERS.add(_name, _adapter)


def model_id(model_cfg: Mapping[str, Any]) -> str:
    """The model a ``model`` config section names: ``name`` for ``source=m2mdc`` (the
    default), else ``<source>:<name>`` (the generic adapter's names)."""
    source, name = str(model_cfg.get("source") or "m2mdc"), str(model_cfg["name"])
    return name if source == "m2mdc" else f"{source}:{name}"


def get_adapter(name_or_model: str | nn.Module) -> ArchAdapter:
    """The adapter for a model name, or for a model carrying ``m2mdc_arch``.

    Raises:
        M2MError: unknown model name (the message lists the valid names), or a generic model
            (``source:name``) without residual blocks.
        ValueError: a module without ``m2mdc_arch`` (it was not built by m2mdc).
    """
    if isinstance(name_or_model, nn.Module):
        arch = getattr(name_or_model, "m2mdc_arch", None)
        if not isinstance(arch, dict) or "name" not in arch:
            raise ValueError(
                f"{type(name_or_model).__name__} carries no m2mdc_arch; create it with "
                "m2mdc.arch.zoo.create_model"
            )
        if arch.get("family") == GENERIC.family:
            return GENERIC
        return ADAPTERS.get(str(arch["name"]))
    if ":" in name_or_model:
        GENERIC._check_name(name_or_model)
        return GENERIC
    return ADAPTERS.get(name_or_model)
