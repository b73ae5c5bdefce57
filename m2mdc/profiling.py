"""Parameters, multiply-accumulates (fvcore) and latency of a model.

Units follow the run-directory contract: ``params`` (count), ``macs`` and ``conv_macs``
(multiply-accumulates, never called FLOPs), ``latency_ms`` (milliseconds).

Example:
    >>> profile_model(model, input_size=32, repeats=10)
    {'params': 11181642, 'macs': 37016576, 'conv_macs': 37011456, 'input_size': 32, ...}
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from m2mdc.ui import progress

# The only operators counted: fvcore's convolution and matrix-product handles, each of which
# counts one fused multiply-add as one unit (so their totals are MACs).
_MATMUL_OPS = {"conv", "addmm", "linear", "matmul", "mm", "bmm", "einsum"}
# fvcore also counts these by default; they are not multiply-accumulates of a weight layer
# (and BN folds into the preceding conv at inference), so their handles are disabled.
_IGNORED_OPS = (
    "aten::batch_norm",
    "aten::group_norm",
    "aten::layer_norm",
    "aten::instance_norm",
    "aten::upsample_nearest2d",
    "aten::upsample_bilinear2d",
    "aten::adaptive_avg_pool2d",
    "aten::grid_sampler",
)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_chans: int = 3) -> dict[str, int]:
    """Multiply-accumulates of one ``1 x in_chans x input_size x input_size`` forward pass.

    Counted with fvcore's ``FlopCountAnalysis`` (traced on a deep copy, eval mode, CPU):
    convolutions ``k_h k_w (c_in / groups) c_out H_out W_out`` and linear / matmul layers
    ``in * out`` per output row. Batch norm, pooling, activations, element-wise additions
    and upsampling are excluded: they are cheap, memory-bound and (BN) folded into the conv
    at deployment.

    Returns:
        ``{"macs": conv + linear/matmul MACs, "conv_macs": convolution MACs only}``.
    """
    # fvcore imports torch.jit.script helpers that warn on import in recent torch releases.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    net = copy.deepcopy(model).cpu().eval()
    x = torch.zeros(1, in_chans, input_size, input_size)
    fvcore_log = logging.getLogger("fvcore")
    level = fvcore_log.level
    fvcore_log.setLevel(logging.ERROR)  # unsupported/uncalled-op notices are expected noise
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(net, x)
            analysis.set_op_handle(**dict.fromkeys(_IGNORED_OPS))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            by_op = analysis.by_operator()
    finally:
        fvcore_log.setLevel(level)
    macs = sum(int(v) for op, v in by_op.items() if op in _MATMUL_OPS)
    return {"macs": macs, "conv_macs": int(by_op.get("conv", 0))}


def measure_latency(
    model: nn.Module,
    input_size: int,
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    device: str = "cpu",
    in_chans: int = 3,
) -> dict[str, Any]:
    """Wall-clock forward latency of a deep copy of ``model`` (eval, ``torch.inference_mode``).

    Each of ``repeats`` timed forward passes follows ``warmup`` untimed ones; on CUDA the
    timing uses CUDA events after a synchronise so asynchronous kernels are fully counted.

    Returns:
        ``latency_ms`` (median over repeats), ``latency_p90_ms`` (90th percentile),
        ``batch_size``, ``threads`` (``torch.get_num_threads()``, the CPU intra-op threads,
        which latency depends on), ``device``, ``repeats``.
    """
    return measure_latencies(
        {"model": model},
        input_size,
        batch_size=batch_size,
        warmup=warmup,
        repeats=repeats,
        device=device,
        in_chans=in_chans,
    )["model"]


def measure_latencies(
    models: Mapping[str, nn.Module],
    input_size: int,
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    device: str = "cpu",
    in_chans: int = 3,
) -> dict[str, dict[str, Any]]:
    """:func:`measure_latency` of several models, timed by :func:`interleaved_times`, so
    their latency *ratios* (speedups) stay meaningful on a shared machine.

    Returns:
        name -> the :func:`measure_latency` fields of that model.
    """
    times = interleaved_times(models, input_size, batch_size, warmup, repeats, device, in_chans)
    out = {}
    for name, ts in times.items():
        p90 = statistics.quantiles(ts, n=10, method="inclusive")[-1] if len(ts) > 1 else ts[0]
        out[name] = {
            "latency_ms": statistics.median(ts),
            "latency_p90_ms": p90,
            "batch_size": batch_size,
            "threads": torch.get_num_threads(),
            "device": str(torch.device(device)),
            "repeats": repeats,
        }
    return out


def paired_latency(
    model: nn.Module,
    reference: nn.Module,
    input_size: int,
    repeats: int = 30,
    warmup: int = 5,
    device: str = "cpu",
) -> dict[str, Any]:
    """Batch-1 latency of ``model`` relative to ``reference``, timed by
    :func:`interleaved_times`.

    Each round times both models back to back, so ``latency_ratio`` (model / reference) is
    the median over rounds of the two times' ratio within a round: a load change on a shared
    machine between rounds cancels out of it.

    Returns:
        ``latency_ratio``, ``latency_ms`` and ``reference_latency_ms`` (medians over the
        rounds), ``threads``, ``device``, ``repeats``.
    """
    times = interleaved_times(
        {"model": model, "reference": reference}, input_size, 1, warmup, repeats, device
    )
    pairs = zip(times["model"], times["reference"], strict=True)
    return {
        "latency_ratio": statistics.median(m / r for m, r in pairs),
        "latency_ms": statistics.median(times["model"]),
        "reference_latency_ms": statistics.median(times["reference"]),
        "threads": torch.get_num_threads(),
        "device": str(torch.device(device)),
        "repeats": repeats,
    }


def interleaved_times(
    models: Mapping[str, nn.Module],
    input_size: int,
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    device: str = "cpu",
    in_chans: int = 3,
) -> dict[str, list[float]]:
    """Wall-clock times (ms) of ``repeats`` forward passes of deep copies of ``models`` (eval,
    ``torch.inference_mode``), interleaved by :func:`interleaved`, after ``warmup`` untimed
    passes of each.

    On CUDA the timing uses CUDA events after a synchronise so asynchronous kernels are fully
    counted. The input is drawn from a private generator: timing leaves the global random
    state alone.

    Returns:
        name -> the time of each round, in order.
    """
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("measure_latency needs repeats >= 1, warmup >= 0, batch_size >= 1")
    dev = torch.device(device)
    nets = {name: copy.deepcopy(m).to(dev).eval() for name, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, in_chans, input_size, input_size, generator=gen).to(dev)
    cuda = dev.type == "cuda"
    calls = {name: functools.partial(_time_forward, net, x, cuda) for name, net in nets.items()}
    with torch.inference_mode():
        return interleaved(calls, warmup, repeats, f"latency batch {batch_size}")


def interleaved(
    calls: Mapping[str, Callable[[], float]], warmup: int, repeats: int, label: str
) -> dict[str, list[float]]:
    """Times (ms) of ``repeats`` rounds of ``calls``, each of which runs one pass of something
    and returns the milliseconds it took, after ``warmup`` untimed calls of each.

    Every round calls each of them once in turn (the order alternating between rounds), so a
    change in machine load during the measurement hits all alike, and their per-round ratios
    stay meaningful on a shared machine.

    Returns:
        name -> the time of each round, in order.
    """
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    with progress() as bar:
        task = bar.add_task(label, total=repeats, unit="round")
        for r in range(repeats):
            for name in names if r % 2 == 0 else reversed(names):
                times[name].append(calls[name]())
            bar.update(task, completed=r + 1)
    return times


def batch_schedule(batch_size: int, repeats: int, warmup: int) -> tuple[int, int]:
    """``(repeats, warmup)`` of a latency measurement at ``batch_size``, given those at batch 1.

    A batch of ``bs`` images runs ``bs`` times longer and its timing is that much less noisy,
    so batches beyond 1 use ``max(5, ceil(repeats / sqrt(bs)))`` repeats and at most 2
    warm-up passes (batch 64: 5 and 2 instead of 30 and 5).
    """
    if batch_size <= 1:
        return repeats, warmup
    return max(5, math.ceil(repeats / math.sqrt(batch_size))), min(warmup, 2)


def _time_forward(net: nn.Module, x: torch.Tensor, cuda: bool) -> float:
    """Milliseconds of one forward pass of ``net`` on ``x``."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        net(x)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    net(x)
    return (time.perf_counter() - t0) * 1000.0


def profile_model(
    model: nn.Module, input_size: int, latency: bool = True, **latency_kwargs: Any
) -> dict[str, Any]:
    """``params``, ``macs``, ``conv_macs``, ``input_size`` and, when ``latency`` is true, the
    :func:`measure_latency` fields (``latency_kwargs`` are passed on)."""
    in_chans = int(latency_kwargs.get("in_chans", 3))
    out: dict[str, Any] = {"params": count_params(model)}
    out.update(count_macs(model, input_size, in_chans=in_chans))
    out["input_size"] = input_size
    if latency:
        out.update(measure_latency(model, input_size, **latency_kwargs))
    return out
