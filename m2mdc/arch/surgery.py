"""Index slicing of Conv2d, BatchNorm2d and Linear: the only place that cuts tensors.

Every function returns a NEW module that holds exactly the selected slices of the source's
tensors (fresh storage, contiguous), with the same dtype, device, ``requires_grad`` flags, train
mode and hyper-parameters (stride, padding, dilation, padding mode, bias presence, BN eps and
momentum). The source module is never modified.

Index lists are channel positions in the source module; they are sorted ascending before use,
so the kept channels keep their relative order. An empty list, a duplicate or an index outside
``[0, size)`` raises ValueError: plans are produced by code, so a bad one is a bug.

Example:
    >>> conv = nn.Conv2d(8, 16, 3, padding=1)
    >>> slice_conv_out(conv, [0, 3, 5]).weight.shape
    torch.Size([3, 8, 3, 3])
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "slice_bn",
    "slice_conv_depthwise",
    "slice_conv_in",
    "slice_conv_out",
    "slice_linear_in",
]


def _index(idx: Sequence[int], size: int, what: str, device: torch.device) -> torch.Tensor:
    """Sorted, validated index tensor for ``index_select`` on a dimension of ``size``."""
    kept = sorted(int(i) for i in idx)
    if not kept:
        raise ValueError(f"{what}: empty index list; at least one channel must be kept")
    if len(set(kept)) != len(kept):
        dup = next(a for a, b in itertools.pairwise(kept) if a == b)
        raise ValueError(f"{what}: duplicate index {dup}")
    if kept[0] < 0 or kept[-1] >= size:
        bad = kept[0] if kept[0] < 0 else kept[-1]
        raise ValueError(f"{what}: index {bad} is out of range for {size} channels")
    return torch.tensor(kept, dtype=torch.long, device=device)


def _param(data: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    # index_select already allocates fresh storage; clone() guards the full-dimension case where
    # a future refactor might return a view of the source.
    return nn.Parameter(data.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _new_conv(
    conv: nn.Conv2d,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_channels: int,
    out_channels: int,
    groups: int,
) -> nn.Conv2d:
    # Built on the meta device so no throw-away initialisation is computed; every tensor is
    # replaced right after.
    new = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=groups,
        bias=bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
        dtype=conv.weight.dtype,
    )
    new.weight = _param(weight, conv.weight)
    if bias is not None and conv.bias is not None:
        new.bias = _param(bias, conv.bias)
    new.train(conv.training)
    return new


def _require_dense(conv: nn.Conv2d, what: str) -> None:
    if conv.groups != 1:
        raise ValueError(
            f"{what}: conv has groups={conv.groups}; only dense convs can be sliced on one side "
            "(use slice_conv_depthwise for depthwise convs)"
        )


def slice_conv_out(conv: nn.Conv2d, idx: Sequence[int]) -> nn.Conv2d:
    """Keep output channels ``idx`` of a dense (groups=1) conv: weight rows and bias entries.

    Raises:
        ValueError: grouped conv, or invalid ``idx``.
    """
    _require_dense(conv, "slice_conv_out")
    index = _index(idx, conv.out_channels, "slice_conv_out", conv.weight.device)
    with torch.no_grad():
        weight = conv.weight.index_select(0, index)
        bias = None if conv.bias is None else conv.bias.index_select(0, index)
    return _new_conv(conv, weight, bias, conv.in_channels, len(index), 1)


def slice_conv_in(conv: nn.Conv2d, idx: Sequence[int]) -> nn.Conv2d:
    """Keep input channels ``idx`` of a dense (groups=1) conv; bias untouched.

    Raises:
        ValueError: grouped conv, or invalid ``idx``.
    """
    _require_dense(conv, "slice_conv_in")
    index = _index(idx, conv.in_channels, "slice_conv_in", conv.weight.device)
    with torch.no_grad():
        weight = conv.weight.index_select(1, index)
        bias = None if conv.bias is None else conv.bias.detach()
    return _new_conv(conv, weight, bias, len(index), conv.out_channels, 1)


def slice_conv_depthwise(conv: nn.Conv2d, idx: Sequence[int]) -> nn.Conv2d:
    """Keep channels ``idx`` of a depthwise conv (groups == in == out): in, out and groups shrink
    together, since each output channel reads only its own input channel.

    Raises:
        ValueError: not a depthwise conv, or invalid ``idx``.
    """
    if not conv.groups == conv.in_channels == conv.out_channels:
        raise ValueError(
            f"slice_conv_depthwise: conv is not depthwise (in={conv.in_channels}, "
            f"out={conv.out_channels}, groups={conv.groups})"
        )
    index = _index(idx, conv.out_channels, "slice_conv_depthwise", conv.weight.device)
    with torch.no_grad():
        weight = conv.weight.index_select(0, index)
        bias = None if conv.bias is None else conv.bias.index_select(0, index)
    n = len(index)
    return _new_conv(conv, weight, bias, n, n, n)


def slice_bn(bn: nn.BatchNorm2d, idx: Sequence[int]) -> nn.BatchNorm2d:
    """Keep channels ``idx`` of a BatchNorm2d: affine weight/bias and running mean/var;
    ``num_batches_tracked`` is copied unchanged.

    Raises:
        ValueError: invalid ``idx``.
    """
    ref = bn.weight if bn.weight is not None else bn.running_mean
    device = ref.device if ref is not None else torch.device("cpu")
    index = _index(idx, bn.num_features, "slice_bn", device)
    new = nn.BatchNorm2d(
        len(index),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device="meta",
    )
    with torch.no_grad():
        if bn.weight is not None and bn.bias is not None:
            new.weight = _param(bn.weight.index_select(0, index), bn.weight)
            new.bias = _param(bn.bias.index_select(0, index), bn.bias)
        if bn.running_mean is not None and bn.running_var is not None:
            new.running_mean = bn.running_mean.index_select(0, index).clone()
            new.running_var = bn.running_var.index_select(0, index).clone()
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked = bn.num_batches_tracked.clone()
    new.train(bn.training)
    return new


def slice_linear_in(linear: nn.Linear, idx: Sequence[int]) -> nn.Linear:
    """Keep input features ``idx`` of a Linear layer; outputs and bias untouched.

    Raises:
        ValueError: invalid ``idx``.
    """
    index = _index(idx, linear.in_features, "slice_linear_in", linear.weight.device)
    new = nn.Linear(
        len(index),
        linear.out_features,
        bias=linear.bias is not None,
        device="meta",
        dtype=linear.weight.dtype,
    )
    with torch.no_grad():
        new.weight = _param(linear.weight.index_select(1, index), linear.weight)
        if linear.bias is not None:
            new.bias = _param(linear.bias, linear.bias)
    new.train(linear.training)
    return new


def resize_to_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Give every Conv2d, BatchNorm2d and Linear of ``model`` the shape its tensors have in
    ``state`` (a channel-pruned copy of the same architecture, e.g. from Torch-Pruning).

    The resized modules are new and uninitialised in value (built on the meta device, then
    materialised empty): the caller loads ``state`` into the model next, strictly. Depthwise
    convs stay depthwise (groups follow the channel count); other convs keep their groups.
    LayerNorms (subclasses included) keep their class and take the new shape; any other
    parameter of another shape (a block's own layer scale) becomes an empty tensor of it.

    Returns:
        The names of the modules that were replaced.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        own = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or own is None or weight.shape == own.shape:
            continue
        new: nn.Module
        if isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels
            groups = int(weight.shape[0]) if depthwise else module.groups
            new = nn.Conv2d(
                int(weight.shape[1]) * groups,
                int(weight.shape[0]),
                kernel_size=module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,  # type: ignore[arg-type]
                groups=groups,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
                device="meta",
            )
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(
                int(weight.shape[0]),
                eps=module.eps,
                momentum=module.momentum,
                affine=module.affine,
                track_running_stats=module.track_running_stats,
                device="meta",
            )
        elif isinstance(module, nn.Linear):
            new = nn.Linear(
                int(weight.shape[1]),
                int(weight.shape[0]),
                bias=module.bias is not None,
                device="meta",
            )
        elif isinstance(module, nn.LayerNorm):  # its subclass too (ConvNeXt's LayerNorm2d)
            module.normalized_shape = tuple(int(d) for d in weight.shape)
            replaced.append(name)
            continue
        else:
            continue
        new = new.to_empty(device=own.device)
        new.train(module.training)
        model.set_submodule(name, new)
        replaced.append(name)
    _resize_parameters(model, state)
    return replaced


def _resize_parameters(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give every parameter whose shape differs from ``state``'s (a LayerNorm's, a layer scale
    held by its block) an empty tensor of that shape, for the strict load that follows."""
    for key, param in list(model.named_parameters()):
        want = state.get(key)
        if isinstance(want, torch.Tensor) and want.shape != param.shape:
            owner, _, leaf = key.rpartition(".")
            empty = torch.empty(want.shape, dtype=param.dtype, device=param.device)
            setattr(model.get_submodule(owner), leaf, nn.Parameter(empty, param.requires_grad))
