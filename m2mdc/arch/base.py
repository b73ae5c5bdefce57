"""The architecture adapter interface (paper Appendix A, plus slicing).

Scoring, pruning, slicing and profiling speak only :class:`BlockRef` and :class:`ArchAdapter`,
so supporting a new family is one new module that registers an adapter.

Every model that m2mdc builds carries its own description in ``model.m2mdc_arch`` (a JSON-able
dict, see :meth:`ArchAdapter.arch`); deep copies keep it, and checkpoints store it so that
:meth:`ArchAdapter.build` can recreate the exact (pruned, sliced) module before
``load_state_dict(strict=True)``.

Example:
    >>> adapter = get_adapter("resnet18")
    >>> model = adapter.create("resnet18", num_classes=10)
    >>> [b.name for b in adapter.blocks(model) if b.protected]
    ['layer2.0', 'layer3.0', 'layer4.0']
    >>> keep_cfg = {"layer1": [0], "layer2": [0], "layer3": [0, 1], "layer4": [0, 1]}
    >>> student = adapter.keep(model, keep_cfg)
    >>> rebuilt = adapter.build(adapter.arch(student))  # same shapes, fresh weights
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from m2mdc.arch.weights import fetch_state_dict, load_state_dict_strict
from m2mdc.errors import M2MError

KeepCfg = Mapping[str, Sequence[int]]
"""Stage name -> indices (in the teacher's numbering) of the blocks to keep."""


@dataclass(frozen=True)
class BlockRef:
    """One prunable unit of a model, in forward order.

    Attributes:
        name: module path in the current model (``"layer2.1"``, ``"features.5"``).
        stage: stage label (``"layer2"``; MobileNetV2: channel-width group such as ``"c24"``).
        index: position within the stage in the current model.
        orig_index: position within the stage in the unpruned teacher (what keep_cfg uses).
        protected: transition blocks (resolution or width change) are never removed.
    """

    name: str
    stage: str
    index: int
    orig_index: int
    protected: bool


@dataclass
class SlicePlan:
    """Channels to keep, as index lists into the current model's channels.

    Attributes:
        planes: stage -> kept plane channels (ResNet: conv2 out of every block, the downsample
            out, the next stage's inputs; MobileNetV2: the group's projection outputs).
        mid: mid-group key -> kept mid channels (ResNet: conv1 out / bn1 / conv2 in;
            MobileNetV2: the hidden expansion channels; the key is the block name, or for the
            generic adapter the path of the conv producing the group, see ``mid_groups``).
    """

    planes: dict[str, list[int]] = field(default_factory=dict)
    mid: dict[str, list[int]] = field(default_factory=dict)


class ArchAdapter(Protocol):
    """What m2mdc needs to know about one model family."""

    family: str
    model_names: tuple[str, ...]

    def create(
        self, name: str, num_classes: int, weights: Any = None, *, source: str = "weights"
    ) -> nn.Module:
        """Model ``name`` with a ``num_classes`` classifier; sets ``model.m2mdc_arch``.

        ``weights`` is None (fresh init), a torchvision weights enum (downloaded) or a state_dict
        with either an ImageNet (1000-class) head, which is replaced by a fresh classifier, or a
        ``num_classes`` head, which is kept. ``source`` names the weights in error messages.
        """
        ...

    def imagenet_weights(self, name: str) -> Any:
        """The torchvision ``IMAGENET1K_V1`` weights enum of model ``name``; M2MError naming
        ``model.pretrained`` for a model that has none."""
        ...

    def build(self, arch: Mapping[str, Any]) -> nn.Module:
        """Recreate the exact module described by ``arch`` (weights are fresh)."""
        ...

    def arch(self, model: nn.Module) -> dict[str, Any]:
        """JSON-able description (a deep copy): family, name, num_classes, keep, widths."""
        ...

    def widths(self, model: nn.Module) -> dict[str, dict[str, int]]:
        """``{"planes": {stage: width}, "mid": {block name: width}}`` read from the modules."""
        ...

    def stages(self, model: nn.Module) -> list[str]:
        """Stage labels in forward order."""
        ...

    def blocks(self, model: nn.Module) -> list[BlockRef]:
        """Prunable blocks in forward order."""
        ...

    def block_module(self, model: nn.Module, name: str) -> nn.Module:
        """The block called ``name`` in the current model; ValueError for a non-block name."""
        ...

    def classifier(self, model: nn.Module) -> nn.Linear:
        """The final Linear layer."""
        ...

    def keep(self, model: nn.Module, keep_cfg: KeepCfg) -> nn.Module:
        """A new model holding only the kept blocks, weights copied from ``model``.

        ``keep_cfg`` uses teacher numbering; stages not named keep all their blocks. Raises
        M2MError naming the offending block for a protected removal, an emptied stage or an
        index out of range.
        """
        ...

    def slice(self, model: nn.Module, plan: SlicePlan) -> nn.Module:
        """A new model whose planes / mid channels are the selected slices of ``model``'s."""
        ...

    def plane_stages(self, model: nn.Module, include_first: bool = False) -> list[str]:
        """Stages whose planes may be sliced; the first stage only with ``include_first``."""
        ...

    def plane_producers(
        self, model: nn.Module, stage: str
    ) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """The conv/BN pairs whose output channels are the stage's planes (channel scoring)."""
        ...

    def mid_producers(
        self, model: nn.Module, block_name: str
    ) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
        """The conv/BN pair producing a mid group's channels (``block_name``: a key of
        :meth:`mid_groups`); None when not mid-sliceable."""
        ...

    def mid_groups(self, model: nn.Module, block_name: str) -> list[str]:
        """The keys of a block's mid channel groups (``SlicePlan.mid``, ``widths()["mid"]``):
        the block name itself for one group per block, none when not mid-sliceable."""
        ...

    def stage_output(self, model: nn.Module, stage: str) -> nn.Module:
        """The last block of ``stage``: its output carries the stage's planes."""
        ...

    def feature_stages(self, model: nn.Module) -> dict[str, nn.Module]:
        """Stage -> module whose output is that stage's output, in forward order."""
        ...

    def check_invariants(self, model: nn.Module) -> None:
        """Raise RuntimeError naming the block when a residual/classifier shape is broken."""
        ...

    def forward_features(
        self, model: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate pooled features, logits) in one forward pass."""
        ...


class AdapterBase:
    """Family-independent half of an adapter: ``m2mdc_arch`` bookkeeping, keep validation,
    creation with weights, and :meth:`build` from a description.

    A family subclass provides the hooks below (those raising NotImplementedError) plus the
    family-specific members of :class:`ArchAdapter` (slicing, invariants, producers, ...).
    ``keep``/``slice`` deep-copy the input and then edit the copy in place, so callers always
    get a new model and the input is never mutated.
    """

    family: str = ""
    model_names: tuple[str, ...] = ()
    classifier_key: str = ""
    """state_dict prefix of the classifier Linear (``"fc"``, ``"classifier.1"``)."""

    # ---- family hooks -------------------------------------------------------------------
    def _torchvision(self, name: str, num_classes: int) -> nn.Module:
        """The plain model (torchvision's, or m2mdc's own definition) with fresh weights."""
        raise NotImplementedError

    def _set_classifier(self, model: nn.Module, linear: nn.Linear) -> None:
        raise NotImplementedError

    def _teacher_stages(self, name: str) -> dict[str, int]:
        """Stage -> number of blocks in the unpruned model, in forward order."""
        raise NotImplementedError

    def _named_blocks(self, model: nn.Module) -> list[tuple[str, str, nn.Module]]:
        """(current name, stage, module) of every block in forward order."""
        raise NotImplementedError

    def _is_protected(self, block: nn.Module) -> bool:
        raise NotImplementedError

    def _set_stage_blocks(self, model: nn.Module, kept: dict[str, list[nn.Module]]) -> None:
        """Replace every stage's blocks by ``kept[stage]`` (in place)."""
        raise NotImplementedError

    def _slice_inplace(self, model: nn.Module, plan: SlicePlan) -> None:
        raise NotImplementedError

    def _classifier_key(self, name: str) -> str:
        """state_dict prefix of model ``name``'s classifier Linear."""
        return self.classifier_key

    def _orig_label(self, stage: str, orig_index: int) -> str:
        """How an error message names block ``orig_index`` of ``stage`` in teacher numbering."""
        return f"{stage}[{orig_index}]"

    def widths(self, model: nn.Module) -> dict[str, dict[str, int]]:
        raise NotImplementedError

    def classifier(self, model: nn.Module) -> nn.Linear:
        raise NotImplementedError

    def check_invariants(self, model: nn.Module) -> None:
        raise NotImplementedError

    def imagenet_weights(self, name: str) -> Any:
        raise NotImplementedError

    # ---- shared behaviour ---------------------------------------------------------------
    def _check_name(self, name: str) -> None:
        if name not in self.model_names:
            raise M2MError(
                f"model: '{name}' is not a {self.family} model; "
                f"valid: {', '.join(self.model_names)}"
            )

    def _stored(self, model: nn.Module) -> dict[str, Any]:
        arch = getattr(model, "m2mdc_arch", None)
        if not isinstance(arch, dict) or arch.get("family") != self.family:
            raise ValueError(
                f"model carries no {self.family} m2mdc_arch; create it with "
                "m2mdc.arch.zoo.create_model or an adapter"
            )
        return arch

    def _refresh(self, model: nn.Module) -> None:
        arch = self._stored(model)
        arch["num_classes"] = self.classifier(model).out_features
        arch["widths"] = self.widths(model)

    def create(
        self, name: str, num_classes: int, weights: Any = None, *, source: str = "weights"
    ) -> nn.Module:
        self._check_name(name)
        if weights is None:
            model = self._torchvision(name, num_classes)
        else:
            state = weights if isinstance(weights, Mapping) else fetch_state_dict(name, weights)
            head = state.get(f"{self._classifier_key(name)}.weight")
            if isinstance(head, torch.Tensor) and head.ndim == 2 and head.shape[0] == num_classes:
                model = self._torchvision(name, num_classes)
                load_state_dict_strict(model, state, source, name)
            else:
                # ImageNet head: load it as-is, then swap in a fresh classifier.
                model = self._torchvision(name, 1000)
                load_state_dict_strict(model, state, source, name, alt_classes=num_classes)
                old = self.classifier(model)
                self._set_classifier(model, _fresh_linear(old, num_classes))
        model.m2mdc_arch = {  # type: ignore[assignment]
            **getattr(model, "m2mdc_arch", {}),
            "family": self.family,
            "name": name,
            "num_classes": num_classes,
            "keep": {s: list(range(n)) for s, n in self._teacher_stages(name).items()},
            "widths": {},
        }
        self._refresh(model)
        self.check_invariants(model)
        return model

    def arch(self, model: nn.Module) -> dict[str, Any]:
        arch = self._stored(model)
        arch["widths"] = self.widths(model)
        return copy.deepcopy(arch)

    def stages(self, model: nn.Module) -> list[str]:
        return list(self._stored(model)["keep"])

    def blocks(self, model: nn.Module) -> list[BlockRef]:
        keep = self._stored(model)["keep"]
        refs: list[BlockRef] = []
        position: dict[str, int] = {}
        for name, stage, module in self._named_blocks(model):
            i = position.get(stage, 0)
            position[stage] = i + 1
            refs.append(BlockRef(name, stage, i, keep[stage][i], self._is_protected(module)))
        return refs

    def block_module(self, model: nn.Module, name: str) -> nn.Module:
        for block_name, _, module in self._named_blocks(model):
            if block_name == name:
                return module
        raise ValueError(f"{name} is not a block of this {self.family} model")

    def _stage_blocks(self, model: nn.Module, stage: str) -> list[nn.Module]:
        blocks = [m for _, s, m in self._named_blocks(model) if s == stage]
        if not blocks:
            raise ValueError(f"unknown stage '{stage}'; stages: {', '.join(self.stages(model))}")
        return blocks

    def stage_output(self, model: nn.Module, stage: str) -> nn.Module:
        return self._stage_blocks(model, stage)[-1]

    def mid_producers(
        self, model: nn.Module, block_name: str
    ) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
        raise NotImplementedError

    def mid_groups(self, model: nn.Module, block_name: str) -> list[str]:
        return [block_name] if self.mid_producers(model, block_name) is not None else []

    def keep(self, model: nn.Module, keep_cfg: KeepCfg) -> nn.Module:
        new = copy.deepcopy(model)
        self._keep_inplace(new, keep_cfg, "prune.keep_cfg")
        return new

    def _keep_inplace(self, model: nn.Module, keep_cfg: KeepCfg, where: str) -> None:
        arch = self._stored(model)
        present: dict[str, list[int]] = arch["keep"]
        if not isinstance(keep_cfg, Mapping):
            raise M2MError(f"{where} must map stage names to lists of block indices")
        for stage in keep_cfg:
            if stage not in present:
                raise M2MError(f"{where}: unknown stage '{stage}'; stages: {', '.join(present)}")
        refs = self.blocks(model)
        modules = [m for _, _, m in self._named_blocks(model)]
        new_keep: dict[str, list[int]] = {}
        kept: dict[str, list[nn.Module]] = {}
        for stage, have in present.items():
            wanted = (
                have if stage not in keep_cfg else _indices(keep_cfg[stage], f"{where}.{stage}")
            )
            for o in wanted:
                if o not in have:
                    raise M2MError(
                        f"{where}: {self._orig_label(stage, o)} does not exist; valid {stage} "
                        f"indices: {', '.join(map(str, have))}"
                    )
            if not wanted:
                raise M2MError(f"{where}: stage {stage} would be empty; keep at least one block")
            stage_refs = [(r, m) for r, m in zip(refs, modules, strict=True) if r.stage == stage]
            for ref, _ in stage_refs:
                if ref.protected and ref.orig_index not in wanted:
                    label = self._orig_label(stage, ref.orig_index)
                    block = ref.name if label == ref.name else f"{ref.name} ({label})"
                    raise M2MError(
                        f"{where}: {block} is a protected transition block and cannot be removed"
                    )
            new_keep[stage] = list(wanted)
            kept[stage] = [m for r, m in stage_refs if r.orig_index in wanted]
        self._set_stage_blocks(model, kept)
        arch["keep"] = new_keep
        self._refresh(model)
        self.check_invariants(model)

    def slice(self, model: nn.Module, plan: SlicePlan) -> nn.Module:
        new = copy.deepcopy(model)
        self._slice_inplace(new, plan)
        self._refresh(new)
        self.check_invariants(new)
        return new

    def build(self, arch: Mapping[str, Any]) -> nn.Module:
        where = "checkpoint arch"
        try:
            family, name = arch["family"], arch["name"]
            num_classes, keep, widths = int(arch["num_classes"]), arch["keep"], arch["widths"]
            planes, mid = dict(widths["planes"]), dict(widths["mid"])
        except (KeyError, TypeError, ValueError) as exc:
            raise M2MError(f"{where} is incomplete or malformed ({exc!r})") from None
        if family != self.family:
            raise M2MError(f"{where}: family '{family}' is not '{self.family}'")
        model = self.create(name, num_classes)
        self._keep_inplace(model, keep, f"{where} keep")
        current = self.widths(model)
        plan = SlicePlan(planes={}, mid={})
        for kind, want, target in (("planes", planes, plan.planes), ("mid", mid, plan.mid)):
            have = current[kind]
            if set(want) != set(have):
                raise M2MError(
                    f"{where}: widths.{kind} names {sorted(want)} but the model has {sorted(have)}"
                )
            for key, width in want.items():
                if not isinstance(width, int) or not 1 <= width <= have[key]:
                    raise M2MError(
                        f"{where}: widths.{kind}.{key}={width!r} is not in 1..{have[key]}"
                    )
                if width != have[key]:
                    target[key] = list(range(width))
        try:
            self._slice_inplace(model, plan)
        except ValueError as exc:
            raise M2MError(f"{where}: {exc}") from None
        self._refresh(model)
        self.check_invariants(model)
        return model


def _indices(raw: Any, where: str) -> list[int]:
    """Sorted, de-duplicated block indices from a config value (list, tuple, ListConfig)."""
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
        raise M2MError(f"{where} must be a list of block indices, got {raw!r}")
    out: set[int] = set()
    for item in raw:
        if isinstance(item, bool) or not isinstance(item, int):
            raise M2MError(f"{where} must be a list of block indices, got item {item!r}")
        out.add(item)
    return sorted(out)


def _fresh_linear(old: nn.Linear, num_classes: int) -> nn.Linear:
    """A new classifier on the same device/dtype as ``old`` (torchvision's default init)."""
    return nn.Linear(
        old.in_features,
        num_classes,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )


def require_same(where: str, what: str, got: int, other: str, expected: int) -> None:
    """Invariant helper: RuntimeError ``"<where>: <what> is <got> but <other> is <expected>"``."""
    if got != expected:
        raise RuntimeError(f"{where}: {what} is {got} but {other} is {expected}")
