"""Batches of a split streamed from disk (:class:`m2mdc.data.datasets.FileData`).

A torch DataLoader decodes the files of each batch in its worker processes
(``dataset.num_workers``; 0 decodes in the main process) and stacks them into the uint8
``[B, 3, H, W]`` batch an in-memory split would give for the same indices, in pinned memory
when the batches go to a CUDA device. Which indices make each batch is decided by the caller
(:class:`m2mdc.data.loader.Batches`, from the epoch's ``(seed, epoch)`` order), as are the
augmentations, which run on the collated batch exactly as on the in-memory path.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from m2mdc.data.datasets import FileData, undecodable

# a decoded image, or why its file cannot be decoded
Item = tuple[int, torch.Tensor | str]


class Decoded(Dataset[Item]):
    """The split's images by index, decoded when asked (in a loader worker)."""

    def __init__(self, data: FileData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Item:
        return i, self.data.decode(i)


def collate(items: list[Item]) -> torch.Tensor | tuple[int, str]:
    """The batch's images stacked, or ``(index, why)`` of its first undecodable file (raised
    in the main process as a one-line error, not as a worker's traceback)."""
    for i, img in items:
        if isinstance(img, str):
            return i, img
    return torch.stack([img for _, img in items if isinstance(img, torch.Tensor)])


def stream(
    data: FileData, batches: list[list[int]], device: torch.device
) -> Iterator[torch.Tensor]:
    """The uint8 images of each index list of ``batches``, in order, on ``device``."""
    loader = DataLoader(
        Decoded(data),
        batch_sampler=batches,
        num_workers=data.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    for batch in loader:
        if isinstance(batch, tuple):
            raise undecodable(data.files[batch[0]], batch[1])
        yield batch.to(device, non_blocking=True)


def head(data: FileData, k: int) -> torch.Tensor:
    """The first ``k`` images, decoded in the main process."""
    images = []
    for i in range(min(k, len(data))):
        img = data.decode(i)
        if isinstance(img, str):
            raise undecodable(data.files[i], img)
        images.append(img)
    return torch.stack(images)
