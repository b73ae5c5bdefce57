"""``dataset.augment``: flip (unchanged), cifar (pad 4 and crop) and imagenet (random resized
crop; resize and center crop for evaluation) on the batch, seeded per (seed, epoch)."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2 as T
from scipy.stats import ks_2samp

from m2mdc.config import validate
from m2mdc.data import augment as aug
from m2mdc.data.datasets import ImageData
from m2mdc.data.loader import IMAGENET_MEAN, IMAGENET_STD, Batches, Overlay
from m2mdc.errors import M2MError

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def images(n: int = 24, h: int = 32, w: int = 32, seed: int = 1) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    return ImageData(imgs, torch.arange(n) % 3, ["a", "b", "c"])


def uint8_of(x: torch.Tensor) -> torch.Tensor:
    """A normalised batch back to its uint8 pixels."""
    return (x * STD + MEAN).mul(255).round().to(torch.uint8)


def first_batch(b: Batches, epoch: int = 0) -> torch.Tensor:
    return next(iter(b.epoch(epoch)))[0]


def test_cifar_every_crop_is_a_window_of_the_zero_padded_image_at_an_offset_in_0_8() -> None:
    d = images(32)
    b = Batches(d, 32, 32, train=True, seed=5, augment="cifar")
    out = uint8_of(first_batch(b))
    order = torch.randperm(32, generator=torch.Generator().manual_seed(5 * 1_000_003))
    padded = torch.zeros(32, 3, 40, 40, dtype=torch.uint8)
    padded[:, :, 4:36, 4:36] = d.images[order]
    offsets = set()
    for k in range(32):
        found = [
            (i, j, flip)
            for i in range(9)
            for j in range(9)
            for flip in (False, True)
            if torch.equal(
                out[k],
                padded[k, :, i : i + 32, j : j + 32].flip(-1)
                if flip
                else padded[k, :, i : i + 32, j : j + 32],
            )
        ]
        assert len(found) == 1, f"image {k}: {found}"
        offsets.add(found[0][:2])
    assert len(offsets) > 10  # the offsets are drawn per image, not one per batch


def test_cifar_pads_at_the_stored_resolution_then_resizes() -> None:
    d = images(8, 16, 16)
    out = first_batch(Batches(d, 8, 32, train=True, seed=2, augment="cifar"))
    assert out.shape == (8, 3, 32, 32)


def test_imagenet_training_crops_are_torchvision_resized_crops_of_their_boxes() -> None:
    d = images(12, 40, 48)
    b = Batches(d, 12, 24, train=True, seed=3, augment="imagenet")
    out = uint8_of(first_batch(b, epoch=2))
    g = torch.Generator().manual_seed(3 * 1_000_003 + 2)
    order = torch.randperm(12, generator=g)
    flips = torch.rand(12, generator=g) < 0.5
    boxes = aug.resized_crop_boxes(12, 40, 48, g)  # drawn after the order and the flips
    for k in range(12):
        top, left, h, w = boxes[k].tolist()
        assert top >= 0 and top + h <= 40 and left >= 0 and left + w <= 48
        crop = T.functional.resized_crop(
            d.images[order[k]], top, left, h, w, [24, 24], antialias=True
        )
        assert torch.equal(out[k], crop.flip(-1) if flips[k] else crop)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 60), (8, 64)])
def test_imagenet_boxes_follow_torchvision_random_resized_crop_in_distribution(
    height, width
) -> None:
    """Area share, aspect ratio and placement against RandomResizedCrop.get_params (the
    (8, 64) image mostly gets torchvision's fallback box)."""
    n = 4000
    ours = aug.resized_crop_boxes(n, height, width, torch.Generator().manual_seed(0)).double()
    torch.manual_seed(0)
    img = torch.zeros(3, height, width)
    ref = torch.tensor(
        [T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    ).double()
    for name, stat in {
        "area": lambda b: b[:, 2] * b[:, 3] / (height * width),
        "ratio": lambda b: b[:, 3] / b[:, 2],
        "top": lambda b: b[:, 0] / (height - b[:, 2] + 1),
        "left": lambda b: b[:, 1] / (width - b[:, 3] + 1),
    }.items():
        assert ks_2samp(stat(ours).numpy(), stat(ref).numpy()).pvalue > 1e-3, name


def test_imagenet_evaluation_is_resize_then_center_crop() -> None:
    d = images(6, 48, 64)
    size = 32  # shorter side to round(32 / 0.875) = 37, then the center 32 x 32
    out = first_batch(Batches(d, 6, size, augment="imagenet"))
    view = T.Compose([T.Resize(37, antialias=True), T.CenterCrop(32)])
    expected = torch.stack([view(img) for img in d.images])
    assert torch.equal(uint8_of(out), expected)
    again = first_batch(Batches(d, 6, size, augment="imagenet"), epoch=3)
    assert torch.equal(out, again)  # deterministic: no draws


@pytest.mark.parametrize("preset", ["flip", "cifar"])
def test_flip_and_cifar_evaluation_is_the_plain_resized_batch(preset) -> None:
    d = images(6, 16, 16)
    plain = first_batch(Batches(d, 6, 16))
    assert torch.equal(first_batch(Batches(d, 6, 16, augment=preset)), plain)
    assert torch.equal(plain, (d.images.float() / 255 - MEAN) / STD)


def test_flip_preset_is_the_seeded_order_and_flips_it_always_was() -> None:
    """Derived by hand: randperm then one uniform per image from the (seed, epoch) generator,
    flip where < 0.5, then ImageNet normalisation."""
    d = images(20)
    seed, epoch = 7, 4
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(20, generator=g)
    flips = torch.rand(20, generator=g) < 0.5
    x = d.images[order].float() / 255
    x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    expected = (x - MEAN) / STD
    for b in (
        Batches(d, 8, 32, train=True, seed=seed),
        Batches(d, 8, 32, train=True, seed=seed, augment="flip"),
    ):
        got = torch.cat([x for x, _ in b.epoch(epoch)])
        assert torch.equal(got, expected)


@pytest.mark.parametrize("preset", ["flip", "cifar", "imagenet"])
def test_batches_depend_only_on_seed_and_epoch_and_resume_mid_epoch(preset) -> None:
    d = images(24, 32, 40)

    def epoch(seed: int, e: int, start: int = 0) -> list[torch.Tensor]:
        b = Batches(d, 8, 24, train=True, seed=seed, augment=preset)
        return [x for x, _ in b.epoch(e, start_batch=start)]

    a = epoch(1, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, epoch(1, 3), strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a[1:], epoch(1, 3, start=1), strict=True))
    assert not torch.equal(a[0], epoch(1, 4)[0])
    assert not torch.equal(a[0], epoch(2, 3)[0])


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
def test_overlay_maps_are_cropped_with_their_images(preset) -> None:
    """With alpha 1 the overlaid image is its map: a map equal to the image's first channel
    must come out equal to the cropped image's first channel."""
    d = images(16, 32, 32)
    b = Batches(d, 16, 32, train=True, seed=4, augment=preset)
    maps = Overlay(d.images[:, 0].clone(), prob=1.0, alpha=1.0)
    plain, overlaid = first_batch(b), first_batch(b.with_overlay(maps))
    assert torch.equal(overlaid[:, 0], plain[:, 0])


def test_unknown_preset_is_refused_in_one_line(compose_cfg) -> None:
    with pytest.raises(M2MError) as err:
        validate(compose_cfg("dataset.augment=autoaugment"))
    assert str(err.value) == (
        "dataset.augment='autoaugment' is not valid; choose one of: flip, cifar, imagenet"
    )
    with pytest.raises(ValueError, match="flip, cifar, imagenet"):
        Batches(images(4), 4, 32, augment="mixup")
