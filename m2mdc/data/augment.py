"""Geometric augmentation presets of the batch pipeline (``dataset.augment``).

* ``flip``: horizontal flips only (drawn by :class:`m2mdc.data.loader.Batches`);
* ``cifar``: the standard CIFAR training augmentation: zero-pad 4 pixels on every side and crop
  a random window of the stored size (torchvision's ``RandomCrop(size, padding=4)``), plus the
  flips. The padding is at the stored resolution, before any resize to the model input, so the
  shift is up to 4 of CIFAR's 32 pixels at any ``dataset.image_size``;
* ``imagenet``: the standard ImageNet training augmentation: a random resized crop to the
  model input (area 8%-100% of the image, aspect ratio 3/4-4/3: torchvision's
  ``RandomResizedCrop``), plus the flips; evaluation resizes the shorter side to
  ``round(size / 0.875)`` and takes the center ``size`` x ``size`` crop.

Everything works on uint8 batches ``[B, C, H, W]`` on their device, before
:func:`m2mdc.data.loader.preprocess` flips, normalises and resizes them. The crop parameters of
an epoch are drawn for all its examples at once from the epoch's ``(seed, epoch)`` generator
(:func:`draw`), so a resumed epoch crops exactly like an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF

from m2mdc.config import AUGMENTS

CIFAR_PAD = 4
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop: the crop's share of the image area
CROP_RATIO = (3 / 4, 4 / 3)  # and its aspect ratio (width / height)
CROP_ATTEMPTS = 10  # as torchvision: then the fallback crop
EVAL_CROP = 0.875  # imagenet evaluation: the center crop's share of the resized side


def check(preset: str) -> str:
    if preset not in AUGMENTS:
        raise ValueError(f"augment={preset!r}: choose one of {', '.join(AUGMENTS)}")
    return preset


def draw(preset: str, n: int, height: int, width: int, g: torch.Generator) -> torch.Tensor | None:
    """The crop parameters of ``n`` training examples of ``height`` x ``width`` from ``g``:
    ``cifar``: int64 ``[n, 2]`` (top, left) offsets into the padded image, each in
    ``[0, 2 * CIFAR_PAD]``; ``imagenet``: int64 ``[n, 4]`` boxes (top, left, height, width);
    ``flip``: None (nothing drawn)."""
    if preset == "cifar":
        return torch.randint(0, 2 * CIFAR_PAD + 1, (n, 2), generator=g)
    if preset == "imagenet":
        return resized_crop_boxes(n, height, width, g)
    return None


def view(preset: str, x: torch.Tensor, crops: torch.Tensor | None, size: int) -> torch.Tensor:
    """uint8 ``x`` as the model is shown it: with ``crops`` (a slice of :func:`draw`'s), the
    training view; without, the evaluation view (``imagenet``: resize and center crop; the
    others: ``x`` itself, resized later by the batch pipeline)."""
    if preset == "cifar" and crops is not None:
        return pad_crop(x, crops.to(x.device))
    if preset == "imagenet":
        return resized_crops(x, crops, size) if crops is not None else center_view(x, size)
    return x


def pad_crop(x: torch.Tensor, offsets: torch.Tensor, pad: int = CIFAR_PAD) -> torch.Tensor:
    """Each image of ``x`` zero-padded by ``pad`` and cropped back to its size at its
    ``offsets`` (top, left). Hand-written as one gather over the batch: torchvision's crop
    takes one window per call, which would be a kernel launch per image."""
    b, _, h, w = x.shape
    padded = TF.pad(x, [pad], fill=0)
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # [B, H]
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def resized_crops(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's box (top, left, height, width) resized to ``size`` x ``size`` (bilinear,
    antialiased), one image at a time: every box has its own size."""
    out = x.new_empty((x.shape[0], x.shape[1], size, size))
    for k, (top, left, h, w) in enumerate(boxes.tolist()):
        out[k] = TF.resized_crop(x[k], top, left, h, w, [size, size], antialias=True)
    return out


def center_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view: shorter side resized to ``round(size / EVAL_CROP)`` (bilinear,
    antialiased), then the center ``size`` x ``size`` crop."""
    resized = TF.resize(x, [round(size / EVAL_CROP)], antialias=True)
    return TF.center_crop(resized, [size, size])


def resized_crop_boxes(n: int, height: int, width: int, g: torch.Generator) -> torch.Tensor:
    """``n`` boxes drawn as ``RandomResizedCrop.get_params`` draws one: up to
    ``CROP_ATTEMPTS`` tries of an area in ``CROP_SCALE`` of the image and a log-uniform aspect
    ratio in ``CROP_RATIO``, the first that fits placed uniformly, else the fallback box.
    Hand-written because torchvision draws from the global RNG one image at a time; these
    draws come from ``g`` for every example at once (a fixed number of draws per example)."""
    area, log_ratio = height * width, (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    box_h = torch.zeros(n, dtype=torch.long)
    box_w = torch.zeros(n, dtype=torch.long)
    for _ in range(CROP_ATTEMPTS):
        target = area * torch.empty(n, dtype=torch.float64).uniform_(*CROP_SCALE, generator=g)
        ratio = torch.empty(n, dtype=torch.float64).uniform_(*log_ratio, generator=g)
        w = torch.sqrt(target * ratio.exp()).round().long()
        h = torch.sqrt(target / ratio.exp()).round().long()
        take = (box_h == 0) & (w > 0) & (w <= width) & (h > 0) & (h <= height)
        box_h, box_w = torch.where(take, h, box_h), torch.where(take, w, box_w)
    fb_h, fb_w = _fallback_box(height, width)
    missed = box_h == 0
    box_h, box_w = box_h.masked_fill(missed, fb_h), box_w.masked_fill(missed, fb_w)
    u = torch.rand(n, 2, dtype=torch.float64, generator=g)
    top = (u[:, 0] * (height - box_h + 1)).floor().long()
    left = (u[:, 1] * (width - box_w + 1)).floor().long()
    top = torch.where(missed, (height - fb_h) // 2, top)
    left = torch.where(missed, (width - fb_w) // 2, left)
    return torch.stack([top, left, box_h, box_w], 1)


def _fallback_box(height: int, width: int) -> tuple[int, int]:
    """torchvision's box when no attempt fits: the whole image, cut to the nearest allowed
    aspect ratio (placed in the center)."""
    in_ratio = width / height
    if in_ratio < min(CROP_RATIO):
        return round(width / min(CROP_RATIO)), width
    if in_ratio > max(CROP_RATIO):
        return height, round(height * max(CROP_RATIO))
    return height, width
