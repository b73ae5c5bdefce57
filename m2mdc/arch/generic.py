"""The generic adapter: any residual CNN of torchvision or timm, understood from its graph.

A model is named ``<source>:<name>`` (``torchvision:resnet50``, ``timm:resnet18``; the config
spells it ``model=auto model.source=torchvision model.name=resnet50``). Its blocks, stages and
channel groups are read once per model name from a traced forward pass and Torch-Pruning's
``DependencyGraph`` (:mod:`m2mdc.arch.graph`), never from class names:

- blocks are the residual modules (output = input + branch) and the transition blocks of the
  same type (protected); stages are maximal runs of blocks at one width and resolution;
- removing a block replaces it by ``nn.Identity`` at its own path (the model computes exactly
  what it would without the block; the other blocks keep their names and state_dict keys);
- a stage's *planes* are the DependencyGraph group of its blocks' outputs; a block's *mid*
  groups are the groups that lie inside it, keyed by the path of the conv producing them
  (Bottleneck: ``layer1.0.conv1`` and ``layer1.0.conv2``);
- slicing executes the DependencyGraph's pruning functions on those groups with the channels
  m2mdc's selectors chose; after every edit a forward pass checks every block's residual shape
  and the classifier (:meth:`GenericAdapter.check_invariants`).

Checkpoints store the name (with its source), the class count, the kept blocks and every
sliceable group's width: :meth:`~m2mdc.arch.base.AdapterBase.build` recreates the model from
them, so ``weights_only=True`` loading works as for the hand-written adapters.

Example:
    >>> ad = GenericAdapter()
    >>> m = ad.create("torchvision:resnet50", 10)
    >>> ad.mid_groups(m, "layer1.0")
    ['layer1.0.conv1', 'layer1.0.conv2']
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from m2mdc.arch import graph as g
from m2mdc.arch.base import AdapterBase, BlockRef, SlicePlan
from m2mdc.errors import M2MError

SOURCES = ("torchvision", "timm")
"""Where the generic adapter builds models from (``model.source``)."""


def _timm() -> Any:
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise M2MError(
            "model.source=timm needs the timm package: pip install 'm2mdc[timm]'"
        ) from None


@functools.cache
def _choices(source: str) -> tuple[str, ...]:
    """The classification models ``source`` builds (its own registry)."""
    if source == "torchvision":
        import torchvision

        return tuple(torchvision.models.list_models(module=torchvision.models))
    return tuple(_timm().list_models())


def split_name(name: str) -> tuple[str, str]:
    """``"torchvision:resnet50"`` -> ``("torchvision", "resnet50")``; M2MError naming the valid
    sources or models otherwise."""
    source, sep, arch = name.partition(":")
    if not sep or source not in SOURCES:
        raise M2MError(
            f"model.source={source!r} is not valid; choose one of: m2mdc, {', '.join(SOURCES)}"
        )
    choices = _choices(source)
    if arch not in choices:
        shown = ", ".join(choices) if len(choices) <= 120 else f"see {source}.list_models()"
        raise M2MError(f"model.name={arch!r} is not a {source} model; valid: {shown}")
    return source, arch


def _builder(source: str, arch: str) -> Callable[[int], nn.Module]:
    if source == "torchvision":
        import torchvision

        return lambda n: torchvision.models.get_model(arch, weights=None, num_classes=n)
    timm = _timm()
    return lambda n: timm.create_model(arch, pretrained=False, num_classes=n)


@functools.cache
def structure_of(name: str) -> g.Structure:
    """The :class:`~m2mdc.arch.graph.Structure` of model ``name`` (read once per process from
    a fresh CPU copy; M2MError for a model without residual blocks)."""
    source, arch = split_name(name)
    with torch.device("cpu"):
        model = _builder(source, arch)(10)
    try:
        return g.analyse(model)
    except g.NoResidualBlocks:
        raise M2MError(
            f"model.name={arch}: {source}'s {arch} has no residual block (a module whose output is "
            "its input plus a branch); m2mdc removes residual blocks and slices their stages"
        ) from None
    except ValueError as exc:
        raise M2MError(f"model.name={arch}: not supported ({exc})") from None


def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(p for p, m in model.named_modules() if m is module)


class GenericAdapter(AdapterBase):
    """Adapter for every residual torchvision / timm classification model (``source:name``)."""

    family = "generic"
    model_names: tuple[str, ...] = ()

    # ---- construction -------------------------------------------------------------------
    def _check_name(self, name: str) -> None:
        structure_of(name)

    def _st(self, model: nn.Module) -> g.Structure:
        return structure_of(str(self._stored(model)["name"]))

    def _classifier_key(self, name: str) -> str:
        return structure_of(name).classifier

    def _torchvision(self, name: str, num_classes: int) -> nn.Module:
        source, arch = split_name(name)
        model = _builder(source, arch)(num_classes)
        model.m2mdc_arch = {"family": self.family, "source": source, "name": name}  # type: ignore[assignment]
        return model

    def imagenet_weights(self, name: str) -> Any:
        source, arch = split_name(name)
        if source == "torchvision":
            import torchvision

            enum = torchvision.models.get_model_weights(arch)
            if hasattr(enum, "IMAGENET1K_V1"):
                return enum.IMAGENET1K_V1
        raise M2MError(
            f"model.pretrained=true: {name} has no torchvision IMAGENET1K_V1 weights m2mdc "
            "fetches; set model.pretrained=false, or model.weights=PATH for a state_dict"
        )

    def _set_classifier(self, model: nn.Module, linear: nn.Linear) -> None:
        model.set_submodule(self._st(model).classifier, linear)

    def _teacher_stages(self, name: str) -> dict[str, int]:
        return {s: len(b) for s, b in structure_of(name).stage_blocks().items()}

    def classifier(self, model: nn.Module) -> nn.Linear:
        return cast(nn.Linear, model.get_submodule(self._st(model).classifier))

    # ---- structure ----------------------------------------------------------------------
    def _named_blocks(self, model: nn.Module) -> list[tuple[str, str, nn.Module]]:
        teacher = self._st(model).stage_blocks()
        return [
            (teacher[stage][o], stage, model.get_submodule(teacher[stage][o]))
            for stage, kept in self._stored(model)["keep"].items()
            for o in kept
        ]

    def blocks(self, model: nn.Module) -> list[BlockRef]:
        protected = {p: prot for p, _, prot in self._st(model).blocks}
        keep = self._stored(model)["keep"]
        refs, position = [], dict.fromkeys(keep, 0)
        for name, stage, _ in self._named_blocks(model):
            i = position[stage]
            position[stage] = i + 1
            refs.append(BlockRef(name, stage, i, keep[stage][i], protected[name]))
        return refs

    def _is_protected(self, block: nn.Module) -> bool:
        raise NotImplementedError("GenericAdapter.blocks reads protection from the structure")

    def _set_stage_blocks(self, model: nn.Module, kept: dict[str, list[nn.Module]]) -> None:
        for path, stage, module in self._named_blocks(model):
            if not any(module is k for k in kept[stage]):
                model.set_submodule(path, nn.Identity())

    def _mids(self, model: nn.Module) -> dict[str, tuple[str, str]]:
        """Mid-group key (producing conv path) -> (conv, bn) paths, of the kept blocks."""
        mids = self._st(model).mids
        return {
            c: (c, b) for name, _, _ in self._named_blocks(model) for c, b in mids.get(name, [])
        }

    def _plane_root(self, model: nn.Module, stage: str) -> nn.Module:
        return model.get_submodule(self._st(model).out_roots[self._stage_path(model, stage)])

    def _stage_path(self, model: nn.Module, stage: str) -> str:
        paths = [p for p, s, _ in self._named_blocks(model) if s == stage]
        if not paths:
            raise ValueError(f"unknown stage '{stage}'; stages: {', '.join(self.stages(model))}")
        return paths[-1]

    def widths(self, model: nn.Module) -> dict[str, dict[str, int]]:
        planes = {
            s: cast(int, g.out_channels(self._plane_root(model, s)))
            for s in self.stages(model)
            if s in self._st(model).planes
        }
        mid = {
            k: cast(nn.Conv2d, model.get_submodule(c)).out_channels
            for k, (c, _) in self._mids(model).items()
        }
        return {"planes": planes, "mid": mid}

    def plane_stages(self, model: nn.Module, include_first: bool = False) -> list[str]:
        stages = self.stages(model)
        return [s for s in (stages if include_first else stages[1:]) if s in self._st(model).planes]

    def plane_producers(
        self, model: nn.Module, stage: str
    ) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """The dense conv/BN pairs of the stage's planes group (stem or downsample included),
        of the kept blocks."""
        kept = {p for p, _, _ in self._named_blocks(model)}
        return [
            (cast(nn.Conv2d, model.get_submodule(c)), cast(nn.BatchNorm2d, model.get_submodule(b)))
            for owner, c, b in self._st(model).planes[stage]
            if not owner or owner in kept
        ]

    def mid_groups(self, model: nn.Module, block_name: str) -> list[str]:
        return [c for c, _ in self._st(model).mids.get(block_name, [])]

    def mid_producers(
        self, model: nn.Module, block_name: str
    ) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
        """The conv/BN pair of a mid group (key: its conv's path; a block name: its first
        group); None when there is none."""
        mids = self._mids(model)
        key = (
            block_name
            if block_name in mids
            else next(iter(self.mid_groups(model, block_name)), None)
        )
        if key is None or key not in mids:
            return None
        conv, bn = mids[key]
        return cast(nn.Conv2d, model.get_submodule(conv)), cast(
            nn.BatchNorm2d, model.get_submodule(bn)
        )

    def feature_stages(self, model: nn.Module) -> dict[str, nn.Module]:
        return {s: self.stage_output(model, s) for s in self.stages(model)}

    # ---- surgery ------------------------------------------------------------------------
    def _slice_inplace(self, model: nn.Module, plan: SlicePlan) -> None:
        """Prune every group of ``plan`` with the DependencyGraph (channels not kept are cut
        from every layer of the group); ``requires_grad`` flags and the train mode stay."""
        widths = self.widths(model)
        roots: list[tuple[nn.Module, list[int], str]] = []
        for kind, keys in (("planes", plan.planes), ("mid", plan.mid)):
            for key, idx in keys.items():
                if key not in widths[kind]:
                    valid = ", ".join(widths[kind]) or "none"
                    raise ValueError(
                        f"slice plan: {key} is not a sliceable {kind} group; valid: {valid}"
                    )
                keep = _kept(idx, widths[kind][key], key)
                drop = [i for i in range(widths[kind][key]) if i not in keep]
                root = (
                    self._plane_root(model, key) if kind == "planes" else model.get_submodule(key)
                )
                roots.append((root, drop, key))
        if not any(drop for _, drop, _ in roots):
            return
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        graph = g.build_graph(model, self._st(model).input_size)
        for root, drop, key in roots:
            if drop:
                group = g.out_group(graph, root, drop)
                if not graph.check_pruning_group(group):
                    raise ValueError(f"slice plan: {key} would empty a layer")
                group.prune()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))

    # ---- checks and forward -------------------------------------------------------------
    def check_invariants(self, model: nn.Module) -> None:
        """One forward pass on a dummy input: every kept residual block returns its input's
        shape, and the logits have ``num_classes`` entries.

        Raises:
            RuntimeError: naming the block (or the forward error) and the mismatching shapes.
        """
        st, arch = self._st(model), self._stored(model)
        residual = {p for p, _, prot in st.blocks if not prot}
        bad: list[str] = []

        def hook(name: str) -> Callable[..., None]:
            def check(mod: nn.Module, args: Any, out: Any) -> None:
                if args[0].shape != out.shape:
                    bad.append(
                        f"{name}: output {tuple(out.shape)} is not its input {tuple(args[0].shape)}"
                    )

            return check

        handles = [
            m.register_forward_hook(hook(n))
            for n, _, m in self._named_blocks(model)
            if n in residual
        ]
        ref = next(model.parameters())
        x = torch.zeros(1, 3, st.input_size, st.input_size, device=ref.device, dtype=ref.dtype)
        training = model.training
        try:
            with torch.no_grad():
                logits = model.eval()(x)
        except RuntimeError as exc:
            raise RuntimeError(f"{arch['name']}: forward pass fails ({exc})") from None
        finally:
            model.train(training)
            for h in handles:
                h.remove()
        if bad:
            raise RuntimeError(bad[0])
        if logits.shape[-1] != arch["num_classes"]:
            raise RuntimeError(
                f"classifier: {logits.shape[-1]} logits but num_classes is {arch['num_classes']}"
            )

    def forward_features(
        self, model: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the classifier Linear's input, flattened; logits) in one ``model(x)`` pass."""
        seen: list[torch.Tensor] = []
        handle = self.classifier(model).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        try:
            logits = model(x)
        finally:
            handle.remove()
        return torch.flatten(seen[-1], 1), logits


def _kept(idx: list[int], width: int, key: str) -> list[int]:
    """Sorted kept indices; ValueError for an empty, duplicated or out-of-range list."""
    kept = sorted(int(i) for i in idx)
    if not kept or len(set(kept)) != len(kept) or kept[0] < 0 or kept[-1] >= width:
        raise ValueError(f"slice plan: {key} keeps {idx!r}, not distinct indices in 0..{width - 1}")
    return kept
