"""ResNet adapter: torchvision's ResNet-18/34 and the CIFAR ResNets (BasicBlock only).

Blocks are ``layerS.i`` in the current numbering; stages ``layer1``..``layer4`` (torchvision) or
``layer1``..``layer3`` (CIFAR ResNets, :mod:`m2mdc.arch.cifar_resnet`), read from the model's
``m2mdc_arch``. A stage's *planes* are the channels of its residual stream: every block's
conv2/bn2 output, the first block's downsample output, and the input of every consumer (later
blocks' conv1, the next stage's conv1 and downsample, ``fc`` after the last stage). For
``layer1`` the first block has an identity shortcut, so its planes are the stem's output and
slicing them also slices the stem conv1/bn1. A block's *mid* channels are conv1 out / bn1 /
conv2 in (paper section 3.2); conv2 out stays on the planes. The first block of every later
stage (the one with the downsample shortcut) is a protected transition block.

Example:
    >>> ad = ResNetAdapter()
    >>> m = ad.create("resnet18", 10)
    >>> plan = SlicePlan(planes={"layer4": list(range(256))}, mid={"layer3.1": [0, 5]})
    >>> small = ad.slice(m, plan)
    >>> small.fc.in_features
    256
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from m2mdc.arch.base import AdapterBase, SlicePlan
from m2mdc.arch.base import require_same as _same
from m2mdc.arch.cifar_resnet import BLOCKS_PER_STAGE, cifar_resnet
from m2mdc.arch.surgery import slice_bn, slice_conv_in, slice_conv_out, slice_linear_in
from m2mdc.errors import M2MError

_DEPTHS = {
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
    **{name: (n, n, n) for name, n in BLOCKS_PER_STAGE.items()},
}
"""Model name -> blocks per stage (``layer1``, ``layer2``, ...)."""
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
}
_WEIGHTS: dict[str, Any] = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
}


def _bb(module: nn.Module) -> BasicBlock:
    if not isinstance(module, BasicBlock):
        raise TypeError(f"expected a torchvision BasicBlock, got {type(module).__name__}")
    return module


def _conv(module: nn.Module, attr: str) -> nn.Conv2d:
    return cast(nn.Conv2d, getattr(module, attr))


def _bn(module: nn.Module, attr: str) -> nn.BatchNorm2d:
    return cast(nn.BatchNorm2d, getattr(module, attr))


class ResNetAdapter(AdapterBase):
    """Adapter for torchvision ``resnet18`` / ``resnet34`` and the CIFAR ResNets
    ``resnet20`` / ``resnet32`` / ``resnet56`` / ``resnet110`` (BasicBlock only)."""

    family = "resnet"
    model_names: tuple[str, ...] = tuple(_DEPTHS)
    classifier_key = "fc"

    # ---- construction -------------------------------------------------------------------
    def _torchvision(self, name: str, num_classes: int) -> nn.Module:
        if name in BLOCKS_PER_STAGE:
            return cifar_resnet(name, num_classes)
        return _BUILDERS[name](weights=None, num_classes=num_classes)

    def imagenet_weights(self, name: str) -> Any:
        self._check_name(name)
        if name not in _WEIGHTS:
            raise M2MError(
                f"model.pretrained=true: {name} has no ImageNet weights (the CIFAR ResNets train "
                "from scratch); set model.pretrained=false, or model.weights=PATH for your own"
            )
        return _WEIGHTS[name]

    def _set_classifier(self, model: nn.Module, linear: nn.Linear) -> None:
        model.fc = linear

    def _teacher_stages(self, name: str) -> dict[str, int]:
        return {f"layer{i}": n for i, n in enumerate(_DEPTHS[name], start=1)}

    # ---- structure ----------------------------------------------------------------------
    def _named_blocks(self, model: nn.Module) -> list[tuple[str, str, nn.Module]]:
        return [
            (f"{stage}.{i}", stage, _bb(block))
            for stage in self.stages(model)
            for i, block in enumerate(cast(nn.Sequential, getattr(model, stage)))
        ]

    def _is_protected(self, block: nn.Module) -> bool:
        # The downsample shortcut is what realigns resolution/width; without it the stage's
        # residual stream would have no entry point (paper: protect layer2.0/3.0/4.0; CIFAR
        # ResNets: layer2.0/3.0).
        return _bb(block).downsample is not None

    def _orig_label(self, stage: str, orig_index: int) -> str:
        return f"{stage}.{orig_index}"

    def _set_stage_blocks(self, model: nn.Module, kept: dict[str, list[nn.Module]]) -> None:
        for stage, blocks in kept.items():
            setattr(model, stage, nn.Sequential(*blocks))

    def classifier(self, model: nn.Module) -> nn.Linear:
        return cast(nn.Linear, model.fc)

    def _blocks_of(self, model: nn.Module, stage: str) -> list[BasicBlock]:
        return [_bb(b) for b in self._stage_blocks(model, stage)]

    def widths(self, model: nn.Module) -> dict[str, dict[str, int]]:
        planes = {s: self._blocks_of(model, s)[-1].conv2.out_channels for s in self.stages(model)}
        mid = {n: _conv(b, "conv1").out_channels for n, _, b in self._named_blocks(model)}
        return {"planes": planes, "mid": mid}

    def plane_stages(self, model: nn.Module, include_first: bool = False) -> list[str]:
        stages = self.stages(model)
        return stages if include_first else stages[1:]

    def plane_producers(
        self, model: nn.Module, stage: str
    ) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """conv2/bn2 of every block, plus the downsample conv/bn of the first block or, for an
        identity first block (``layer1``), the stem conv1/bn1 whose output is the planes."""
        blocks = self._blocks_of(model, stage)
        first = blocks[0]
        pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []
        if first.downsample is not None:
            pairs.append((_conv(first.downsample, "0"), _bn(first.downsample, "1")))
        elif stage == self.stages(model)[0]:
            pairs.append((_conv(model, "conv1"), _bn(model, "bn1")))
        pairs += [(b.conv2, b.bn2) for b in blocks]
        return pairs

    def mid_producers(
        self, model: nn.Module, block_name: str
    ) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
        block = _bb(self.block_module(model, block_name))
        return block.conv1, block.bn1

    def feature_stages(self, model: nn.Module) -> dict[str, nn.Module]:
        return {s: model.get_submodule(s) for s in self.stages(model)}

    # ---- surgery ------------------------------------------------------------------------
    def _slice_inplace(self, model: nn.Module, plan: SlicePlan) -> None:
        names = {n: _bb(b) for n, _, b in self._named_blocks(model)}
        stages = self.stages(model)
        for stage in plan.planes:
            if stage not in stages:
                raise ValueError(f"slice plan: unknown stage '{stage}'; stages: {stages}")
        for name in plan.mid:
            if name not in names:
                raise ValueError(f"slice plan: unknown block '{name}'; blocks: {list(names)}")
        for stage, idx in plan.planes.items():
            self._slice_planes(model, stage, idx)
        for name, idx in plan.mid.items():
            block = names[name]
            block.conv1 = slice_conv_out(block.conv1, idx)
            block.bn1 = slice_bn(block.bn1, idx)
            block.conv2 = slice_conv_in(block.conv2, idx)

    def _slice_planes(self, model: nn.Module, stage: str, idx: list[int]) -> None:
        stages = self.stages(model)
        blocks = self._blocks_of(model, stage)
        for i, block in enumerate(blocks):
            block.conv2 = slice_conv_out(block.conv2, idx)
            block.bn2 = slice_bn(block.bn2, idx)
            if i > 0:  # later blocks read the residual stream
                block.conv1 = slice_conv_in(block.conv1, idx)
        first = blocks[0]
        if first.downsample is not None:
            ds = cast(nn.Sequential, first.downsample)
            ds[0] = slice_conv_out(_conv(ds, "0"), idx)
            ds[1] = slice_bn(_bn(ds, "1"), idx)
        elif stage == stages[0]:
            # Identity shortcut: the stream entering layer1 is the stem output.
            model.conv1 = slice_conv_out(_conv(model, "conv1"), idx)
            model.bn1 = slice_bn(_bn(model, "bn1"), idx)
            first.conv1 = slice_conv_in(first.conv1, idx)
        else:
            raise ValueError(f"slice plan: {stage}.0 has no downsample; cannot slice its planes")
        pos = stages.index(stage)
        if pos + 1 < len(stages):
            nxt = self._blocks_of(model, stages[pos + 1])[0]
            if nxt.downsample is None:
                raise ValueError(
                    f"slice plan: {stages[pos + 1]}.0 has an identity shortcut, so {stage} planes "
                    "cannot be sliced alone"
                )
            nxt.conv1 = slice_conv_in(nxt.conv1, idx)
            ds = cast(nn.Sequential, nxt.downsample)
            ds[0] = slice_conv_in(_conv(ds, "0"), idx)
        else:
            model.fc = slice_linear_in(self.classifier(model), idx)

    # ---- checks and forward -------------------------------------------------------------
    def check_invariants(self, model: nn.Module) -> None:
        """Residual adds, BN sizes, block chaining and the classifier input.

        Raises:
            RuntimeError: naming the block and the two mismatching widths.
        """
        stem, stem_bn = _conv(model, "conv1"), _bn(model, "bn1")
        _same("stem", "bn1", stem_bn.num_features, "conv1 out", stem.out_channels)
        width, source = stem.out_channels, "stem"
        for name, _, module in self._named_blocks(model):
            b = _bb(module)
            _same(name, "conv1 in", b.conv1.in_channels, f"{source} output", width)
            _same(name, "bn1", b.bn1.num_features, "conv1 out", b.conv1.out_channels)
            _same(name, "conv2 in", b.conv2.in_channels, "conv1 out", b.conv1.out_channels)
            _same(name, "bn2", b.bn2.num_features, "conv2 out", b.conv2.out_channels)
            if b.downsample is None:
                _same(name, "conv2 out", b.conv2.out_channels, "identity (block input)", width)
            else:
                ds_conv, ds_bn = _conv(b.downsample, "0"), _bn(b.downsample, "1")
                _same(name, "downsample in", ds_conv.in_channels, f"{source} output", width)
                _same(
                    name,
                    "downsample bn",
                    ds_bn.num_features,
                    "downsample out",
                    ds_conv.out_channels,
                )
                _same(
                    name, "conv2 out", b.conv2.out_channels, "downsample out", ds_conv.out_channels
                )
            width, source = b.conv2.out_channels, name
        _same("fc", "in_features", self.classifier(model).in_features, f"{source} output", width)

    def forward_features(
        self, model: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(flattened avgpool output of the last stage, fc logits); identical to ``model(x)``.
        The stem's max-pool is torchvision's; the CIFAR ResNets have none."""
        m: Any = model
        x = m.relu(m.bn1(m.conv1(x)))
        if hasattr(m, "maxpool"):
            x = m.maxpool(x)
        for stage in self.stages(model):
            x = getattr(m, stage)(x)
        feats = torch.flatten(m.avgpool(x), 1)
        return feats, m.fc(feats)
