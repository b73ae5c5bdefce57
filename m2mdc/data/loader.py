"""Batches on the device: seeded order, batch-level resize, flip and normalisation.

The order and the flips of epoch ``e`` depend only on ``(seed, e)``, so a run resumed at
epoch ``e`` sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from m2mdc.data.datasets import ImageData

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(
    images: torch.Tensor, image_size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> normalised float ``[B, 3, S, S]``.

    Resizing is bilinear; downsampling is antialiased (what PIL's ``Resize`` does per image).
    ``flip`` is a boolean mask of the images to mirror horizontally.
    """
    x = images.float().div_(255.0)
    if x.shape[-2:] != (image_size, image_size):
        down = x.shape[-1] > image_size or x.shape[-2] > image_size
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=down
        )
    if flip is not None and bool(flip.any()):
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


class Batches:
    """Iterates an :class:`ImageData` in batches of preprocessed tensors on ``device``.

    Args:
        data: the split.
        batch_size: examples per batch.
        image_size: side of the square model input.
        train: shuffle (seeded per epoch) and random horizontal flips.
        seed: base seed of the order and flips.
        device: where batches are produced; the uint8 data is moved there once.
        order: a fixed index order to use instead (the probe set); implies no shuffling.
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        image_size: int,
        *,
        train: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        order: torch.Tensor | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.batch_size = batch_size
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.order = order

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
        idx = idx.to(self.device)
        for start in range(start_batch * self.batch_size, n, self.batch_size):
            b = idx[start : start + self.batch_size]
            flip = (
                flips[start : start + self.batch_size].to(self.device)
                if flips is not None
                else None
            )
            yield preprocess(self.images[b], self.image_size, flip), self.labels[b]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)
