"""Datasets and the batch pipeline."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from m2mdc.data.datasets import ImageData, class_interleaved_order, limit, load_split
from m2mdc.data.loader import IMAGENET_MEAN, IMAGENET_STD, Batches, preprocess
from m2mdc.errors import M2MError


def ds_cfg(**kw):
    base = dict(
        name="digits",
        root=None,
        download=False,
        image_size=32,
        num_classes=None,
        limit_train=None,
        limit_test=None,
        batch_size=8,
        eval_batch_size=16,
        num_workers=0,
        fake_train_size=64,
        fake_test_size=16,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def test_digits_split_is_stratified_disjoint_and_scaled():
    from sklearn.datasets import load_digits

    train, test = load_split(ds_cfg(), "train"), load_split(ds_cfg(), "test")
    assert len(train) + len(test) == len(load_digits().target)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 8, 8)
    assert int(train.images.max()) == 255
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37


def test_limit_is_class_stratified_and_seed_independent():
    labels = torch.arange(10).repeat_interleave(50)  # sorted by class, like an image folder
    data = ImageData(
        torch.zeros(500, 3, 2, 2, dtype=torch.uint8), labels, [str(i) for i in range(10)]
    )
    sub = limit(data, 40)
    assert torch.bincount(sub.labels, minlength=10).tolist() == [4] * 10
    torch.manual_seed(123)
    assert torch.equal(limit(data, 40).labels, sub.labels)


def test_class_interleaved_order_mixes_classes_in_every_prefix():
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    order = class_interleaved_order(labels, seed=5)
    assert sorted(order.tolist()) == list(range(60))
    assert sorted(labels[order[:6]].tolist()) == [0, 0, 1, 1, 2, 2]
    assert torch.equal(order, class_interleaved_order(labels, seed=5))
    assert not torch.equal(order, class_interleaved_order(labels, seed=6))


def test_preprocess_normalises_with_imagenet_stats_and_resizes():
    img = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    x = preprocess(img, 32)
    assert x.shape == (2, 3, 32, 32)
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    assert torch.allclose(x[0, :, 5, 5], torch.tensor(expected), atol=1e-6)


def test_preprocess_flip_mirrors_only_selected_images():
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    x = preprocess(img, 4, flip=torch.tensor([True, False]))
    ref = preprocess(img, 4)
    assert torch.equal(x[0], ref[0].flip(-1)) and torch.equal(x[1], ref[1])


def test_train_batches_are_deterministic_per_seed_and_epoch():
    data = load_split(ds_cfg(), "train")
    b = Batches(data, 32, 16, train=True, seed=3)
    first = [y for _, y in b.epoch(1)]
    again = [y for _, y in Batches(data, 32, 16, train=True, seed=3).epoch(1)]
    other = [y for _, y in b.epoch(2)]
    assert all(torch.equal(a, c) for a, c in zip(first, again, strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(first, other, strict=True))
    assert sum(y.numel() for y in first) == len(data) and len(b) == len(first)


def _write_folder(root, classes=("cat", "dog"), n=3, size=(10, 10)):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


def test_imagefolder_reads_classes_in_folder_order(tmp_path):
    _write_folder(tmp_path)
    data = load_split(
        ds_cfg(name="imagefolder", root=str(tmp_path)), "train", str(tmp_path / "cache")
    )
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images.shape == (6, 3, 10, 10)
    png = np.array(Image.open(tmp_path / "train" / "dog" / "1.png"))
    assert torch.equal(data.images[4].permute(1, 2, 0), torch.from_numpy(png))
    # the decoded split is cached and read back identically
    again = load_split(
        ds_cfg(name="imagefolder", root=str(tmp_path)), "train", str(tmp_path / "cache")
    )
    assert torch.equal(again.images, data.images)


def test_imagefolder_errors_name_the_root(tmp_path):
    with pytest.raises(M2MError, match="does not exist"):
        load_split(ds_cfg(name="imagefolder", root=str(tmp_path / "nope")), "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(M2MError, match="has no class folders"):
        load_split(ds_cfg(name="imagefolder", root=str(tmp_path)), "train")


def test_cifar_offline_error_is_clear(tmp_path):
    with pytest.raises(M2MError, match="dataset=cifar10"):
        load_split(ds_cfg(name="cifar10", root=str(tmp_path), download=False), "train")


def test_fake_dataset_has_requested_classes():
    data = load_split(ds_cfg(name="fake", num_classes=7, image_size=12), "train")
    assert data.num_classes == 7 and data.images.shape == (64, 3, 12, 12)
