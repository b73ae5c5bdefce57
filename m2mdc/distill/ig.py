"""Integrated-gradients maps of the teacher and the IG overlay (Hernandez et al., arXiv:2506.14440).

"KD with integrated gradients" precomputes, once, the teacher's integrated-gradients attribution
of every training image for its true class and, during distillation, overlays the map on a
fraction of the images (data augmentation that shows the student where the teacher looks).

Here a map is:

* IG (captum ``IntegratedGradients``, ``kd.ig.steps`` Gauss-Legendre steps) of the teacher's
  **logit of the true class** with respect to the image in [0, 1] at its stored resolution; the
  model sees it exactly as in training (resized to ``dataset.image_size``, normalised), so
  completeness holds for that composite function. The baseline is a black image (zeros in
  [0, 1], i.e. the normalised image of zeros);
* reduced to one value per pixel, ``sum_c |attr_c|``, min-max normalised per image to [0, 1],
  stored as uint8 ``[N, H, W]`` at the dataset's stored resolution (before batch resize).

Maps are cached under ``cache_dir/ig_maps/<key>/`` (``maps.pt``, ``ig.json``), the key hashing
the teacher checkpoint's sha256, the training split's content (images and labels), the model
input size and the IG settings. The entry is published by an atomic rename under the cache's
file lock (:mod:`m2mdc.cache`), so concurrent jobs compute it once.

The overlay itself (which images, blend formula) lives in the batch pipeline,
:class:`m2mdc.data.loader.Overlay`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m2mdc import cache
from m2mdc.artifacts import atomic_write_json, safe_torch_load, sha256_file, torch_save_atomic
from m2mdc.data.datasets import ImageData, Split
from m2mdc.data.loader import Batches, Overlay, _resize, normalise
from m2mdc.errors import M2MError
from m2mdc.ui import log, progress

IG_VERSION = 1  # bump when the map computation changes (it is part of the cache key)
CACHE_STAGE = "ig_maps"


class _AsTrained(nn.Module):
    """[0, 1] images at stored resolution -> resize, normalise (as in training) -> logits."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        super().__init__()
        self.model = model
        self.image_size = image_size

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.model(normalise(_resize(x01, self.image_size).clone()))


def integrated_gradients(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    image_size: int,
    steps: int,
) -> torch.Tensor:
    """IG attributions ``[B, 3, H, W]`` of ``model``'s true-class logit for uint8 ``images``.

    The input is the image in [0, 1] at its stored resolution, the baseline a black image; so
    ``attr.sum() ~= f(x) - f(black)`` for ``f`` = resize, normalise, model, logit of the label.
    """
    try:
        from captum.attr import IntegratedGradients
    except ImportError:  # pragma: no cover - captum is a declared extra
        raise M2MError(
            "kd.ig.prob > 0 needs captum for integrated gradients: pip install 'm2mdc[ig]'"
        ) from None
    model.eval()
    x = images.float().div(255.0)
    ig = IntegratedGradients(_AsTrained(model, image_size))
    attr = ig.attribute(x, baselines=torch.zeros_like(x), target=labels, n_steps=steps)
    return attr.detach()


def to_maps(attr: torch.Tensor) -> torch.Tensor:
    """``sum_c |attr|``, min-max normalised per image, as uint8 ``[B, H, W]`` (0..255)."""
    m = attr.abs().sum(1)
    lo = m.amin(dim=(1, 2), keepdim=True)
    span = m.amax(dim=(1, 2), keepdim=True) - lo
    m = torch.where(span > 0, (m - lo) / span.clamp_min(1e-12), torch.zeros_like(m))
    return m.mul(255.0).round().clamp_(0, 255).to(torch.uint8)


def compute_maps(
    model: nn.Module,
    data: ImageData,
    *,
    image_size: int,
    steps: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The uint8 IG maps ``[N, H, W]`` of every example of ``data`` (progress bar)."""
    n = len(data)
    maps = torch.empty((n, *data.images.shape[-2:]), dtype=torch.uint8)
    with progress() as bar:
        task = bar.add_task("ig maps", total=n, info=f"{steps} steps", unit="img")
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            attr = integrated_gradients(
                model,
                data.images[sl].to(device),
                data.labels[sl].to(device),
                image_size=image_size,
                steps=steps,
            )
            maps[sl] = to_maps(attr).cpu()
            bar.update(task, completed=min(start + batch_size, n))
    return maps


def dataset_sha256(data: ImageData) -> str:
    """Content identity of a split: its images (shape and bytes) and labels."""
    h = hashlib.sha256()
    for t in (data.images, data.labels):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{list(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass
class IGMaps:
    maps: torch.Tensor  # uint8 [N, H, W]
    key: str
    reused: bool
    entry: Path | None  # the cache entry, None when the cache is off
    seconds: float = 0.0


def ig_maps(
    teacher: nn.Module,
    data: ImageData,
    *,
    teacher_sha256: str,
    image_size: int,
    steps: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
) -> IGMaps:
    """The teacher's IG maps of ``data``: from the cache when an entry exists, else computed
    (and published to the cache unless ``cache_dir`` is None)."""
    settings: dict[str, Any] = {
        "version": IG_VERSION,
        "teacher_sha256": teacher_sha256,
        "data_sha256": dataset_sha256(data),
        "image_size": int(image_size),
        "steps": int(steps),
        "method": "gausslegendre",
        "target": "label_logit",
        "baseline": "black",
        "reduce": "sum_abs_channels",
        "normalise": "minmax_per_image",
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    expected = (len(data), *data.images.shape[-2:])

    def compute() -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        maps = compute_maps(
            teacher,
            data,
            image_size=image_size,
            steps=steps,
            batch_size=batch_size,
            device=device,
        )
        return maps, time.perf_counter() - t0

    if cache_dir is None:
        maps, secs = compute()
        log.info(f"ig: computed {len(data)} maps in {secs:.1f}s (cache off)")
        return IGMaps(maps, key, False, None, secs)
    entry = cache.entry_dir(cache_dir, CACHE_STAGE, key)
    with cache.locked(cache_dir, CACHE_STAGE, key):
        if (entry / "COMPLETE").is_file():
            stored = safe_torch_load(entry / "maps.pt")
            cached = stored.get("maps") if isinstance(stored, dict) else None
            if isinstance(cached, torch.Tensor) and tuple(cached.shape) == expected:
                log.info(f"ig: reused {len(data)} cached maps from {entry}")
                return IGMaps(cached, key, True, entry)
            log.warning(f"ig: cache entry {entry} is unusable; recomputing it")
            shutil.rmtree(entry, ignore_errors=True)
        maps, secs = compute()
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=entry.parent))
        try:
            torch_save_atomic({"maps": maps, "key": key}, tmp / "maps.pt")
            atomic_write_json(tmp / "ig.json", {**settings, "seconds": round(secs, 3)})
            cache.publish(cache_dir, CACHE_STAGE, key, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info(f"ig: computed {len(data)} maps in {secs:.1f}s; cached in {entry}")
        return IGMaps(maps, key, False, entry, secs)


def overlay_batches(
    train: Batches,
    teacher: nn.Module,
    *,
    ig_cfg: Any,
    teacher_path: Path,
    data: Split,
    cache_dir: str | Path | None,
) -> Batches:
    """``train`` with the IG overlay of ``ig_cfg`` (``kd.ig``) attached; ``train`` itself when
    ``ig_cfg.prob`` is 0. The maps are computed over the images in memory: a streamed
    training split is refused."""
    if float(ig_cfg.prob) <= 0:
        return train
    if not isinstance(data, ImageData):
        raise M2MError(
            f"kd.ig.prob={ig_cfg.prob}: the IG overlay needs the training images in memory, "
            "and they are streamed from disk; set dataset.in_memory=true (or a larger "
            "dataset.memory_budget_gb), or kd.ig.prob=0"
        )
    result = ig_maps(
        teacher,
        data,
        teacher_sha256=sha256_file(teacher_path),
        image_size=train.image_size,
        steps=int(ig_cfg.steps),
        batch_size=int(ig_cfg.batch_size),
        device=train.device,
        cache_dir=cache_dir,
    )
    overlay = Overlay(result.maps, float(ig_cfg.prob), float(ig_cfg.alpha), str(ig_cfg.overlay))
    return train.with_overlay(overlay)
