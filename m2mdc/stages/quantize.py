"""quantize: INT8 models of the run's compressed models, measured in ONNX Runtime.

``m2mdc quantize`` (and ``m2mdc run`` with ``quantize.enabled=true``, after the profile). The
teacher and every compressed model the run holds (block_kd, inner_slice, the Torch-Pruning
peers; :data:`~m2mdc.rows.QUANTIZED_ROWS`) are exported to FP32 ONNX by the export stage's exporter
and quantized by ONNX Runtime (:mod:`m2mdc.int8`: QDQ, per-channel int8 weights), calibrated on
``quantize.calibration_samples`` training images (a fixed, class-mixed order seeded by
``seed``, preprocessed as for evaluation). Per model, ``quantize/metrics.json`` records:

* ``fp32_ort_top1`` and ``int8_top1`` on the reporting split (``top1_split``), beside
  ``torch_top1``, the PyTorch module's on the same images;
* ``fp32_ort_bytes`` and ``int8_bytes``, the model files' sizes;
* ``fp32_ort_latency_ms`` / ``int8_latency_ms`` (batch 1) and ``..._b<N>`` for every other
  ``quantize.batch_sizes`` entry: medians, every session of the run timed interleaved in this
  process on ``threads`` intra-op threads (torch's count), with ``int8_speedup(_b<N>)``.

The files are ``quantize/<row>/fp32.onnx`` and ``int8.onnx``. Like the profile, the stage
measures whatever models the run holds: a new or retrained teacher or compressed model makes it
stale, and it is recomputed (a comparison teacher, which it does not quantize, does not).
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from m2mdc import int8
from m2mdc.artifacts import atomic_write_json
from m2mdc.data.datasets import class_interleaved_order
from m2mdc.data.loader import Batches
from m2mdc.errors import M2MError
from m2mdc.profiling import batch_schedule
from m2mdc.rows import COMPRESSED_ROWS, QUANTIZED_ROWS, finished_models
from m2mdc.stage import Context, Stage, register_stage
from m2mdc.stages.export import EXPORTERS
from m2mdc.stages.profile import latency_key
from m2mdc.train.loop import evaluate
from m2mdc.ui import console, plural, table

NAME = "quantize"
EXPORT_SAMPLE = 4  # images the exporter traces with (and checks FP32 parity on)
# the keys of a model's entry that summary.json copies into its row
COLUMN_PREFIXES = ("int8_", "fp32_ort_")


def quantized_rows(ctx: Context) -> dict[str, str]:
    """Row -> stage of the teacher and every compressed model the run holds, in pipeline
    order."""
    return {r: st for r, st in finished_models(ctx.run_dir).items() if r in QUANTIZED_ROWS}


def model_fingerprints(ctx: Context) -> dict[str, str | None]:
    """Row -> fingerprint of the models it quantizes: its fingerprint input (a new or
    retrained teacher or compressed model makes its outputs stale; a new comparison teacher
    does not)."""
    return {r: fp for r, fp in ctx.model_fingerprints().items() if r in QUANTIZED_ROWS}


def calibration_batches(ctx: Context) -> Batches:
    """``quantize.calibration_samples`` training images in a fixed order seeded by ``seed``
    that visits the classes round robin, preprocessed as for evaluation, on the CPU."""
    cfg = ctx.cfg
    train = ctx.data("train")
    n = min(int(cfg.quantize.calibration_samples), len(train))
    return Batches(
        train,
        int(cfg.dataset.eval_batch_size),
        int(cfg.dataset.image_size),
        order=class_interleaved_order(train.labels, seed=int(cfg.seed))[:n],
        split="train",
    )


def _deploy_one(ctx: Context, row: str, model: nn.Module, calib: Batches) -> dict[str, Any]:
    """Export ``model`` to FP32 ONNX, quantize it; the files and the export's parity."""
    out = ctx.stage_dir(f"{NAME}/{row}")
    fp32, q8 = out / "fp32.onnx", out / "int8.onnx"
    x = next(iter(calib))[0]
    x = x[torch.arange(EXPORT_SAMPLE) % len(x)]
    model = model.cpu().eval()
    with torch.inference_mode():
        ref = model(x)
    got = EXPORTERS["onnx"](model, x, fp32)
    int8.quantize(fp32, q8, calib)
    return {
        "files": {"fp32": f"{NAME}/{row}/{fp32.name}", "int8": f"{NAME}/{row}/{q8.name}"},
        "export_max_abs_diff": float((got - ref).abs().max()),
        "fp32_ort_bytes": fp32.stat().st_size,
        "int8_bytes": q8.stat().st_size,
    }


def _time(
    ctx: Context, sessions: dict[tuple[str, str], Any], rows: dict[str, dict]
) -> dict[str, dict[str, int]]:
    """Latency of every session at every ``quantize.batch_sizes``, interleaved, into
    ``rows`` (``<precision>_latency_ms[_b<N>]``), and INT8's speedup over FP32.

    Returns:
        batch size -> the timed rounds and warm-up passes at that size.
    """
    cfg = ctx.cfg.quantize
    schedule: dict[str, dict[str, int]] = {}
    named = {f"{row}/{p}": s for (row, p), s in sessions.items()}
    for bs in (int(b) for b in cfg.batch_sizes):
        repeats, warmup = batch_schedule(bs, int(cfg.latency_repeats), int(cfg.latency_warmup))
        schedule[str(bs)] = {"repeats": repeats, "warmup": warmup}
        times = int8.latencies(named, int(ctx.cfg.dataset.image_size), bs, warmup, repeats)
        for row, m in rows.items():
            for p in ("fp32_ort", "int8"):
                m[f"{p}_{latency_key(bs)}"] = statistics.median(times[f"{row}/{p}"])
            fp, q = m[f"fp32_ort_{latency_key(bs)}"], m[f"int8_{latency_key(bs)}"]
            m[f"int8_{latency_key(bs, 'speedup')}"] = fp / q if q else None
    return schedule


def run(ctx: Context) -> dict[str, Any]:
    found = quantized_rows(ctx)
    if not set(found) & set(COMPRESSED_ROWS):  # the teacher alone is no deployment
        raise M2MError(
            f"quantize needs a run directory with a compressed model ({', '.join(COMPRESSED_ROWS)}"
            f"); {ctx.run_dir} has none: run `m2mdc run` (or the stages up to distill) first"
        )
    threads = torch.get_num_threads()
    calib, evals = calibration_batches(ctx), ctx.eval_batches()
    fingerprints = model_fingerprints(ctx)
    rows: dict[str, dict[str, Any]] = {}
    sessions: dict[tuple[str, str], Any] = {}
    for row, st in found.items():
        model = ctx.load_model(st, expect=False)
        m: dict[str, Any] = {"stage": st, "model_fingerprint": fingerprints[row]}
        m["torch_top1"] = evaluate(model, evals)["top1"]
        m |= _deploy_one(ctx, row, model, calib)
        for p, key in (("fp32_ort", "fp32"), ("int8", "int8")):
            sessions[row, p] = int8.session(ctx.run_dir / m["files"][key], threads)
            m[f"{p}_top1"] = int8.top1(sessions[row, p], evals)
        m["int8_top1_delta"] = m["int8_top1"] - m["fp32_ort_top1"]
        m["int8_size_ratio"] = m["int8_bytes"] / m["fp32_ort_bytes"]
        rows[row] = m
    schedule = _time(ctx, sessions, rows)
    metrics = _record(ctx, rows, threads, calib) | {"latency_schedule": schedule}
    atomic_write_json(ctx.stage_dir(NAME) / "metrics.json", metrics)
    _print(metrics)
    return metrics


def _record(
    ctx: Context, rows: dict[str, dict[str, Any]], threads: int, calib: Batches
) -> dict[str, Any]:
    return {
        "backend": "onnxruntime",
        "onnxruntime_version": int8.version(),
        "format": "QDQ",
        "per_channel": True,
        "activations": int8.ACTIVATIONS,
        "weights": int8.WEIGHTS,
        "calibration": {
            "method": "MinMax",
            "samples": calib.num_examples,
            "split": "train",
            "seed": int(ctx.cfg.seed),
        },
        "top1_split": ctx.eval_split,
        "input_size": int(ctx.cfg.dataset.image_size),
        "threads": threads,
        "device": "cpu",
        "batch_sizes": [int(b) for b in ctx.cfg.quantize.batch_sizes],
        "models": rows,
    }


def _print(metrics: dict[str, Any]) -> None:
    cols = ["model", "torch_top1", "fp32_ort_top1", "int8_top1", "fp32_ort_bytes", "int8_bytes"]
    cols += [k for k in next(iter(metrics["models"].values())) if "latency" in k or "speed" in k]
    rows = [{"model": k, **v} for k, v in metrics["models"].items()]
    title = (
        f"quantize: INT8 (QDQ, calibrated on {metrics['calibration']['samples']} training "
        f"images) vs FP32 in ONNX Runtime ({metrics['top1_split']} top1, "
        f"{plural(metrics['threads'], 'thread')})"
    )
    console.print(table(title, cols, rows))


register_stage(
    Stage(
        name=NAME,
        command="quantize",
        requires=(),
        keys=("quantize", "dataset", "seed"),
        # whether `m2mdc run` runs it changes nothing it produces
        ignore=("quantize.enabled",),
        run=run,
        extra=model_fingerprints,
        # `m2mdc quantize` always; `m2mdc run` when enabled
        enabled=lambda cfg: bool(cfg.quantize.enabled) or cfg.command == "quantize",
        derived=True,
    )
)
