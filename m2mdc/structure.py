"""Settings that name the model or parts of it, checked against the model's structure up front.

``model.name`` must be a model of the adapter registry (:data:`m2mdc.arch.adapters.ADAPTERS`)
or, with ``model.source=torchvision|timm``, a residual model of that library, and
``model.pretrained=true`` needs a model with ImageNet weights (:func:`check_model`).
``prune.keep_cfg`` names stages and block indices, ``slice.planes_keep`` / ``slice.mid_keep``
may map stages to fractions. Before any stage runs (and before Hydra creates a run
directory), :func:`check_model_parts` checks them against the structure of ``model.name``,
with the architecture adapter's own rules (``ArchAdapter.keep`` for the keep configuration,
``plane_stages`` / ``mid_producers`` for slicing). The structure is an unpruned model built
on PyTorch's meta device: no weights, no data, no training; one per model name and process.

The schema's own checks (:func:`m2mdc.config.validate`) need no torch; the registry of models
does, so :func:`validate_all` imports it after them: every command that validates a
configuration goes on to build a model anyway.

Example:
    >>> check_model_parts(compose("config", overrides=["prune.keep_cfg={layer2:[1]}"]))
    Traceback (most recent call last):
    m2mdc.errors.M2MError: prune.keep_cfg: layer2.0 is a protected transition block and ...
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from m2mdc.errors import M2MError

if TYPE_CHECKING:
    from torch import nn

    from m2mdc.arch import ArchAdapter

PLACEHOLDER_CLASSES = 10
"""Class count of the reference model: the blocks and stages do not depend on it."""

SLICE_KEEPS = ("planes_keep", "mid_keep")


def _keep_cfg(cfg: Any) -> Any:
    prune = cfg.get("prune")
    return prune.get("keep_cfg") if prune is not None else None


def _stage_mappings(cfg: Any) -> dict[str, Mapping[Any, Any]]:
    sc = cfg.get("slice")
    if sc is None:
        return {}
    return {k: sc.get(k) for k in SLICE_KEEPS if isinstance(sc.get(k), Mapping)}


@functools.cache
def reference_model(name: str) -> nn.Module:
    """The unpruned ``name`` on the meta device (shapes only), built by its adapter."""
    import torch

    from m2mdc.arch import get_adapter

    with torch.device("meta"):
        return get_adapter(name).create(name, PLACEHOLDER_CLASSES)


def check_model(cfg: Any) -> None:
    """Refuse a ``model.name`` that no adapter builds (M2MError listing the registry's models),
    and ``model.pretrained=true`` without ``model.weights`` on a model that has no ImageNet
    weights (the adapter's own one-line refusal)."""
    from m2mdc.arch import ADAPTERS, SOURCES, get_adapter, model_id

    source, name = cfg.model.get("source") or "m2mdc", cfg.model.name
    if source not in SOURCES:
        raise M2MError(f"model.source={source!r} is not valid; choose one of: {', '.join(SOURCES)}")
    if source == "m2mdc" and name not in ADAPTERS:
        raise M2MError(
            f"model.name={name!r} is not valid; choose one of: {', '.join(ADAPTERS.names())} "
            "(or model=auto model.source=torchvision|timm for any residual CNN of those)"
        )
    adapter = get_adapter(model_id(cfg.model))  # generic: the library's name and the structure
    if cfg.model.get("pretrained") and not cfg.model.get("weights"):
        adapter.imagenet_weights(model_id(cfg.model))
    policy = cfg.get("slice", {}).get("name", "none")
    model = reference_model(model_id(cfg.model))
    if policy != "none" and not any(
        sliced_stages(adapter, model, key, True) for key in ("planes_keep", "mid_keep")
    ):
        raise M2MError(
            f"slice={policy}: {name} has no channel group m2mdc can slice (it needs Conv2d + "
            "BatchNorm2d producers and no grouped convs); set slice=none"
        )


def check_model_parts(cfg: Any) -> None:
    """Refuse ``prune.keep_cfg`` and per-stage ``slice.*_keep`` mappings that do not fit the
    model, or that ``budget.macs`` would override; M2MError naming the setting, the offending
    part and the valid ones."""
    keep_cfg = _keep_cfg(cfg)
    mappings = _stage_mappings(cfg)
    budget = cfg.get("budget")
    if budget is not None and budget.get("macs") is not None:
        if keep_cfg:
            raise M2MError("budget.macs and prune.keep_cfg both choose the blocks; give one")
        for key in mappings:
            raise M2MError(f"budget.macs and slice.{key} both choose the keep fractions; give one")
    if not keep_cfg and not mappings:
        return
    from m2mdc.arch import get_adapter, model_id
    from m2mdc.pruning import parse_keep_cfg

    name = model_id(cfg.model)
    model, adapter = reference_model(name), get_adapter(name)
    if keep_cfg:  # the adapter's own checks: protected, emptied, unknown stages, bad indices
        adapter.keep(model, parse_keep_cfg(keep_cfg))
    include_first = bool(cfg.slice.get("include_first_stage"))
    for key, mapping in mappings.items():
        for stage in mapping:
            _check_sliced_stage(adapter, model, f"slice.{key}", str(stage), include_first)


def sliced_stages(
    adapter: ArchAdapter, model: nn.Module, key: str, include_first: bool
) -> list[str]:
    """The stages a ``slice.planes_keep`` / ``slice.mid_keep`` entry can apply to: those the
    slice stage visits, and for ``mid_keep`` only those with a block that has mid channels."""
    stages = adapter.plane_stages(model, include_first=include_first)
    if key.endswith("mid_keep"):
        has_mid = {b.stage for b in adapter.blocks(model) if adapter.mid_groups(model, b.name)}
        stages = [s for s in stages if s in has_mid]
    return stages


def _check_sliced_stage(
    adapter: ArchAdapter, model: nn.Module, key: str, stage: str, include_first: bool
) -> None:
    valid = sliced_stages(adapter, model, key, include_first)
    if stage in valid:
        return
    name = model.m2mdc_arch["name"]  # type: ignore[index]
    first = [s for s in sliced_stages(adapter, model, key, True) if s not in valid]
    listing = f"valid stages: {', '.join(valid)}"
    if stage in first:
        raise M2MError(
            f"{key}.{stage}: {stage} is not sliced unless slice.include_first_stage=true; {listing}"
        )
    if first:
        listing += f" (and {', '.join(first)} with slice.include_first_stage=true)"
    if stage not in adapter.stages(model):
        raise M2MError(f"{key}: unknown stage '{stage}' for {name}; {listing}")
    blocks = [b.name for b in adapter.blocks(model) if b.stage == stage]
    raise M2MError(
        f"{key}.{stage}: {stage} has no mid channels ({', '.join(blocks)}: no expansion conv); "
        f"{listing}"
    )


def validate_all(cfg: Any) -> None:
    """Everything checked before a command runs: the schema's ranges and choices
    (:func:`m2mdc.config.validate`), the model and the settings that name its parts, and
    the optional packages the command needs (the deploy extra, the tracking backends)."""
    from m2mdc import tracking
    from m2mdc.config import validate

    validate(cfg)
    check_model(cfg)
    check_model_parts(cfg)
    check_extras(cfg)
    if "logger" in cfg:
        tracking.require(cfg.logger)


def check_extras(cfg: Any) -> None:
    """The optional packages the command needs: ``m2mdc quantize`` (or ``m2mdc run`` with
    ``quantize.enabled=true``) needs the ``deploy`` extra."""
    from m2mdc.extras import require

    if cfg.get("command") == "quantize":
        require("m2mdc quantize", "deploy")
    elif cfg.quantize.enabled and cfg.get("command") == "run":
        require("quantize.enabled=true", "deploy")
