"""Exact compute of the generic adapter's families: m2mdc's counters against torchvision's
published figures at 224x224 and 1000 classes.

Source: torchvision's model documentation (https://pytorch.org/vision/stable/models.html,
the "Params" and "GFLOPS" columns of the classification table; torchvision's GFLOPS count one
multiply-add as one operation, i.e. they are GMACs). The same figures ship with torchvision as
``<Model>_Weights.IMAGENET1K_V1.meta["num_params"]`` and ``meta["_ops"]`` (3 decimals), which
the test also checks, so a torchvision release that changed a model would be noticed.

Counting rules that could differ and do not: the squeeze-excitation 1x1 convs are convs (counted),
its channel scale is an element-wise product (not counted); LayerNorm, BatchNorm, activations
and residual additions are not multiply-accumulates of a weight layer (not counted).
"""

from __future__ import annotations

import pytest
import torchvision

from m2mdc.arch import get_adapter
from m2mdc.profiling import count_macs, count_params

# name -> (params, GMACs) from torchvision's documentation
DOCUMENTED = {
    "resnet50": (25_557_032, 4.09),
    "resnet101": (44_549_160, 7.80),
    "wide_resnet50_2": (68_883_240, 11.40),
    "resnext50_32x4d": (25_028_904, 4.23),
    "regnet_y_400mf": (4_344_144, 0.40),
    "mobilenet_v3_large": (5_483_032, 0.22),
    "efficientnet_b0": (5_288_548, 0.39),
    "convnext_tiny": (28_589_128, 4.46),
}


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_params_and_macs_match_torchvision_documentation(name):
    params, gmacs = DOCUMENTED[name]
    model = torchvision.models.get_model(name, weights=None, num_classes=1000)
    macs = count_macs(model, 224)["macs"]
    assert count_params(model) == params
    assert round(macs / 1e9, 2) == gmacs
    meta = torchvision.models.get_model_weights(name).IMAGENET1K_V1.meta
    assert meta["num_params"] == params
    assert round(macs / 1e9, 3) == pytest.approx(meta["_ops"], abs=1e-9)


def test_generic_adapter_model_is_torchvisions_for_the_counters():
    """What ``m2mdc profile`` counts for ``model=auto model.name=resnet50``: the generic
    adapter builds torchvision's model unchanged (1000 classes: the documented figures)."""
    name = "torchvision:resnet50"
    model = get_adapter(name).create(name, 1000)
    assert count_params(model) == DOCUMENTED["resnet50"][0]
    assert round(count_macs(model, 224)["macs"] / 1e9, 2) == DOCUMENTED["resnet50"][1]
