"""MobileNetV2 (torchvision) adapter.

``features[0]`` is the stem and ``features[-1]`` the 1x1 tail conv; everything between is an
InvertedResidual block named ``features.k`` in the current numbering. Stages are the teacher's
channel-width groups, labelled by their width: c16, c24, c32, c64, c96, c160, c320 (labels stay
fixed after slicing). The first block of every group changes stride or width and is protected;
the others are the residual blocks that pruning may remove (paper section 4 / Appendix A).

A group's *planes* are its blocks' projection outputs, consumed by the group's later blocks, by
the next group's first block, and (after c320) by the tail conv. A block's *mid* channels are its
hidden expansion channels: expand conv out / BN, the depthwise conv and BN, projection conv in.

Example:
    >>> ad = MobileNetV2Adapter()
    >>> m = ad.create("mobilenet_v2", 10)
    >>> [b.name for b in ad.blocks(m) if b.protected][:3]
    ['features.1', 'features.2', 'features.4']
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

from m2mdc.arch.base import AdapterBase, SlicePlan
from m2mdc.arch.base import require_same as _same
from m2mdc.arch.surgery import slice_bn, slice_conv_depthwise, slice_conv_in, slice_conv_out

GROUPS: dict[str, int] = {"c16": 1, "c24": 2, "c32": 3, "c64": 4, "c96": 3, "c160": 3, "c320": 1}
"""Channel-width group -> number of InvertedResidual blocks in torchvision's MobileNetV2."""


def _ir(module: nn.Module) -> InvertedResidual:
    if not isinstance(module, InvertedResidual):
        raise TypeError(f"expected a torchvision InvertedResidual, got {type(module).__name__}")
    return module


def _seq(module: Any) -> nn.Sequential:
    return cast(nn.Sequential, module)


def _parts(block: InvertedResidual) -> tuple[nn.Sequential | None, nn.Sequential, int]:
    """(expand ConvBNAct or None, depthwise ConvBNAct, index of the projection conv in
    ``block.conv``; the projection BN follows it)."""
    seq = _seq(block.conv)
    if len(seq) == 4:
        return _seq(seq[0]), _seq(seq[1]), 2
    return None, _seq(seq[0]), 1


def _conv(seq: nn.Sequential, i: int) -> nn.Conv2d:
    return cast(nn.Conv2d, seq[i])


def _bn(seq: nn.Sequential, i: int) -> nn.BatchNorm2d:
    return cast(nn.BatchNorm2d, seq[i])


class MobileNetV2Adapter(AdapterBase):
    """Adapter for torchvision ``mobilenet_v2`` (width multiplier 1.0)."""

    family = "mobilenet_v2"
    model_names: tuple[str, ...] = ("mobilenet_v2",)
    classifier_key = "classifier.1"

    # ---- construction -------------------------------------------------------------------
    def _torchvision(self, name: str, num_classes: int) -> nn.Module:
        return torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)

    def imagenet_weights(self, name: str) -> Any:
        self._check_name(name)
        return torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1

    def _set_classifier(self, model: nn.Module, linear: nn.Linear) -> None:
        # torchvision's MobileNetV2 initialises its classifier this way; keep fresh heads alike.
        nn.init.normal_(linear.weight, 0, 0.01)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
        _seq(model.classifier)[1] = linear

    def _teacher_stages(self, name: str) -> dict[str, int]:
        return dict(GROUPS)

    # ---- structure ----------------------------------------------------------------------
    def _features(self, model: nn.Module) -> nn.Sequential:
        return _seq(model.features)

    def _named_blocks(self, model: nn.Module) -> list[tuple[str, str, nn.Module]]:
        counts = self._stored(model)["keep"]
        feats = list(self._features(model))
        out: list[tuple[str, str, nn.Module]] = []
        k = 1  # features[0] is the stem
        for group, kept in counts.items():
            for _ in kept:
                out.append((f"features.{k}", group, _ir(feats[k])))
                k += 1
        if k != len(feats) - 1:
            raise RuntimeError(
                f"m2mdc_arch keep lists {k - 1} blocks but features holds {len(feats) - 2}"
            )
        return out

    def _is_protected(self, block: nn.Module) -> bool:
        # Free blocks are exactly the residual ones; torchvision fixes use_res_connect at
        # construction (stride 1 and in == out in the teacher) and slicing never changes it.
        return not _ir(block).use_res_connect

    def _set_stage_blocks(self, model: nn.Module, kept: dict[str, list[nn.Module]]) -> None:
        feats = self._features(model)
        blocks = [b for group in kept.values() for b in group]
        model.features = nn.Sequential(feats[0], *blocks, feats[len(feats) - 1])

    def classifier(self, model: nn.Module) -> nn.Linear:
        return cast(nn.Linear, _seq(model.classifier)[1])

    def _blocks_of(self, model: nn.Module, stage: str) -> list[InvertedResidual]:
        return [_ir(b) for b in self._stage_blocks(model, stage)]

    def widths(self, model: nn.Module) -> dict[str, dict[str, int]]:
        planes = {g: self._blocks_of(model, g)[-1].out_channels for g in self.stages(model)}
        mid = {n: _conv(_parts(_ir(b))[1], 0).out_channels for n, _, b in self._named_blocks(model)}
        return {"planes": planes, "mid": mid}

    def plane_stages(self, model: nn.Module, include_first: bool = False) -> list[str]:
        groups = self.stages(model)
        return groups if include_first else groups[1:]

    def plane_producers(
        self, model: nn.Module, stage: str
    ) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """The projection conv/BN of every block of the group."""
        pairs = []
        for block in self._blocks_of(model, stage):
            _, _, p = _parts(block)
            seq = _seq(block.conv)
            pairs.append((_conv(seq, p), _bn(seq, p + 1)))
        return pairs

    def mid_producers(
        self, model: nn.Module, block_name: str
    ) -> tuple[nn.Conv2d, nn.BatchNorm2d] | None:
        """The expand conv/BN; None for expansion-1 blocks (their hidden channels are the
        block input, which belongs to the previous stage)."""
        expand, _, _ = _parts(_ir(self.block_module(model, block_name)))
        return None if expand is None else (_conv(expand, 0), _bn(expand, 1))

    def feature_stages(self, model: nn.Module) -> dict[str, nn.Module]:
        return {g: self.stage_output(model, g) for g in self.stages(model)}

    # ---- surgery ------------------------------------------------------------------------
    def _slice_inplace(self, model: nn.Module, plan: SlicePlan) -> None:
        groups = self.stages(model)
        names = {n: _ir(b) for n, _, b in self._named_blocks(model)}
        for g in plan.planes:
            if g not in groups:
                raise ValueError(f"slice plan: unknown stage '{g}'; stages: {groups}")
        for name in plan.mid:
            if name not in names:
                raise ValueError(f"slice plan: unknown block '{name}'; blocks: {list(names)}")
            if _parts(names[name])[0] is None:
                raise ValueError(f"slice plan: {name} has no expansion conv; it has no mid width")
        for g, idx in plan.planes.items():
            blocks = self._blocks_of(model, g)
            for j, block in enumerate(blocks):
                _slice_output(block, idx)
                if j > 0:
                    _slice_input(block, idx)
            pos = groups.index(g)
            if pos + 1 < len(groups):
                _slice_input(self._blocks_of(model, groups[pos + 1])[0], idx)
            else:
                tail = _seq(self._features(model)[-1])
                tail[0] = slice_conv_in(_conv(tail, 0), idx)
        for name, idx in plan.mid.items():
            _slice_hidden(names[name], idx)

    # ---- checks and forward -------------------------------------------------------------
    def check_invariants(self, model: nn.Module) -> None:
        """Residual adds, depthwise groups, BN sizes, block chaining, tail and classifier.

        Raises:
            RuntimeError: naming the block and the two mismatching widths.
        """
        feats = self._features(model)
        stem, tail = _seq(feats[0]), _seq(feats[len(feats) - 1])
        _same(
            "features.0", "bn", _bn(stem, 1).num_features, "conv out", _conv(stem, 0).out_channels
        )
        width, source = _conv(stem, 0).out_channels, "features.0"
        for name, _, module in self._named_blocks(model):
            block = _ir(module)
            expand, dw, p = _parts(block)
            seq = _seq(block.conv)
            hidden = width
            if expand is not None:
                ex = _conv(expand, 0)
                _same(name, "expand in", ex.in_channels, f"{source} output", width)
                _same(name, "expand bn", _bn(expand, 1).num_features, "expand out", ex.out_channels)
                hidden = ex.out_channels
            dconv = _conv(dw, 0)
            _same(name, "depthwise in", dconv.in_channels, "hidden width", hidden)
            _same(name, "depthwise out", dconv.out_channels, "hidden width", hidden)
            _same(name, "depthwise groups", dconv.groups, "hidden width", hidden)
            _same(name, "depthwise bn", _bn(dw, 1).num_features, "hidden width", hidden)
            proj = _conv(seq, p)
            _same(name, "projection in", proj.in_channels, "hidden width", hidden)
            _same(
                name,
                "projection bn",
                _bn(seq, p + 1).num_features,
                "projection out",
                proj.out_channels,
            )
            _same(name, "out_channels", block.out_channels, "projection out", proj.out_channels)
            if block.use_res_connect:
                _same(name, "projection out", proj.out_channels, "identity (block input)", width)
            width, source = proj.out_channels, name
        last = len(feats) - 1
        _same(f"features.{last}", "conv in", _conv(tail, 0).in_channels, f"{source} output", width)
        _same(
            f"features.{last}",
            "bn",
            _bn(tail, 1).num_features,
            "conv out",
            _conv(tail, 0).out_channels,
        )
        tail_out = _conv(tail, 0).out_channels
        _same("classifier", "in_features", self.classifier(model).in_features, "tail out", tail_out)

    def forward_features(
        self, model: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled, flattened output of ``features`` incl. the tail conv, classifier logits);
        identical to ``model(x)``."""
        x = self._features(model)(x)
        feats = torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1)
        return feats, _seq(model.classifier)(feats)


def _slice_output(block: InvertedResidual, idx: list[int]) -> None:
    _, _, p = _parts(block)
    seq = _seq(block.conv)
    seq[p] = slice_conv_out(_conv(seq, p), idx)
    seq[p + 1] = slice_bn(_bn(seq, p + 1), idx)
    block.out_channels = _conv(seq, p).out_channels


def _slice_input(block: InvertedResidual, idx: list[int]) -> None:
    expand, dw, p = _parts(block)
    if expand is not None:
        expand[0] = slice_conv_in(_conv(expand, 0), idx)
        return
    # Expansion 1: the depthwise conv runs on the input channels themselves.
    seq = _seq(block.conv)
    dw[0] = slice_conv_depthwise(_conv(dw, 0), idx)
    dw[1] = slice_bn(_bn(dw, 1), idx)
    seq[p] = slice_conv_in(_conv(seq, p), idx)


def _slice_hidden(block: InvertedResidual, idx: list[int]) -> None:
    expand, dw, p = _parts(block)
    if expand is None:
        raise ValueError("block has no expansion conv")
    seq = _seq(block.conv)
    expand[0] = slice_conv_out(_conv(expand, 0), idx)
    expand[1] = slice_bn(_bn(expand, 1), idx)
    dw[0] = slice_conv_depthwise(_conv(dw, 0), idx)
    dw[1] = slice_bn(_bn(dw, 1), idx)
    seq[p] = slice_conv_in(_conv(seq, p), idx)
