"""Execution-speed settings (config section ``perf``) applied by the training and eval loops.

Independent switches; all but ``fused_adam`` are off by default (the same modules, the same
inputs, full float32):

* ``channels_last``: the model's 4-D parameters and every input batch use the NHWC memory
  format (faster convolutions with cuDNN/oneDNN on many devices);
* ``amp``: ``none`` | ``bf16`` | ``fp16`` autocast around the forward passes. ``bf16`` works on
  CUDA and CPU (fast only on CPUs with native bfloat16, AVX512-BF16 or AMX: elsewhere it is
  emulated and many times slower, and a warning says so), ``fp16`` needs CUDA and trains
  through a :class:`torch.amp.GradScaler`;
* ``compile``: the forward passes go through :func:`torch.compile` (the module itself is left
  as it is, so its ``state_dict`` keys and checkpoints do not change);
* ``fused_adam`` (on by default): Adam's fused multi-tensor kernel instead of the
  per-parameter loop PyTorch uses on the CPU by default: the same update, equal up to float
  rounding (not bitwise), about 5x faster optimizer steps on a CPU (4.6 ms instead of 23 ms
  per step for a ResNet-18, 10-20 % of a training step at 32x32). Where the installed torch
  has no fused kernel for the device (CPU before torch 2.4), the per-parameter loop is used.
  ``perf.fused_adam=false`` reproduces results made with the per-parameter loop bit for bit.
* ``sync_bn``: under data-parallel training (:mod:`m2mdc.train.dist`), BatchNorm uses the
  statistics of the global batch rather than each rank's share, in training and in BatchNorm
  recalibration (a no-op in one process).

Like ``device``, these are execution settings rather than experiment settings: they are not
part of the stage fingerprints, so outputs made with different ``perf`` settings are
reused as they are.

Example:
    >>> fwd = prepare(model, cfg.perf, device)  # maybe channels_last, maybe compiled
    >>> with autocast(cfg.perf, device):
    ...     logits = fwd(as_input(x, cfg.perf))
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from m2mdc.errors import M2MError
from m2mdc.ui import log

AMP_DTYPES: dict[str, torch.dtype | None] = {
    "none": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Perf:
    """The resolved ``perf`` settings (what :func:`resolve` makes of a config node or None)."""

    channels_last: bool = False
    amp: str = "none"
    compile: bool = False
    fused_adam: bool = True
    sync_bn: bool = False

    @property
    def is_default(self) -> bool:
        return self == Perf()


DEFAULT = Perf()


def resolve(cfg: Any, device: torch.device | str | None = None) -> Perf:
    """A :class:`Perf` from a ``perf`` config node (DictConfig, dataclass, mapping or None),
    checked against ``device``.

    Raises:
        M2MError: an unknown ``amp`` value, or ``amp=fp16`` off CUDA.
    """
    if cfg is None:
        return DEFAULT
    if isinstance(cfg, Perf):
        p = cfg
    else:
        get = cfg.get if hasattr(cfg, "get") else lambda k, d: getattr(cfg, k, d)
        p = Perf(
            channels_last=bool(get("channels_last", False)),
            amp=str(get("amp", "none")),
            compile=bool(get("compile", False)),
            fused_adam=bool(get("fused_adam", True)),
            sync_bn=bool(get("sync_bn", False)),
        )
    if p.amp not in AMP_DTYPES:
        raise M2MError(f"perf.amp={p.amp!r} is not valid; choose one of: {', '.join(AMP_DTYPES)}")
    if device is not None and p.amp == "fp16" and torch.device(device).type != "cuda":
        raise M2MError(
            "perf.amp=fp16 needs a CUDA device (float16 autocast with a gradient scaler); "
            "use perf.amp=bf16 on the CPU, or perf.amp=none"
        )
    return p


def prepare(model: nn.Module, cfg: Any, device: torch.device | str) -> nn.Module:
    """Apply ``channels_last`` to ``model`` (in place) and return the module to call for the
    forward pass: ``model`` itself, or a :func:`torch.compile` wrapper sharing its parameters.

    Train/eval switches and ``state_dict`` should keep going to ``model``.
    """
    p = resolve(cfg, device)
    if p.amp == "bf16" and torch.device(device).type == "cpu":
        _warn_slow_cpu_bf16()
    apply_memory_format(model, p)
    if p.compile:
        return torch.compile(model)  # type: ignore[return-value]
    return model


_warned: set[str] = set()


def _warn_slow_cpu_bf16() -> None:
    if "bf16" in _warned:
        return
    _warned.add("bf16")
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # a private probe; unknown means: say nothing
        return
    if not native:
        log.warning(
            "perf.amp=bf16 on a CPU without native bfloat16 (AVX512-BF16/AMX): emulated, "
            "typically much slower than perf.amp=none here"
        )


def apply_memory_format(model: nn.Module, cfg: Any) -> nn.Module:
    """``model`` with its 4-D weights in channels_last when ``perf.channels_last`` is set
    (in place; returns ``model``)."""
    if resolve(cfg).channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def compiled(fn: F, cfg: Any) -> F:
    """``fn`` (a forward function closing over modules, e.g. ``adapter.forward_features``)
    through :func:`torch.compile` when ``perf.compile`` is set, else ``fn`` itself."""
    if resolve(cfg).compile:
        return torch.compile(fn)  # type: ignore[return-value]
    return fn


def as_input(x: torch.Tensor, cfg: Any) -> torch.Tensor:
    """An input batch in the memory format the model expects (no copy by default)."""
    if x.dim() == 4 and resolve(cfg).channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(cfg: Any, device: torch.device | str) -> AbstractContextManager[Any]:
    """Autocast to the ``perf.amp`` dtype on ``device``; a no-op context for ``amp=none``."""
    p = resolve(cfg, device)
    dtype = AMP_DTYPES[p.amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def adam(params: list[Any], lr: float, cfg: Any) -> torch.optim.Adam:
    """Adam over ``params`` (parameters, or parameter groups); the fused implementation when
    ``perf.fused_adam`` is set and the installed torch has one for the parameters' device (else
    the per-parameter loop)."""
    if params and resolve(cfg).fused_adam:
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)
        except RuntimeError as e:  # no fused kernel for this device in this torch
            if "fused" not in _warned:
                _warned.add("fused")
                log.info(f"perf.fused_adam: {e}; using the per-parameter Adam")
    return torch.optim.Adam(params, lr=lr)


def grad_scaler(cfg: Any, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A :class:`torch.amp.GradScaler` for ``amp=fp16`` (float16 gradients underflow without
    loss scaling); None otherwise (bf16 has float32's exponent range and needs none)."""
    p = resolve(cfg, device)
    if p.amp != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def intra_op_threads(setting: int | None, concurrent_jobs: int, cores: int | None = None) -> int:
    """``perf.threads``: torch's intra-op threads for one job. ``None`` (auto) divides the
    cores among the jobs that run at once on this machine (a local launcher's ``n_jobs``, times
    the data-parallel ranks on this machine; 1 otherwise), at least one each, so parallel jobs
    do not oversubscribe the cores and slow each other down."""
    if setting is not None:
        return int(setting)
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, concurrent_jobs))
