"""Tensor surgery: new modules holding exactly the selected slices, hyper-parameters preserved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from m2mdc.arch.surgery import (
    slice_bn,
    slice_conv_depthwise,
    slice_conv_in,
    slice_conv_out,
    slice_linear_in,
)


def _conv(**kw) -> nn.Conv2d:
    torch.manual_seed(0)
    args = dict(kernel_size=3, stride=2, padding=2, dilation=2, bias=True, dtype=torch.float64)
    args.update(kw)
    return nn.Conv2d(6, 8, **args)


def test_conv_out_keeps_selected_rows_and_hyper_parameters():
    conv = _conv()
    conv.weight.requires_grad_(False)
    conv.eval()
    new = slice_conv_out(conv, [5, 1, 2])  # unsorted on purpose: kept in ascending order
    idx = torch.tensor([1, 2, 5])
    assert new is not conv and new.out_channels == 3 and new.in_channels == 6
    assert torch.equal(new.weight, conv.weight.index_select(0, idx))
    assert torch.equal(new.bias, conv.bias.index_select(0, idx))
    assert (new.stride, new.padding, new.dilation, new.kernel_size) == (
        (2, 2),
        (2, 2),
        (2, 2),
        (3, 3),
    )
    assert new.weight.dtype == torch.float64 and new.weight.device == conv.weight.device
    assert not new.weight.requires_grad and new.bias.requires_grad
    assert not new.training
    assert new.weight.is_contiguous()


def test_conv_in_slices_columns_and_keeps_bias_absent():
    conv = _conv(bias=False)
    new = slice_conv_in(conv, [0, 4])
    assert new.bias is None and new.in_channels == 2 and new.out_channels == 8
    assert torch.equal(new.weight, conv.weight[:, [0, 4]])
    x = torch.randn(1, 6, 9, 9, dtype=torch.float64)
    x[:, [1, 2, 3, 5]] = 0  # dropped channels carry nothing -> same output
    assert torch.allclose(new(x[:, [0, 4]]), conv(x))


def test_results_own_their_storage():
    conv = _conv()
    new = slice_conv_out(conv, range(8))
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
    assert conv.weight.abs().sum() > 0 and conv.bias.abs().sum() > 0
    lin = nn.Linear(4, 3)
    new_lin = slice_linear_in(lin, [0, 1, 2, 3])
    with torch.no_grad():
        new_lin.bias.zero_()
    assert lin.bias.abs().sum() > 0


def test_depthwise_slices_in_out_and_groups_together():
    dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
    new = slice_conv_depthwise(dw, [4, 0])
    assert new.in_channels == new.out_channels == new.groups == 2
    assert torch.equal(new.weight, dw.weight[[0, 4]])
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(new(x[:, [0, 4]]), dw(x)[:, [0, 4]])
    with pytest.raises(ValueError, match="not depthwise"):
        slice_conv_depthwise(_conv(), [0])


def test_grouped_conv_cannot_be_sliced_on_one_side():
    conv = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        slice_conv_out(conv, [0])
    with pytest.raises(ValueError, match="groups=2"):
        slice_conv_in(conv, [0])


def test_bn_keeps_stats_affine_and_batch_counter():
    bn = nn.BatchNorm2d(5, eps=1e-3, momentum=0.3)
    bn.train()
    bn(torch.randn(4, 5, 3, 3))
    bn(torch.randn(4, 5, 3, 3))
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    new = slice_bn(bn, [3, 1])
    idx = torch.tensor([1, 3])
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(new, name), getattr(bn, name).index_select(0, idx)), name
    assert int(new.num_batches_tracked) == 2
    assert (new.eps, new.momentum, new.num_features, new.training) == (1e-3, 0.3, 2, True)
    assert isinstance(new.weight, nn.Parameter) and "running_mean" in dict(new.named_buffers())


def test_bn_without_affine_or_stats():
    bn = nn.BatchNorm2d(4, affine=False, track_running_stats=False)
    new = slice_bn(bn, [0, 2])
    assert new.weight is None and new.running_mean is None and new.num_features == 2


def test_linear_in_selects_feature_columns():
    lin = nn.Linear(6, 3)
    new = slice_linear_in(lin, [5, 2])
    assert torch.equal(new.weight, lin.weight[:, [2, 5]])
    assert torch.equal(new.bias, lin.bias) and new.bias.data_ptr() != lin.bias.data_ptr()
    assert (new.in_features, new.out_features) == (2, 3)


@pytest.mark.parametrize(
    ("idx", "match"),
    [
        ([], "empty"),
        ([1, 1], "duplicate index 1"),
        ([0, 8], "index 8 is out of range"),
        ([-1], "-1"),
    ],
)
def test_bad_index_lists_are_value_errors(idx, match):
    with pytest.raises(ValueError, match=match):
        slice_conv_out(_conv(), idx)
