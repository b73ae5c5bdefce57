"""Batches on the device: seeded order, batch-level augmentation, resize and normalisation.

The order, the flips and the crops (``dataset.augment``, :mod:`m2mdc.data.augment`) of epoch
``e`` depend only on ``(seed, e)``, so a run resumed at epoch ``e`` sees exactly the batches an
uninterrupted run would have seen. Optionally a per-example uint8 map (the teacher's
integrated-gradients maps, :mod:`m2mdc.distill.ig`) is overlaid on a seeded fraction of the
images; the maps are index-selected, cropped, resized and flipped together with their images,
and the overlay draws come from the same ``(seed, e)`` generator (after the order, the flips
and the crops, which are therefore unchanged).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from m2mdc.data import augment as aug
from m2mdc.data.datasets import FileData, Split
from m2mdc.data.stream import head, stream

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


OVERLAY_MODES = ("blend", "mask")


@dataclass(frozen=True)
class Overlay:
    """Maps to overlay on training images (the integrated-gradients augmentation).

    Attributes:
        maps: uint8 ``[N, H, W]``, one per example at the images' stored resolution (255 = 1).
        prob: fraction of the images, drawn per image and epoch, that get their map.
        alpha: blend weight. With ``x``, ``m`` in [0, 1] (after resize and flip, before
            normalisation): ``blend`` gives ``(1 - alpha) x + alpha m`` (the map drawn over the
            image, as in the IG-KD authors' code), ``mask`` gives ``(1 - alpha) x + alpha x m``
            (the image dimmed where the teacher's attribution is low).
        mode: ``blend`` or ``mask``.
    """

    maps: torch.Tensor
    prob: float
    alpha: float
    mode: str = "blend"


class BatchOverlay(NamedTuple):
    """One batch's share of an :class:`Overlay`: its maps and which images get them."""

    maps: torch.Tensor  # uint8 [B, H, W]
    apply: torch.Tensor  # bool [B]
    alpha: float
    mode: str = "blend"


class OutputBuffers:
    """Reusable CPU output buffers for the batches of one epoch.

    A fresh large CPU tensor costs a page fault per 4 KiB on first touch (glibc maps every
    allocation above 32 MB anew): for a 64-image batch at 224x224 (38.5 MB) that is more than
    half the resize time. Each batch is therefore written into a buffer kept here and handed
    out as a *view*; a buffer is reused only once nothing else holds its storage (every view,
    slice, autograd-saved input or NumPy array of a batch keeps a storage reference, which
    ``torch._C._storage_Use_Count`` sees). Where that count is unavailable, every batch gets
    a fresh tensor, as without buffers.
    """

    def __init__(self, slots: int = 2) -> None:
        self.slots = slots
        self.bufs: list[torch.Tensor] = []
        self.next = 0
        count = getattr(torch._C, "_storage_Use_Count", None)
        self._count = count
        self._free_count = self._uses(torch.empty(1)) if count is not None else None

    def _uses(self, t: torch.Tensor) -> int | None:
        try:
            return int(self._count(t.untyped_storage()._cdata))  # type: ignore[misc]
        except Exception:  # an internal API: any surprise means "do not reuse"
            return None

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 CPU tensor of ``shape`` that nobody else references."""
        if self._free_count is not None:
            for b in self.bufs:
                if tuple(b.shape) == shape and self._uses(b) == self._free_count:
                    return b
        buf = torch.empty(shape)
        if self._free_count is not None:
            if len(self.bufs) < self.slots:
                self.bufs.append(buf)
            else:  # drop the oldest (its holder keeps it alive as long as needed)
                self.bufs[self.next] = buf
                self.next = (self.next + 1) % self.slots
        return buf


def _antialias(x: torch.Tensor, image_size: int) -> bool:
    """Whether to use the antialiased bilinear kernel: always when downsampling (PIL's
    ``Resize`` stretches its triangle filter by the scale factor), and on the CPU also when
    upsampling, where the filter is the plain bilinear one (the same weights, equal up to float
    rounding) and the antialiased kernel is faster: 1.15x for a 64-image batch 32 -> 224 at
    two threads, 3x at one thread."""
    down = x.shape[-1] > image_size or x.shape[-2] > image_size
    return down or x.device.type == "cpu"


def _resize(x: torch.Tensor, image_size: int, buffers: OutputBuffers | None = None) -> torch.Tensor:
    if x.shape[-2:] == (image_size, image_size):
        return x
    aa = _antialias(x, image_size)
    if buffers is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        # the out= form of exactly the kernel F.interpolate calls (bitwise the same result)
        buf = buffers.take((*x.shape[:-2], image_size, image_size))
        op = torch.ops.aten._upsample_bilinear2d_aa if aa else torch.ops.aten.upsample_bilinear2d
        op.out(x, [image_size, image_size], False, None, None, out=buf)
        return buf.view(buf.shape)  # a view: holding it keeps the buffer from being reused
    return F.interpolate(
        x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=aa
    )


def _flip(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _flip_(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """:func:`_flip` in place on a tensor we own, a few images at a time (small temporaries
    instead of two more full-size tensors: fresh large CPU allocations are slow, see
    :class:`OutputBuffers`). The same values as :func:`_flip`: both only move data."""
    if x.device.type != "cpu":
        return _flip(x, flip)
    for part in flip.nonzero().flatten().split(8):
        x[part] = x[part].flip(-1)
    return x


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> ImageNet-normalised (in place)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def preprocess(
    images: torch.Tensor,
    image_size: int,
    flip: torch.Tensor | None = None,
    overlay: BatchOverlay | None = None,
    buffers: OutputBuffers | None = None,
) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> normalised float ``[B, 3, S, S]``.

    Resizing is bilinear; downsampling is antialiased (what PIL's ``Resize`` does per image).
    ``flip`` is a boolean mask of the images to mirror horizontally. ``overlay`` blends the
    selected images with their maps (resized and flipped like the images, see
    :class:`Overlay`).

    Without an overlay the flips and the normalisation run at the stored resolution, before
    the resize: bilinear resizing is linear with weights summing to one per output pixel and
    mirror-symmetric, so it commutes with both, and at 32 -> 224 they touch 49x fewer values.
    The result equals resize-then-flip-then-normalise up to float rounding (at most about
    1e-5 after normalisation, under a thousandth of a uint8 level), and bitwise when no
    resize is needed.

    ``buffers`` (CPU): where the resized batch may be written (see :class:`OutputBuffers`),
    so no fresh full-size tensor is allocated. The result is bitwise the same with or
    without buffers.
    """
    if overlay is None or not bool(overlay.apply.any()):
        x = images.float().div_(255.0)
        if flip is not None and bool(flip.any()):
            x = _flip_(x, flip)
        return _resize(normalise(x), image_size, buffers)
    x = _resize(images.float().div_(255.0), image_size)
    m = None
    if overlay is not None and bool(overlay.apply.any()):
        m = _resize(overlay.maps.float().div_(255.0).unsqueeze(1), image_size)
    if flip is not None and bool(flip.any()):
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if m is not None:
            m = torch.where(flip[:, None, None, None], m.flip(-1), m)
    if m is not None and overlay is not None:
        a = overlay.alpha
        mixed = (1 - a) * x + a * (x * m if overlay.mode == "mask" else m)
        x = torch.where(overlay.apply[:, None, None, None], mixed, x)
    return normalise(x)


class Batches:
    """Iterates a split in batches of preprocessed tensors on ``device``.

    Args:
        data: the split: in memory (:class:`~m2mdc.data.datasets.ImageData`), or streamed
            from disk (:class:`~m2mdc.data.datasets.FileData`: each batch's files decoded by
            loader workers, then augmented and preprocessed exactly as the in-memory batch of
            the same indices, so both give the same batches).
        batch_size: examples per batch.
        image_size: side of the square model input.
        train: shuffle (seeded per epoch), random horizontal flips and the ``augment`` crops.
        seed: base seed of the order, flips and crops.
        device: where batches are produced; in-memory uint8 data is moved there once.
        order: a fixed index order to use instead (the probe set); implies no shuffling.
        split: the split's name in metrics and logs (``test``, ``val``, ...): a training loop
            records its evaluation of these batches as ``<split>_top1``.
        augment: the ``dataset.augment`` preset (:mod:`m2mdc.data.augment`): its training
            crops when ``train``, else its evaluation view.

    :meth:`with_overlay` returns a copy that overlays per-example maps (see :class:`Overlay`).
    """

    def __init__(
        self,
        data: Split,
        batch_size: int,
        image_size: int,
        *,
        train: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        order: torch.Tensor | None = None,
        split: str = "test",
        augment: str = "flip",
    ) -> None:
        self.split = split
        self.augment = aug.check(augment)
        self.device = torch.device(device)
        self.files = data if isinstance(data, FileData) else None
        self.images = None if isinstance(data, FileData) else data.images.to(self.device)
        self.shape = data.shape if isinstance(data, FileData) else tuple(data.images.shape[-2:])
        self.labels = data.labels.to(self.device)
        self.batch_size = batch_size
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.order = order
        self.overlay: Overlay | None = None
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> Batches:
        """A copy (sharing the image tensors) that yields rank ``rank``'s share of every batch
        of ``world`` ranks: the same global order, flips and crops, each global batch split
        into ``world`` contiguous parts whose sizes differ by at most one (data-parallel
        training, :mod:`m2mdc.train.dist`). ``shard(0, 1)`` is the whole batches again."""
        new = copy.copy(self)
        new.rank, new.world = rank, world
        return new

    def global_batch(self, step: int) -> int:
        """The size of global batch ``step`` of an epoch (all ranks' shares together)."""
        return min(self.batch_size, self.num_examples - step * self.batch_size)

    def _share(self, start: int) -> slice:
        """This rank's part of the global batch that starts at ``start``."""
        end = min(start + self.batch_size, self.num_examples)
        q, r = divmod(end - start, self.world)
        lo = start + self.rank * q + min(self.rank, r)
        return slice(lo, lo + q + (self.rank < r))

    def with_overlay(self, overlay: Overlay) -> Batches:
        """A copy (sharing the image tensors) that overlays ``overlay.maps`` on a seeded
        fraction ``overlay.prob`` of each epoch's images."""
        n, (h, w) = self.labels.numel(), self.shape
        if tuple(overlay.maps.shape) != (n, h, w) or overlay.maps.dtype != torch.uint8:
            raise ValueError(
                f"overlay maps must be uint8 [{n}, {h}, {w}] like the images, got "
                f"{overlay.maps.dtype} {list(overlay.maps.shape)}"
            )
        if overlay.mode not in OVERLAY_MODES:
            raise ValueError(f"overlay mode {overlay.mode!r}; choose one of {OVERLAY_MODES}")
        new = copy.copy(self)
        new.overlay = Overlay(
            overlay.maps.to(self.device), float(overlay.prob), float(overlay.alpha), overlay.mode
        )
        return new

    @property
    def num_examples(self) -> int:
        return int(self.labels.numel() if self.order is None else self.order.numel())

    def __len__(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def epoch(
        self, epoch: int = 0, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one epoch (deterministic for a given seed and epoch), optionally
        starting at batch ``start_batch`` (a resumed epoch)."""
        n = self.num_examples
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.order is not None:
            idx = self.order
        elif self.train:
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        flips = torch.rand(n, generator=g) < 0.5 if self.train else None
        h, w = self.shape
        # drawn after the order and the flips, which therefore do not change
        crops = aug.draw(self.augment, n, h, w, g) if self.train else None
        ov = self.overlay
        overlaid = (torch.rand(n, generator=g) < ov.prob).to(self.device) if ov else None
        # this rank's share of each global batch (the whole batch in one process)
        parts = [self._share(s) for s in range(start_batch * self.batch_size, n, self.batch_size)]
        stored = self._stored(idx, parts)
        idx = idx.to(self.device)
        buffers = OutputBuffers() if self.device.type == "cpu" else None  # freed with the epoch
        for part, raw in zip(parts, stored, strict=True):
            b = idx[part]
            crop = crops[part] if crops is not None else None
            images = aug.view(self.augment, raw, crop, self.image_size)
            flip = flips[part].to(self.device) if flips is not None else None
            over = (
                BatchOverlay(self._maps(ov, b, crop), overlaid[part], ov.alpha, ov.mode)
                if ov is not None and overlaid is not None
                else None
            )
            yield preprocess(images, self.image_size, flip, over, buffers), self.labels[b]

    def _stored(self, idx: torch.Tensor, parts: list[slice]) -> Iterator[torch.Tensor]:
        """The stored uint8 images of each batch ``idx[part]``, on the device: indexed from
        memory, or decoded by the streaming loader's workers."""
        if self.files is not None:
            return stream(self.files, [idx[p].tolist() for p in parts], self.device)
        images, dev = self.images, idx.to(self.device)
        assert images is not None
        return (images[dev[p]] for p in parts)

    def head(self, k: int) -> torch.Tensor:
        """The split's first ``k`` stored uint8 images (unaugmented), on the device."""
        if self.files is not None:
            return head(self.files, k).to(self.device)
        assert self.images is not None
        return self.images[:k]

    def _maps(self, ov: Overlay, b: torch.Tensor, crop: torch.Tensor | None) -> torch.Tensor:
        """The overlay maps of the batch's examples ``b``, cropped like their images."""
        return aug.view(self.augment, ov.maps[b][:, None], crop, self.image_size)[:, 0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)
