"""export: write a model for deployment and check numerical parity with the PyTorch module.

``m2mdc export checkpoint=PATH export.format=torchscript|onnx|torch_export``; inside a run
directory without ``checkpoint`` it exports the most compressed model the run has
(inner_slice, else block_kd, else teacher). Each format is its own stage writing
``<run>/export/<format>/`` (``model.ts.pt``, ``model.onnx``, ``model.pt2`` and
``metrics.json``), so one run directory keeps every format exported from it. The exported file
is run on a sample batch and its outputs compared with the module's: the maximum absolute
difference is recorded and must stay within ``export.atol``. ``bytes`` is the size of
everything the model needs (an ONNX model's weights file too, if it has one).

TorchScript is deprecated upstream in favour of ``torch.export``; it is kept because many
deployment stacks still read it. ONNX needs the optional extra ``pip install m2mdc[onnx]``.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from m2mdc.artifacts import load_checkpoint
from m2mdc.errors import M2MError
from m2mdc.fileio import atomic_write_bytes, atomic_write_json, create_temp_file
from m2mdc.rows import finished_models
from m2mdc.stage import Context, Stage, register_stage
from m2mdc.ui import log

SUFFIX = {"torchscript": ".ts.pt", "onnx": ".onnx", "torch_export": ".pt2"}
# ONNX files are protobuf messages, which stop at 2 GB: a model with more weights than this
# (torch's own threshold) keeps them in ``model.onnx.data`` beside the model
ONNX_INLINE_LIMIT = 3 << 29  # 1.5 GiB


def _source(ctx: Context) -> tuple[nn.Module, str]:
    if ctx.cfg.checkpoint:
        model, _ = load_checkpoint(ctx.cfg.checkpoint)
        return model, str(ctx.cfg.checkpoint)
    found = finished_models(ctx.run_dir)
    for row in ("inner_slice", "block_kd", "block_pruned", "teacher"):
        if row in found:
            return ctx.load_model(found[row], expect=False).cpu(), f"{found[row]}/model.pt"
    raise M2MError(
        f"export needs checkpoint=PATH, or a run directory with models ({ctx.run_dir} has none)"
    )


def _torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, x)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        atomic_write_bytes(path, buf.getvalue())
        loaded = torch.jit.load(str(path))
    with torch.inference_mode():
        return loaded(x)


def _torch_export(model: nn.Module, x: torch.Tensor, path: Path) -> torch.Tensor:
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    atomic_write_bytes(path, buf.getvalue())
    loaded = torch.export.load(str(path))
    with torch.inference_mode():
        return loaded.module()(x)


def _onnx(model: nn.Module, x: torch.Tensor, path: Path) -> torch.Tensor:
    try:
        import onnxruntime as ort
    except ImportError:
        raise M2MError(
            "export.format=onnx needs onnx, onnxscript and onnxruntime: pip install 'm2mdc[onnx]'"
        ) from None
    try:
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            input_names=["x"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        )
    except ImportError as exc:
        raise M2MError(f"export.format=onnx: {exc}; pip install 'm2mdc[onnx]'") from None
    assert program is not None  # no destination given: the program is returned
    _save_onnx(program, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return torch.from_numpy(out)


def _save_onnx(program: Any, path: Path) -> None:
    """One self-contained file; weights beyond :data:`ONNX_INLINE_LIMIT` (protobuf files stop
    at 2 GB) go to ``<name>.data`` beside it, which the model names by that final name."""
    from onnxscript import ir

    data = _onnx_data(path)
    inits = program.model.graph.initializers.values()
    weights = sum(v.const_value.nbytes for v in inits if v.const_value is not None)
    if weights <= ONNX_INLINE_LIMIT:
        atomic_write_bytes(path, program.model_proto.SerializeToString())
        data.unlink(missing_ok=True)  # a side file of an earlier export
        return
    fd, tmp = create_temp_file(path.parent, f".{path.name}.")
    os.close(fd)
    try:  # the data file first, then the model that points at it appears by a rename
        ir.save(program.model, tmp, external_data=data.name)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _onnx_data(path: Path) -> Path:
    return path.with_name(path.name + ".data")


EXPORTERS = {"torchscript": _torchscript, "onnx": _onnx, "torch_export": _torch_export}


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    fmt = str(cfg.export.format)
    model, source = _source(ctx)
    model = model.cpu().eval()
    size = int(cfg.profile.input_size or cfg.dataset.image_size)
    g = torch.Generator().manual_seed(int(cfg.seed))
    x = torch.randn(int(cfg.export.batch_size), 3, size, size, generator=g)
    with torch.inference_mode():
        ref = model(x)
    out_dir = ctx.stage_dir(stage_name(fmt))
    path = out_dir / f"model{SUFFIX[fmt]}"
    got = EXPORTERS[fmt](model, x, path)
    diff = float((got.float() - ref.float()).abs().max())
    files = [f for f in (path, _onnx_data(path)) if f.is_file()]
    nbytes = sum(f.stat().st_size for f in files)  # the model and its weights file, if any
    metrics = {
        "format": fmt,
        "source": source,
        "path": str(path),
        "files": [f.name for f in files],
        "input_size": size,
        "batch_size": int(cfg.export.batch_size),
        "max_abs_diff": diff,
        "atol": float(cfg.export.atol),
        "bytes": nbytes,
    }
    atomic_write_json(out_dir / "metrics.json", metrics)
    if not diff <= float(cfg.export.atol):
        raise M2MError(
            f"export parity check failed: max |exported - pytorch| = {diff:.3g} > "
            f"export.atol={cfg.export.atol} ({path})"
        )
    log.info(
        f"export: {source} -> {path} ({fmt}, {nbytes / 1e6:.2f} MB); parity max abs diff {diff:.3g}"
    )
    return metrics


def stage_name(fmt: str) -> str:
    """Each format is its own stage, ``<run>/export/<format>/``: formats never replace each
    other in a run directory."""
    return f"export/{fmt}"


def _chosen(fmt: str) -> Callable[[DictConfig], bool]:
    return lambda cfg: str(cfg.export.format) == fmt


for _fmt in SUFFIX:
    register_stage(
        Stage(
            name=stage_name(_fmt),
            command="export",
            requires=(),
            keys=("export", "checkpoint", "profile.input_size", "dataset.image_size", "seed"),
            run=run,
            extra=Context.model_fingerprints,
            enabled=_chosen(_fmt),
        )
    )
