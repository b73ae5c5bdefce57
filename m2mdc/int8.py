"""Post-training static INT8 quantization in ONNX Runtime, and what is measured on its models.

ONNX Runtime's quantization tools (``pip install 'm2mdc[deploy]'``) turn an FP32 ONNX model
into a QDQ model: a QuantizeLinear / DequantizeLinear pair on every quantized tensor, weights
int8 with one scale per output channel, activations uint8 with one scale per tensor. (Uint8
activations: on an AVX2 CPU without VNNI, ONNX Runtime ran the inner_slice ResNet-18 student
with int8 activations 20x slower than in FP32 at batch 1, with uint8 ones faster.) The
activation ranges are the minimum and maximum over a fixed set of calibration images, read
through a ``CalibrationDataReader`` in the evaluation preprocessing
(:class:`~m2mdc.data.loader.Batches`).

Every session runs on the CPU with ``intra_op_num_threads`` set to torch's thread count, so
ONNX Runtime and PyTorch timings of one machine use the same cores.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from m2mdc.data.loader import Batches
from m2mdc.extras import require
from m2mdc.fileio import create_temp_file
from m2mdc.profiling import interleaved

ACTIVATIONS, WEIGHTS = "uint8", "int8"  # the QDQ types (see the module docstring)


def _ort() -> ModuleType:
    try:
        import onnxruntime
        import onnxruntime.quantization
    except ImportError:
        require("INT8 quantization", "deploy")
        raise  # installed, yet broken: the import's own error
    return onnxruntime


def session(path: Path, threads: int) -> Any:
    """A CPU ``InferenceSession`` of ``path`` on ``threads`` intra-op threads, one inter-op."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def top1(sess: Any, batches: Batches) -> float:
    """Top-1 accuracy (percent) of an ONNX classifier over ``batches``."""
    name = sess.get_inputs()[0].name
    correct = 0
    for x, y in batches:
        logits = sess.run(None, {name: x.cpu().numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(1) == y.cpu()).sum())
    return 100.0 * correct / batches.num_examples


def _reader(batches: Batches, input_name: str) -> Any:
    """``batches`` as ONNX Runtime's ``CalibrationDataReader``: one input feed per batch."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.batches, None)
            return None if x is None else {input_name: x[0].cpu().numpy()}

        def rewind(self) -> None:
            self.batches = iter(batches)

    return Reader()


def quantize(fp32: Path, out: Path, calibration: Batches) -> None:
    """Write the INT8 QDQ model of ``fp32`` to ``out`` (atomically), calibrated on
    ``calibration``: per-channel int8 weights, uint8 activations, MinMax ranges.

    The model is first pre-processed as ONNX Runtime recommends (shape inference and graph
    optimisation, e.g. BatchNorm folded into the convolution before it). The same FP32 model
    and calibration images give a byte-identical file.
    """
    _ort()
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    tmp = [_temp(out, ".pre.onnx"), _temp(out, ".onnx")]
    try:  # their progress notes go to stdout: kept out of m2mdc's console
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(fp32), str(tmp[0]))
            quantize_static(
                str(tmp[0]),
                str(tmp[1]),
                _reader(calibration, _input_name(fp32)),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        os.replace(tmp[1], out)
    finally:
        for t in tmp:
            t.unlink(missing_ok=True)


def _temp(path: Path, suffix: str) -> Path:
    fd, tmp = create_temp_file(path.parent, f".{path.name}.", suffix)
    os.close(fd)
    return tmp


def _input_name(path: Path) -> str:
    import onnx

    return str(onnx.load(str(path), load_external_data=False).graph.input[0].name)


def latencies(
    sessions: Mapping[str, Any], input_size: int, batch_size: int, warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Times (ms) of ``repeats`` runs of each session on one seeded batch, interleaved
    (:func:`~m2mdc.profiling.interleaved`: one run of each per round), after ``warmup``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, input_size, input_size, generator=gen).numpy()
    calls = {
        name: functools.partial(_time_run, s, {s.get_inputs()[0].name: x})
        for name, s in sessions.items()
    }
    return interleaved(calls, warmup, repeats, f"ORT latency batch {batch_size}")


def _time_run(sess: Any, feed: dict[str, np.ndarray]) -> float:
    t0 = time.perf_counter()
    sess.run(None, feed)
    return (time.perf_counter() - t0) * 1000.0


def version() -> str:
    return str(_ort().__version__)
