"""The batch pipeline (:func:`m2mdc.data.loader.preprocess`) against the per-image torchvision
path it replaces: PIL image -> ``transforms.Resize(antialias=True)`` -> ``ToTensor`` ->
``Normalize(ImageNet)``.

Inputs are natural-image patches (scikit-learn's two bundled sample photos, cropped at random
sizes and brought to 32x32 / 64x64), so the comparison sees real edges and textures.

The bound, per pixel: **one uint8 level**, i.e. ``1 / 255 / std_c`` after normalisation (at
most 1/255/0.224 = 0.0175). The kernels are the same (bilinear triangle filter; when
downsampling its support is stretched by the scale factor, which ``antialias=True`` reproduces),
but PIL resamples uint8 images in two separable passes, rounding to uint8 after each (with
22-bit fixed-point weights), so its output is off by up to 0.5 level from each rounding; the
batch path interpolates in float32 and never rounds. Per-channel means and standard deviations
over a batch agree to a small fraction of a level (the roundings are nearly unbiased).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2mdc.data.loader import IMAGENET_MEAN, IMAGENET_STD, preprocess

ONE_LEVEL = 1.0 / 255.0 / min(IMAGENET_STD)  # one uint8 step after normalisation
STAT_TOL = 0.01  # per-channel mean / std, normalised units (about half a uint8 level)


def natural_patches(side: int, n: int = 16, seed: int = 0) -> np.ndarray:
    """``n`` uint8 ``[side, side, 3]`` crops of the scikit-learn sample photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photos, shipped with scikit-learn
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        im = photos[k % len(photos)]
        h, w, _ = im.shape
        s = int(rng.integers(side, min(h, w) // 2))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        crop = Image.fromarray(im[y : y + s, x : x + s])
        out.append(np.asarray(crop.resize((side, side), Image.BILINEAR)))
    return np.stack(out)


def torchvision_path(images: np.ndarray, size: int, flip: bool = False) -> torch.Tensor:
    from PIL import Image
    from torchvision import transforms as T

    steps = [T.Resize(size, antialias=True)]
    if flip:
        steps.append(T.RandomHorizontalFlip(p=1.0))
    tf = T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return torch.stack([tf(Image.fromarray(im)) for im in images])


def batch_path(images: np.ndarray, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    u8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # what ImageData holds
    return preprocess(u8, size, flip)


def assert_equivalent(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == torch.float32
    dims = (0, 2, 3)
    mean_diff = (ours.mean(dims) - ref.mean(dims)).abs().max().item()
    std_diff = (ours.std(dims) - ref.std(dims)).abs().max().item()
    max_diff = (ours - ref).abs().max().item()
    assert mean_diff <= STAT_TOL, f"per-channel mean differs by {mean_diff:.5f}"
    assert std_diff <= STAT_TOL, f"per-channel std differs by {std_diff:.5f}"
    assert max_diff <= ONE_LEVEL + 1e-5, f"max |diff| {max_diff:.5f} > one uint8 level"
    assert (ours - ref).abs().mean().item() <= 0.5 * ONE_LEVEL


@pytest.mark.parametrize(
    ("src", "dst"),
    [(32, 64), (64, 32), (32, 224), (64, 48)],
    ids=["up-32-64", "down-64-32", "up-32-224", "down-64-48"],
)
def test_batch_resize_matches_torchvision(src: int, dst: int) -> None:
    images = natural_patches(src)
    assert_equivalent(batch_path(images, dst), torchvision_path(images, dst))


def test_same_size_is_exact() -> None:
    images = natural_patches(32, n=8)
    assert torch.equal(batch_path(images, 32), torchvision_path(images, 32))


def test_batch_flip_matches_per_image_flip() -> None:
    images = natural_patches(32, n=8, seed=1)
    flip = torch.tensor([True, False] * 4)
    ours = batch_path(images, 64, flip)
    flipped = torchvision_path(images, 64, flip=True)
    plain = torchvision_path(images, 64)
    ref = torch.where(flip[:, None, None, None], flipped, plain)
    assert_equivalent(ours, ref)


def test_normalisation_statistics_are_imagenet() -> None:
    """A constant image of the ImageNet mean normalises to 0 exactly as torchvision's does."""
    mean_u8 = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
    images = np.broadcast_to(mean_u8, (2, 16, 16, 3)).copy()
    ours, ref = batch_path(images, 16), torchvision_path(images, 16)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert ours.abs().max().item() < ONE_LEVEL


# ---- reused CPU output buffers: same values, never overwriting a batch someone holds ----------
def _batches(size: int = 48, n: int = 20, batch: int = 4):
    from m2mdc.data.datasets import ImageData
    from m2mdc.data.loader import Batches

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    return Batches(ImageData(imgs, torch.arange(n) % 3, ["a", "b", "c"]), batch, size, train=True)


@pytest.mark.parametrize("size", [48, 8], ids=["up", "down"])
def test_buffered_batches_equal_fresh_ones(size: int) -> None:
    b = _batches(size)
    g = torch.Generator().manual_seed(b.seed * 1_000_003 + 3)
    order = torch.randperm(b.num_examples, generator=g)
    flips = torch.rand(b.num_examples, generator=g) < 0.5
    for i, (x, _) in enumerate(b.epoch(3)):  # each batch dropped before the next: reuse
        sl = slice(i * b.batch_size, (i + 1) * b.batch_size)
        ref = preprocess(b.images[order[sl]], size, flips[sl])
        assert torch.equal(x, ref)


def test_held_batches_are_never_overwritten() -> None:
    b = _batches()
    kept = [x for x, _ in b.epoch(1)]  # all held at once
    views = [x[:1] for x, _ in b.epoch(1)]  # only a slice of each held
    again = [x.clone() for x, _ in b.epoch(1)]
    for k, v, a in zip(kept, views, again, strict=True):
        assert torch.equal(k, a) and torch.equal(v, a[:1])
    assert len({x.data_ptr() for x in kept}) == len(kept)


def test_buffers_are_reused_when_batches_are_dropped() -> None:
    from m2mdc.data.loader import OutputBuffers

    bufs = OutputBuffers()
    if bufs._free_count is None:
        pytest.skip("this torch has no storage use count; buffers are never reused")
    first = bufs.take((2, 3, 4, 4))
    view = first.view(first.shape)
    assert bufs.take((2, 3, 4, 4)) is not first  # held through the view
    del view
    assert bufs.take((2, 3, 4, 4)) is first


BATCH_SIZES = [(8, 32), (32, 224), (64, 32), (32, 32), (64, 48)]


def _random_batch(src: int, dst: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(src + dst)
    imgs = torch.randint(0, 256, (12, 3, src, src), generator=g, dtype=torch.uint8)
    return imgs, torch.rand(12, generator=g) < 0.5


def _normalised(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize(("src", "dst"), BATCH_SIZES)
def test_batch_path_is_bitwise_the_documented_formula(src: int, dst: int) -> None:
    """Buffers and in-place flips change speed only: flip and normalise at the stored size,
    then resize with the antialiased bilinear kernel (the CPU's choice in both directions)."""
    import torch.nn.functional as F

    from m2mdc.data.loader import OutputBuffers

    imgs, flip = _random_batch(src, dst)
    x = imgs.float() / 255.0
    x = _normalised(torch.where(flip[:, None, None, None], x.flip(-1), x))
    if src != dst:
        x = F.interpolate(x, size=(dst, dst), mode="bilinear", antialias=True)
    assert torch.equal(preprocess(imgs, dst, flip), x)
    assert torch.equal(preprocess(imgs, dst, flip, None, OutputBuffers()), x)


@pytest.mark.parametrize(("src", "dst"), BATCH_SIZES)
def test_batch_path_equals_resize_then_flip_then_normalise(src: int, dst: int) -> None:
    """Flipping and normalising before the resize is the textbook order's result up to float
    rounding (bilinear resizing is linear, weights summing to one, mirror-symmetric): within
    a thousandth of a uint8 level, and exactly when there is nothing to resize."""
    import torch.nn.functional as F

    imgs, flip = _random_batch(src, dst)
    x = imgs.float() / 255.0
    if src != dst:
        x = F.interpolate(x, size=(dst, dst), mode="bilinear", antialias=src > dst)
    ref = _normalised(torch.where(flip[:, None, None, None], x.flip(-1), x))
    ours = preprocess(imgs, dst, flip)
    if src == dst:
        assert torch.equal(ours, ref)
    else:
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-3 * ONE_LEVEL, diff
