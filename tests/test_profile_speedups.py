"""profile: interleaved latency of several models and the realised-speedup columns."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from m2mdc.profiling import measure_latencies
from m2mdc.stages.profile import add_ratios, latency_key


def test_measure_latencies_times_every_model() -> None:
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))
    big = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3), nn.AdaptiveAvgPool2d(1))
    got = measure_latencies({"small": small, "big": big}, 16, batch_size=2, warmup=1, repeats=3)
    assert set(got) == {"small", "big"}
    for lat in got.values():
        assert lat["latency_ms"] > 0 and lat["batch_size"] == 2 and lat["repeats"] == 3
        assert lat["threads"] == torch.get_num_threads()


def test_latency_keys() -> None:
    assert latency_key(1) == "latency_ms" and latency_key(64) == "latency_ms_b64"
    assert latency_key(64, "latency_speedup") == "latency_speedup_b64"


def test_add_ratios_against_the_first_row() -> None:
    rows = {
        "teacher": {"params": 100, "macs": 400, "latency_ms": 10.0, "latency_ms_b64": 100.0},
        "student": {"params": 50, "macs": 100, "latency_ms": 5.0, "latency_ms_b64": 40.0},
    }
    add_ratios(rows, [1, 64])
    s = rows["student"]
    assert s["mac_ratio"] == 4.0
    assert s["latency_speedup"] == 2.0 and s["latency_speedup_b64"] == 2.5
    assert s["speedup_over_mac_ratio"] == 0.5
    assert s["params_reduction_pct"] == 50.0 and s["macs_reduction_pct"] == 75.0
    assert "mac_ratio" not in rows["teacher"] and rows["teacher"]["macs_reduction_pct"] == 0.0


def test_add_ratios_without_latency() -> None:
    rows = {"a": {"params": 4, "macs": 4}, "b": {"params": 2, "macs": 1}}
    add_ratios(rows, [])
    assert rows["b"]["mac_ratio"] == 4.0 and "latency_speedup" not in rows["b"]


def test_profile_stage_writes_speedups(compose_cfg, tmp_path) -> None:
    from m2mdc.stage import Context
    from m2mdc.stages import profile

    cfg = compose_cfg(
        "dataset=fake",
        "dataset.num_classes=10",
        "device=cpu",
        "profile.input_size=32",
        "profile.latency_repeats=2",
        "profile.latency_warmup=0",
        "profile.batch_sizes=[1,4]",
        "prune.keep_cfg={layer1:[1],layer2:[0],layer3:[0,1],layer4:[0,1]}",
    )
    profile.run(Context(cfg, tmp_path))
    m = json.loads((tmp_path / "profile" / "metrics.json").read_text())["models"]
    student = m["keep_cfg"]
    assert student["mac_ratio"] == pytest.approx(m["resnet18"]["macs"] / student["macs"])
    for key in ("latency_ms", "latency_ms_b4", "latency_speedup", "latency_speedup_b4"):
        assert student[key] > 0
    assert student["speedup_over_mac_ratio"] == pytest.approx(
        student["latency_speedup"] / student["mac_ratio"]
    )
