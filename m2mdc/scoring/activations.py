"""Spatially pooled activations of chosen modules on a probe set (paper §3.1, Z_b = mean_hw A_b).

Only the pooled ``[N, C]`` descriptors are kept, never feature maps, so probing 5000 samples of
every ResNet block costs a few MB.

Example:
    >>> pooled, labels = collect_pooled(model, {"layer1.0": model.layer1[0]}, loader, 5000)
    >>> pooled["layer1.0"].shape
    torch.Size([5000, 64])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

ProgressFn = Callable[[int, int], None]
"""Called as ``progress(samples_done, max_samples)`` after each batch."""


def pool_output(out: Tensor) -> Tensor:
    """Spatial mean: ``[B, C, *spatial] -> [B, C]`` (mean over every dim after the channel
    dim); ``[B, C]`` outputs are returned unchanged."""
    if out.dim() < 2:
        raise ValueError(f"cannot pool an output of shape {tuple(out.shape)}; need [B, C, ...]")
    if out.dim() == 2:
        return out
    return out.mean(dim=tuple(range(2, out.dim())))


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def collect_pooled(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[tuple[Tensor, Tensor]],
    max_samples: int,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Run ``model`` over ``batches`` and record the pooled output of each module in ``modules``.

    Contract:
        * The model runs in eval mode under ``torch.inference_mode`` (BN uses running stats, so
          truncating a batch does not change anyone's activations); its previous train/eval
          mode is restored afterwards.
        * Exactly ``min(max_samples, samples available)`` rows are kept, in iteration order;
          the last batch is truncated before the forward pass and no further batch is drawn.
        * Buffers ``[max_samples, C]`` (float32, CPU) are allocated on a module's first output,
          then filled in place.
        * Hooks are removed on return and on error.

    Args:
        model: the network; inputs are moved to its device.
        modules: name -> submodule of ``model`` whose output is pooled (each must run exactly
            once per forward pass).
        batches: iterable of ``(inputs, labels)``.
        max_samples: number of samples to keep (>= 1).
        progress: optional ``progress(samples_done, max_samples)`` callback.

    Returns:
        ``(pooled, labels)``: name -> ``[N, C]`` float32 CPU tensor, and ``[N]`` int64 labels.

    Raises:
        ValueError: ``max_samples < 1`` or no samples at all.
        RuntimeError: a module did not run, or ran more than once, in a forward pass.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    bufs: dict[str, Tensor] = {}
    calls: dict[str, int] = dict.fromkeys(modules, 0)
    state = {"row": 0}  # first buffer row of the current batch

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            if not isinstance(out, Tensor):
                raise RuntimeError(f"module '{name}' returned {type(out).__name__}, not a Tensor")
            calls[name] += 1
            z = pool_output(out).detach().to("cpu", torch.float32)
            if name not in bufs:
                bufs[name] = torch.empty(max_samples, z.shape[1], dtype=torch.float32)
            r = state["row"]
            bufs[name][r : r + z.shape[0]] = z

        return hook

    labels_buf = torch.empty(max_samples, dtype=torch.long)
    device = _model_device(model)
    was_training = model.training
    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        model.eval()
        n = 0
        with torch.inference_mode():
            for x, y in batches:
                b = min(int(x.shape[0]), max_samples - n)
                if b == 0:
                    continue
                calls.update(dict.fromkeys(calls, 0))
                state["row"] = n
                model(x[:b].to(device))
                bad = [name for name, k in calls.items() if k != 1]
                if bad:
                    raise RuntimeError(
                        f"modules must run exactly once per forward pass; offenders: {bad}"
                    )
                labels_buf[n : n + b] = y[:b].reshape(-1).to("cpu", torch.long)
                n += b
                if progress is not None:
                    progress(n, max_samples)
                if n >= max_samples:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("collect_pooled: the probe batches yielded no samples")
    if n < max_samples:  # fewer samples than asked: copy so the spare rows are freed
        return {k: v[:n].clone() for k, v in bufs.items()}, labels_buf[:n].clone()
    return bufs, labels_buf
