"""Datasets as in-memory uint8 tensors: digits, CIFAR-10/100, image folders, fake.

Every split becomes an :class:`ImageData` (``images`` uint8 ``[N, 3, H, W]``, ``labels`` int64),
so the batch pipeline (:mod:`m2mdc.data.loader`) resizes, flips and normalises whole batches
on the device instead of decoding and resizing image by image.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from m2mdc.errors import M2MError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageData:
    """One split held in memory."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index: torch.Tensor) -> ImageData:
        return ImageData(self.images[index], self.labels[index], self.classes)


def class_interleaved_order(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Indices that visit the classes round robin, each class in a seeded shuffled order.

    Any prefix of this order is (as nearly as possible) class-balanced, which is what both the
    ``limit_*`` subsets and the MI probe set need: image folders list files class by class, so
    "the first N" would be a handful of classes.
    """
    g = torch.Generator().manual_seed(seed)
    per_class = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        per_class.append(idx[torch.randperm(idx.numel(), generator=g)])
    longest = max(t.numel() for t in per_class)
    # rank of each example within its class, then sort by (rank, class position)
    rank = torch.full((labels.numel(),), -1, dtype=torch.long)
    for idx in per_class:
        rank[idx] = torch.arange(idx.numel())
    cls_pos = torch.empty_like(rank)
    for i, idx in enumerate(per_class):
        cls_pos[idx] = i
    key = rank * len(per_class) + cls_pos
    assert longest * len(per_class) > int(key.max())
    return torch.argsort(key)


def limit(data: ImageData, n: int | None) -> ImageData:
    """A fixed class-stratified subset of ``n`` examples (independent of the run's seed)."""
    if n is None or n >= len(data):
        return data
    return data.subset(torch.sort(class_interleaved_order(data.labels, seed=0)[:n]).values)


def _digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.asarray(d.images, dtype=np.float32)  # values 0..16
    y = np.asarray(d.target, dtype=np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.2, random_state=0, stratify=y
    )
    idx = np.sort(idx_train if split == "train" else idx_test)
    img = torch.from_numpy(np.round(x[idx] * (255.0 / 16.0)).astype(np.uint8))
    img = img[:, None].expand(-1, 3, -1, -1).contiguous()
    return ImageData(img, torch.from_numpy(y[idx]), [str(i) for i in range(10)])


def _cifar(name: str, split: str, root: str, download: bool) -> ImageData:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    url = cls.url
    try:
        ds = cls(root=root, train=split == "train", download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise M2MError(
            f"dataset={name}: not found in dataset.root={root} ({exc}); set dataset.download=true "
            f"with internet access, or extract {url} into {root}"
        ) from None
    except OSError as exc:  # URLError and friends when offline
        raise M2MError(
            f"dataset={name}: download failed ({exc.__class__.__name__}: {exc}); without internet, "
            f"fetch {url} elsewhere and extract it into dataset.root={root}"
        ) from None
    img = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ImageData(img, torch.as_tensor(ds.targets, dtype=torch.long), list(ds.classes))


def _list_image_folder(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not split_dir.is_dir():
        raise M2MError(
            f"dataset.root: {split_dir} does not exist (imagefolder needs root/train and root/test)"
        )
    classes = sorted(
        p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not classes:
        raise M2MError(
            f"dataset.root: {split_dir} has no class folders (expected {split_dir}/<class>/<image>)"
        )
    files = [
        (f, i)
        for i, c in enumerate(classes)
        for f in sorted((split_dir / c).rglob("*"))
        if f.suffix.lower() in IMG_EXTENSIONS
    ]
    if not files:
        raise M2MError(f"dataset.root: no images ({', '.join(IMG_EXTENSIONS)}) under {split_dir}")
    return classes, files


def _decode(path: Path, size: int | None) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise M2MError(f"dataset.root: cannot decode image {path}: {exc}") from None
    img = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    if size is not None and tuple(img.shape[1:]) != (size, size):
        img = (
            F.interpolate(
                img[None].float(),
                size=(size, size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
            .round()
            .clamp(0, 255)
            .byte()
        )
    return img


def _image_folder(
    split: str, root: str, image_size: int, workers: int, cache_dir: str | None
) -> ImageData:
    classes, files = _list_image_folder(Path(root) / split)
    from PIL import Image

    with Image.open(files[0][0]) as first:
        w, h = first.size
    # Images of one size are kept as they are (resized later on the batch); mixed sizes are
    # brought to image_size once at decode time so they can be stacked.
    size = None if all_same_size(files, (w, h)) else image_size
    key = hashlib.sha256(
        repr(
            (
                str(Path(root).resolve()),
                split,
                size,
                [(str(f), f.stat().st_mtime_ns) for f, _ in files],
            )
        ).encode()
    ).hexdigest()[:16]
    cache = Path(cache_dir) / "decoded" / f"imagefolder-{key}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        obj = torch.load(cache, weights_only=True)
        return ImageData(obj["images"], obj["labels"], list(obj["classes"]))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        images = list(pool.map(lambda f: _decode(f[0], size), files))
    data = ImageData(torch.stack(images), torch.tensor([c for _, c in files]), classes)
    if cache is not None:
        from m2mdc.artifacts import torch_save_atomic

        torch_save_atomic({"images": data.images, "labels": data.labels, "classes": classes}, cache)
    return data


def all_same_size(files: list[tuple[Path, int]], size: tuple[int, int]) -> bool:
    from PIL import Image

    for f, _ in files:
        with Image.open(f) as im:
            if im.size != size:
                return False
    return True


def _fake(split: str, num_classes: int, n: int, image_size: int) -> ImageData:
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    img = torch.randint(0, 256, (n, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % num_classes
    return ImageData(img, labels, [str(i) for i in range(num_classes)])


def split_validation(data: ImageData, fraction: float) -> tuple[ImageData, ImageData]:
    """``(train, val)``: a class-stratified ``fraction`` of ``data`` held out for validation.

    scikit-learn's ``train_test_split(stratify=labels)`` with a fixed ``random_state``, so the
    split does not change with the run's seed (runs of different seeds select on the same
    images) and every class keeps its share in both parts.
    """
    from sklearn.model_selection import train_test_split

    n_val = max(round(fraction * len(data)), data.num_classes)
    if n_val > len(data) - data.num_classes:
        raise M2MError(
            f"dataset.val_fraction={fraction} leaves too few training examples "
            f"({len(data)} in all, {data.num_classes} classes)"
        )
    labels = data.labels.numpy()
    train_idx, val_idx = train_test_split(
        range(len(data)), test_size=n_val, stratify=labels, random_state=0
    )
    return (
        data.subset(torch.as_tensor(sorted(train_idx))),
        data.subset(torch.as_tensor(sorted(val_idx))),
    )


def load_split(ds: Any, split: str, cache_dir: str | None = None) -> ImageData:
    """Load ``split`` of the dataset described by the ``dataset`` config: "train", "test", or
    "val" (held out of the training split when ``dataset.val_fraction > 0``; "train" is then
    what remains)."""
    if split == "test":
        return _load_split(ds, split, cache_dir)
    train, val = load_train_val(ds, cache_dir)
    if split == "train":
        return train
    if val is None:
        raise M2MError("no validation split: dataset.val_fraction is 0")
    return val


def val_fraction(ds: Any) -> float:
    """``dataset.val_fraction`` of any config-like object (0 when it has none)."""
    return float(getattr(ds, "val_fraction", 0.0) or 0.0)


def load_train_val(ds: Any, cache_dir: str | None = None) -> tuple[ImageData, ImageData | None]:
    """The training split read once, and the validation split held out of it (None when
    ``dataset.val_fraction`` is 0)."""
    train = _load_split(ds, "train", cache_dir)
    fraction = val_fraction(ds)
    return split_validation(train, fraction) if fraction else (train, None)


def _load_split(ds: Any, split: str, cache_dir: str | None) -> ImageData:
    name = ds.name
    if name == "digits":
        data = _digits(split)
    elif name in ("cifar10", "cifar100"):
        data = _cifar(name, split, ds.root or f"data/{name}", ds.download)
    elif name == "imagefolder":
        if not ds.root:
            raise M2MError("dataset.root is required for dataset=imagefolder")
        data = _image_folder(split, ds.root, ds.image_size, ds.num_workers, cache_dir)
    elif name == "fake":
        n = ds.fake_train_size if split == "train" else ds.fake_test_size
        data = _fake(split, ds.num_classes or 10, n, ds.image_size)
    else:  # validated by the schema; kept for direct library callers
        raise M2MError(
            f"dataset={name} is not valid; "
            "choose one of: digits, cifar10, cifar100, imagefolder, fake"
        )
    if ds.num_classes is not None and name != "fake" and ds.num_classes != data.num_classes:
        raise M2MError(
            f"dataset.num_classes={ds.num_classes} but dataset={name} "
            f"has {data.num_classes} classes"
        )
    return limit(data, ds.limit_train if split == "train" else ds.limit_test)
