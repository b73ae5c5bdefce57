"""Parameter / MAC counts against closed-form layer formulas, and latency bookkeeping."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from m2mdc.profiling import count_macs, count_params, measure_latency, profile_model


def conv(k: int, cin: int, cout: int, hw_out: int, groups: int = 1) -> int:
    """MACs of a k x k convolution: k*k*cin/groups*cout*H_out*W_out."""
    return k * k * (cin // groups) * cout * hw_out * hw_out


def resnet18_conv_macs_32() -> int:
    # 32x32 input: stem 7x7/2 -> 16, maxpool -> 8; layer1 8x8, layer2 4x4, layer3 2x2, layer4 1x1
    total = conv(7, 3, 64, 16)
    total += 4 * conv(3, 64, 64, 8)  # layer1: two blocks, two 3x3 convs each
    for cin, cout, hw in [(64, 128, 4), (128, 256, 2), (256, 512, 1)]:
        total += conv(3, cin, cout, hw) + conv(3, cout, cout, hw)  # block 0: conv1, conv2
        total += conv(1, cin, cout, hw)  # block 0: 1x1/2 downsample
        total += 2 * conv(3, cout, cout, hw)  # block 1
    return total


def test_resnet18_params_and_macs_match_closed_form() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    assert count_params(model) == 11_181_642
    got = count_macs(model, 32)
    assert got["conv_macs"] == resnet18_conv_macs_32() == 37_011_456
    assert got["macs"] == got["conv_macs"] + 512 * 10  # + fc; BN/pool/ReLU/add excluded


def mobilenet_v2_conv_macs_32() -> int:
    # stem 3x3/2: 32 -> 16; (expansion t, out c, repeats n, first stride s) per torchvision
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip
    hw, cin = 16, 32
    total = conv(3, 3, 32, hw)
    for t, c, n, s in settings:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            hw_out = (hw + 2 - 3) // stride + 1  # 3x3 depthwise, padding 1
            if t != 1:
                total += conv(1, cin, hidden, hw)  # expansion
            total += conv(3, hidden, hidden, hw_out, groups=hidden)  # depthwise
            total += conv(1, hidden, c, hw_out)  # projection
            hw, cin = hw_out, c
    assert hw == 1  # spatial path 16, 16, 8, 4, 2, 2, 1, 1
    return total + conv(1, 320, 1280, hw)  # last 1x1 conv


def test_mobilenet_v2_conv_macs_match_closed_form() -> None:
    model = torchvision.models.mobilenet_v2(num_classes=10)
    got = count_macs(model, 32)
    assert got["conv_macs"] == mobilenet_v2_conv_macs_32()
    assert got["macs"] == got["conv_macs"] + 1280 * 10


def test_count_macs_leaves_model_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer: 4*6*6 -> 2
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = count_macs(model, 8)
    assert got == {"conv_macs": 27 * 4 * 36, "macs": 27 * 4 * 36 + 144 * 2}
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_latency_is_positive_and_records_threads() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    lat = measure_latency(model, 16, batch_size=2, warmup=1, repeats=4)
    assert lat["latency_ms"] > 0 and lat["latency_p90_ms"] >= lat["latency_ms"]
    assert lat["threads"] == torch.get_num_threads()
    assert lat["batch_size"] == 2 and lat["device"] == "cpu"


def test_profile_model_combines_counts() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    out = profile_model(model, 4, repeats=2, warmup=0)
    assert out["params"] == 6 + 32 * 3 + 3
    assert out["conv_macs"] == 6 * 16 and out["macs"] == 6 * 16 + 96
    assert out["input_size"] == 4 and out["latency_ms"] > 0
    assert "latency_ms" not in profile_model(model, 4, latency=False)
