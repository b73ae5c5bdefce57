"""Datasets as in-memory uint8 tensors: digits, CIFAR-10/100, image trees, fake.

Every split becomes an :class:`ImageData` (``images`` uint8 ``[N, 3, H, W]``, ``labels`` int64),
so the batch pipeline (:mod:`m2mdc.data.loader`) resizes, flips and normalises whole batches
on the device instead of decoding and resizing image by image. A split of an image tree
(``dataset=imagefolder``, ``imagenet``) whose decoded size exceeds the memory budget
(``dataset.in_memory``, ``dataset.memory_budget_gb``) is a :class:`FileData` instead: its
files, decoded batch by batch in the loader's worker processes into the same uint8 images.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from m2mdc.config import DATASETS, IMAGE_TREES
from m2mdc.errors import M2MError
from m2mdc.ui import log

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class _Labelled:
    """What every split answers from its labels and class names."""

    labels: torch.Tensor  # int64 [N]
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class ImageData(_Labelled):
    """One split held in memory."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]

    def subset(self, index: torch.Tensor) -> ImageData:
        return ImageData(self.images[index], self.labels[index], self.classes)


@dataclass
class FileData(_Labelled):
    """One split of an image tree left on disk (streamed): what :func:`_decode` makes of
    ``files[i]`` at ``size`` is the uint8 ``[3, *shape]`` image an :class:`ImageData` of the
    split would hold at ``i``."""

    files: list[Path]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    size: int | None  # the decode size (None: every image has its stored size, ``shape``)
    shape: tuple[int, int]  # (H, W) of every decoded image
    workers: int = 0  # the loader's decoding processes (dataset.num_workers; 0: in-process)

    def subset(self, index: torch.Tensor) -> FileData:
        files = [self.files[i] for i in index.tolist()]
        return FileData(
            files, self.labels[index], self.classes, self.size, self.shape, self.workers
        )

    def decode(self, i: int) -> torch.Tensor | str:
        """Image ``i`` as uint8 ``[3, H, W]``, or why it cannot be decoded (see
        :func:`undecodable`)."""
        return _decode(self.files[i], self.size)


def undecodable(path: Path, why: str) -> M2MError:
    """The error of a streamed file that cannot be decoded: its header was read when the
    split was listed, its data only when a batch needs it."""
    return M2MError(
        f"dataset.root: {path} cannot be decoded ({why}); fix or remove it (a streamed split "
        "is only checked file by file as its batches are read)"
    )


Split = ImageData | FileData


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


def limit(data: Split, n: int | None) -> Split:
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


@dataclass(frozen=True)
class FolderSplit:
    """One split of an image tree as listed (nothing decoded): ``files`` are
    ``(path, class index)`` pairs in class order, then path order."""

    dir: Path
    classes: list[str]
    files: list[tuple[Path, int]]


# each image tree's folder per split (m2mdc's split -> folder under dataset.root) and its
# layout in words: ImageNet's validation images are its reporting ("test") split
FOLDERS = {
    "imagefolder": {"train": "train", "test": "test"},
    "imagenet": {"train": "train", "test": "val"},
}
LAYOUTS = {
    "imagefolder": "dataset.root/train/<class>/<image> (and test/<class>/<image>)",
    "imagenet": "dataset.root/train/<wnid>/*.JPEG and dataset.root/val/<wnid>/*.JPEG",
}


def _folder_root(ds: Any) -> Path:
    if not ds.root:
        raise M2MError(f"dataset.root is required for dataset={ds.name} ({LAYOUTS[ds.name]})")
    root = Path(ds.root).expanduser()
    if not root.is_dir():
        raise M2MError(
            f"dataset.root: {ds.root} does not exist or is not a folder "
            f"(dataset={ds.name} expects {LAYOUTS[ds.name]})"
        )
    return root


def _names(items: list[str], first: int = 5) -> str:
    """``a, b, c and 4 more``: a short list for a one-line message."""
    more = f" and {len(items) - first} more" if len(items) > first else ""
    return ", ".join(items[:first]) + more


def _list_split(root: Path, folder: str, layout: str) -> FolderSplit:
    split_dir = root / folder
    if not split_dir.is_dir():
        raise M2MError(f"dataset.root: {split_dir} does not exist (expected {layout})")
    classes = sorted(
        p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not classes:
        loose = any(f.suffix.lower() in IMG_EXTENSIONS for f in split_dir.iterdir())
        held = (
            "holds its images directly, not in class folders" if loose else "has no class folders"
        )
        raise M2MError(f"dataset.root: {split_dir} {held} (expected {layout})")
    if len(classes) < 2:
        raise M2MError(
            f"dataset.root: {split_dir} has one class folder ({classes[0]}); "
            "a classifier needs at least 2"
        )
    per_class = [
        sorted(
            f
            for f in (split_dir / c).rglob("*")
            if f.suffix.lower() in IMG_EXTENSIONS and f.is_file()
        )
        for c in classes
    ]
    empty = [c for c, fs in zip(classes, per_class, strict=True) if not fs]
    if empty:
        raise M2MError(
            f"dataset.root: {split_dir} has class folders without images: {_names(empty)} "
            f"(image files end in {', '.join(IMG_EXTENSIONS)})"
        )
    files = [(f, i) for i, fs in enumerate(per_class) for f in fs]
    return FolderSplit(split_dir, classes, files)


def in_memory_mode(ds: Any) -> str:
    """``dataset.in_memory`` as ``auto``, ``true`` or ``false`` (Hydra reads true as a bool)."""
    return str(getattr(ds, "in_memory", "auto")).lower()


def check_tree(ds: Any) -> dict[str, FolderSplit]:
    """Check an image tree (``dataset=imagefolder``, ``imagenet``) without decoding anything,
    and return its listing per split ("train", and "test" when there is a test folder: ``val``
    for ImageNet); ``{}`` for datasets that are not image trees.

    Refused with a one-line :class:`M2MError` naming ``dataset.root`` and the expected layout:
    a missing root or ``train`` folder, images outside class folders, fewer than 2 class
    folders, a class folder without image files, train and test folders with different classes,
    and a tree without a test folder when ``dataset.val_fraction`` is 0 (nothing to evaluate
    on). ``dataset.in_memory=false`` is refused for the datasets that are not image trees.
    """
    if ds.name not in IMAGE_TREES:
        if in_memory_mode(ds) == "false":
            raise M2MError(
                f"dataset.in_memory=false: dataset={ds.name} is read whole by its loader; "
                f"streaming from disk is for the image trees (dataset={', '.join(IMAGE_TREES)})"
            )
        return {}
    root, folders, layout = _folder_root(ds), FOLDERS[ds.name], LAYOUTS[ds.name]
    tree = {"train": _list_split(root, folders["train"], layout)}
    test_dir = root / folders["test"]
    if not test_dir.exists():
        if not val_fraction(ds):
            raise M2MError(
                f"dataset.root: {root} has no {folders['test']} folder (expected {layout}); set "
                "dataset.val_fraction (e.g. dataset.val_fraction=0.1) to evaluate on images held "
                "out of its train folder"
            )
        return tree
    tree["test"] = _list_split(root, folders["test"], layout)
    train, test = set(tree["train"].classes), set(tree["test"].classes)
    if train != test:
        only = [
            f"only in {name}: {_names(sorted(a - b))}"
            for name, a, b in (("train", train, test), (folders["test"], test, train))
            if a - b
        ]
        raise M2MError(
            f"dataset.root: {root / 'train'} and {test_dir} have different class folders "
            f"({'; '.join(only)}); give both splits the same classes"
        )
    return tree


def has_test_split(ds: Any) -> bool:
    """Whether the dataset has a test split: every built-in dataset does; an image tree only
    when it has a test folder (``val`` for ImageNet; otherwise the validation split stands in
    for it)."""
    return ds.name not in IMAGE_TREES or (_folder_root(ds) / FOLDERS[ds.name]["test"]).exists()


# what PIL raises for a file it cannot decode: OSError (UnidentifiedImageError, truncated
# data, decoder errors), ValueError (malformed headers) and DecompressionBombError
DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def _why(path: Path, exc: Exception) -> str:
    """Why ``path`` cannot be decoded, in a few words on one line."""
    if isinstance(exc, UnidentifiedImageError):  # the file was opened: it exists
        return "empty file" if path.stat().st_size == 0 else "not an image format PIL can read"
    return " ".join(str(exc).split()) or type(exc).__name__


def _probe(path: Path) -> tuple[int, int] | str:
    """The image's (width, height) from its header, or why it cannot be opened."""
    try:
        with Image.open(path) as im:
            return im.size
    except DECODE_ERRORS as exc:
        return _why(path, exc)


def _decode(path: Path, size: int | None) -> torch.Tensor | str:
    """uint8 ``[3, H, W]`` (resized to ``size`` x ``size`` when given), or why it cannot be
    decoded."""
    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))
    except DECODE_ERRORS as exc:
        return _why(path, exc)
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


def _bad_files(split: FolderSplit, bad: list[tuple[str, str]], policy: str) -> None:
    """Apply ``dataset.bad_files`` to the undecodable files ``bad`` (``(path relative to the
    split folder, why)``): refuse naming the first, or log one line."""
    if not bad:
        return
    n, total = len(bad), len(split.files)
    if policy != "skip":
        first, why = bad[0]
        which, them = ("first ", "them") if n > 1 else ("", "it")
        raise M2MError(
            f"dataset.root: {n} of {total} image files under {split.dir} cannot be decoded "
            f"({which}{split.dir / first}: {why}); fix or remove {them}, or set "
            f"dataset.bad_files=skip to leave {them} out"
        )
    log.warning(
        "dataset.bad_files=skip: left out %d of %d image files under %s that cannot be decoded: %s",
        n,
        total,
        split.dir,
        _names([name for name, _ in bad], first=3),
    )


def _cache_file(split: FolderSplit, size: int | None, cache_dir: str | None) -> Path | None:
    """Where the decoded split is cached: keyed on the root, the split, the decode size and
    every listed file with its modification time (what was undecodable is stored inside)."""
    if not cache_dir:
        return None
    key = hashlib.sha256(
        repr(
            (
                str(split.dir.parent.resolve()),
                split.dir.name,
                size,
                [(str(f), f.stat().st_mtime_ns) for f, _ in split.files],
            )
        ).encode()
    ).hexdigest()[:16]
    return Path(cache_dir) / "decoded" / f"imagefolder-{key}.pt"


def physical_memory() -> int | None:
    """The machine's RAM in bytes (None where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def memory_budget(ds: Any) -> float:
    """Bytes of decoded images ``dataset.in_memory=auto`` holds in RAM per split:
    ``dataset.memory_budget_gb``, else a quarter of the RAM (unlimited where it is unknown)."""
    gb = getattr(ds, "memory_budget_gb", None)
    if gb is not None:
        return float(gb) * 1e9
    ram = physical_memory()
    return ram / 4 if ram else float("inf")


def keeps_in_memory(ds: Any, num_bytes: int) -> bool:
    """Whether a split of ``num_bytes`` decoded bytes is held in RAM (``dataset.in_memory``)."""
    mode = in_memory_mode(ds)
    return mode == "true" if mode != "auto" else num_bytes <= memory_budget(ds)


def _image_folder(split: FolderSplit, ds: Any, cache_dir: str | None) -> Split:
    files, policy = split.files, getattr(ds, "bad_files", "error")
    with ThreadPoolExecutor(max_workers=max(1, ds.num_workers)) as pool:
        sizes = list(pool.map(lambda f: _probe(f[0]), files))
        # Images of one size are kept as they are (resized later on the batch); mixed sizes are
        # brought to image_size once at decode time so they can be stacked.
        known = {s for s in sizes if not isinstance(s, str)}
        size = None if len(known) <= 1 else ds.image_size
        w, h = next(iter(known)) if size is None and known else (ds.image_size, ds.image_size)
        if not keeps_in_memory(ds, len(files) * 3 * h * w):
            return _streamed(split, sizes, size, (h, w), policy, ds.num_workers)
        cache = _cache_file(split, size, cache_dir)
        if cache is not None and cache.is_file():
            obj = torch.load(cache, weights_only=True)
            _bad_files(split, [(name, why) for name, why in obj.get("bad", [])], policy)
            return ImageData(obj["images"], obj["labels"], list(obj["classes"]))
        decoded = list(
            pool.map(lambda f, s: s if isinstance(s, str) else _decode(f[0], size), files, sizes)
        )
    bad = _undecoded(split, decoded)
    _bad_files(split, bad, policy)
    good = [(d, c) for (_, c), d in zip(files, decoded, strict=True) if not isinstance(d, str)]
    _check_classes(split, [c for _, c in good])
    images = torch.stack([d for d, _ in good])
    data = ImageData(images, torch.tensor([c for _, c in good]), split.classes)
    if cache is not None:
        from m2mdc.artifacts import torch_save_atomic

        obj = {"images": data.images, "labels": data.labels, "classes": split.classes, "bad": bad}
        torch_save_atomic(obj, cache)
    return data


def _undecoded(split: FolderSplit, results: list[Any]) -> list[tuple[str, str]]:
    """``(path relative to the split folder, why)`` of the files whose result is a reason."""
    return [
        (str(f.relative_to(split.dir)), r)
        for (f, _), r in zip(split.files, results, strict=True)
        if isinstance(r, str)
    ]


def _check_classes(split: FolderSplit, labels: list[int]) -> None:
    """Refuse a split in which a class lost every image to ``dataset.bad_files=skip``."""
    lost = sorted(set(range(len(split.classes))) - set(labels))
    if lost:
        raise M2MError(
            f"dataset.root: no image under {split.dir} can be decoded in the class folders "
            f"{_names([split.classes[c] for c in lost])}"
        )


def _streamed(
    split: FolderSplit,
    sizes: list[tuple[int, int] | str],
    size: int | None,
    shape: tuple[int, int],
    policy: str,
    workers: int,
) -> FileData:
    """The split left on disk: the files whose header could be read (the others go through
    ``dataset.bad_files`` as when decoding into memory)."""
    _bad_files(split, _undecoded(split, sizes), policy)
    good = [f for f, s in zip(split.files, sizes, strict=True) if not isinstance(s, str)]
    labels = [c for _, c in good]
    _check_classes(split, labels)
    h, w = shape
    log.info(
        "dataset.in_memory: streaming %d images from %s (%.1f GB decoded)",
        len(good),
        split.dir,
        len(good) * 3 * h * w / 1e9,
    )
    files = [f for f, _ in good]
    return FileData(files, torch.tensor(labels), split.classes, size, shape, workers)


def _fake(split: str, num_classes: int, n: int, image_size: int) -> ImageData:
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    img = torch.randint(0, 256, (n, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % num_classes
    return ImageData(img, labels, [str(i) for i in range(num_classes)])


def split_validation(data: Split, fraction: float) -> tuple[Split, Split]:
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


def load_split(ds: Any, split: str, cache_dir: str | None = None) -> Split:
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


def load_train_val(ds: Any, cache_dir: str | None = None) -> tuple[Split, Split | None]:
    """The training split read once, and the validation split held out of it (None when
    ``dataset.val_fraction`` is 0)."""
    train = _load_split(ds, "train", cache_dir)
    fraction = val_fraction(ds)
    return split_validation(train, fraction) if fraction else (train, None)


def _tree_split(ds: Any, split: str) -> FolderSplit:
    """``split`` of the checked image tree (:func:`check_tree`)."""
    tree = check_tree(ds)
    if split not in tree:
        raise M2MError(
            f"dataset.root: {ds.root} has no {FOLDERS[ds.name][split]} folder, so there is no "
            f"{split} split; "
            "evaluate on the validation split (dataset.val_fraction) instead"
        )
    return tree[split]


def _load_split(ds: Any, split: str, cache_dir: str | None) -> Split:
    name = ds.name
    data: Split
    if name == "digits":
        data = _digits(split)
    elif name in ("cifar10", "cifar100"):
        data = _cifar(name, split, ds.root or f"data/{name}", ds.download)
    elif name in IMAGE_TREES:
        data = _image_folder(_tree_split(ds, split), ds, cache_dir)
    elif name == "fake":
        n = ds.fake_train_size if split == "train" else ds.fake_test_size
        data = _fake(split, ds.num_classes or 10, n, ds.image_size)
    else:  # validated by the schema; kept for direct library callers
        raise M2MError(f"dataset={name} is not valid; choose one of: {', '.join(DATASETS)}")
    if ds.num_classes is not None and name != "fake" and ds.num_classes != data.num_classes:
        raise M2MError(
            f"dataset.num_classes={ds.num_classes} but dataset={name} "
            f"has {data.num_classes} classes"
        )
    return limit(data, ds.limit_train if split == "train" else ds.limit_test)
