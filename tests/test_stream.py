"""Streaming from disk (``dataset.in_memory``) and ``dataset=imagenet``: a streamed split gives
the batches of the same split held in memory, bit for bit, in the same order, for every
augmentation preset, epoch and resumed batch; ``auto`` streams exactly what exceeds the memory
budget; ImageNet's layout is read (and refused) as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2mdc.data.datasets import FileData, ImageData, check_tree, load_split
from m2mdc.data.loader import Batches, preprocess
from m2mdc.errors import M2MError
from m2mdc.train.loop import TrainSpec, ce_loss, fit
from tests.conftest import run_cli, tiny_classifier
from tests.test_data import ds_cfg

CLASSES = ("a", "b", "c")
WNIDS = ("n01440764", "n01443537", "n01484850")


def _image(path: Path, seed: int, size: tuple[int, int], fmt: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, fmt)
    return arr


def _png_tree(root: Path, n: int = 7, sizes=((12, 12),)) -> Path:
    """root/{train,test}/<class>/<i>.png; image i of a class has size ``sizes[i % len]``."""
    for s, split in enumerate(("train", "test")):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                _image(
                    root / split / name / f"{i}.png", 100 * s + 10 * c + i, sizes[i % len(sizes)]
                )
    return root


def _imagenet_tree(root: Path, n: int = 4) -> Path:
    """root/{train,val}/<wnid>/<wnid>_<i>.JPEG, JPEGs of two sizes (as ImageNet's vary)."""
    for s, split in enumerate(("train", "val")):
        for c, wnid in enumerate(WNIDS):
            for i in range(n):
                size = (40, 30) if i % 2 else (32, 36)
                _image(root / split / wnid / f"{wnid}_{i}.JPEG", 50 * s + 7 * c + i, size, "JPEG")
    return root


def _both(
    root: Path, name: str = "imagefolder", split: str = "train", **kw
) -> tuple[ImageData, FileData]:
    """The split held in memory and streamed (2 decoding processes)."""
    mem = load_split(ds_cfg(name=name, root=str(root), in_memory="true", **kw), split)
    cfg = ds_cfg(name=name, root=str(root), in_memory="false", **{**kw, "num_workers": 2})
    streamed = load_split(cfg, split)
    assert isinstance(mem, ImageData) and isinstance(streamed, FileData)
    return mem, streamed


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("augment", ["flip", "cifar", "imagenet"])
@pytest.mark.parametrize("sizes", [((12, 12),), ((12, 12), (9, 14))], ids=["one", "mixed"])
def test_streamed_batches_equal_the_in_memory_batches(tmp_path, augment, sizes):
    mem, streamed = _both(_png_tree(tmp_path, sizes=sizes), image_size=16)
    for train in (True, False):
        a = Batches(mem, 5, 16, train=train, seed=3, augment=augment)
        b = Batches(streamed, 5, 16, train=train, seed=3, augment=augment)
        for epoch in (0, 1):
            batches = list(b.epoch(epoch))
            assert _same(list(a.epoch(epoch)), batches) and len(batches) == 5
            # a resumed epoch: the same tail
            assert _same(list(a.epoch(epoch, start_batch=3)), list(b.epoch(epoch, start_batch=3)))
        if train:  # shuffled, and differently per epoch: the order is really exercised
            assert not torch.equal(next(b.epoch(0))[1], next(b.epoch(1))[1])


def test_a_streamed_batch_is_the_files_decoded_by_pil(tmp_path):
    root = _png_tree(tmp_path)
    _, streamed = _both(root, image_size=12)
    x, y = next(Batches(streamed, 4, 12).epoch(0))
    files = [root / "train" / "a" / f"{i}.png" for i in range(4)]
    raw = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files])
    assert torch.equal(x, preprocess(raw, 12)) and y.tolist() == [0, 0, 0, 0]


def test_a_short_training_gives_the_same_metrics_streamed(tmp_path):
    root = _png_tree(tmp_path)
    runs = []
    pairs = zip(_both(root, image_size=12), _both(root, split="test", image_size=12), strict=True)
    for data, test in pairs:
        model = tiny_classifier()
        spec = TrainSpec(
            epochs=2, lr=1e-2, grad_clip=1.0, fingerprint="fp", desc="t",
            state_path=tmp_path / f"{type(data).__name__}.pt",
        )  # fmt: skip
        train = Batches(data, 6, 12, train=True, seed=1, augment="cifar")
        res = fit(model, model.parameters(), train, Batches(test, 8, 12), spec, loss_fn=ce_loss)
        runs.append((res.history, model.state_dict()))
    (hist_a, state_a), (hist_b, state_b) = runs
    assert hist_a == hist_b and len(hist_a) == 2
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_auto_streams_exactly_the_splits_over_the_budget(tmp_path):
    root = _png_tree(tmp_path)
    decoded = 3 * 7 * 3 * 12 * 12  # images x channels x pixels
    for budget, kind in ((decoded * 1.001, ImageData), (decoded * 0.999, FileData)):
        cfg = ds_cfg(name="imagefolder", root=str(root), memory_budget_gb=budget / 1e9)
        assert isinstance(load_split(cfg, "train"), kind), budget
    # without a budget: a quarter of the RAM holds this tree; true ignores the budget
    assert isinstance(load_split(ds_cfg(name="imagefolder", root=str(root)), "train"), ImageData)
    cfg = ds_cfg(name="imagefolder", root=str(root), in_memory="true", memory_budget_gb=1e-9)
    assert isinstance(load_split(cfg, "train"), ImageData)


def test_a_streamed_file_that_stops_decoding_is_named_in_one_line(tmp_path):
    root = _png_tree(tmp_path)
    _, streamed = _both(root, image_size=12)
    bad = root / "train" / "b" / "2.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the header still reads: only decoding fails
    with pytest.raises(M2MError) as exc:
        list(Batches(streamed, 5, 12).epoch(0))
    msg = str(exc.value)
    assert msg.startswith(f"dataset.root: {bad} cannot be decoded") and "\n" not in msg


def test_in_memory_is_validated_and_refused_where_nothing_streams(compose_cfg):
    from m2mdc.config import validate

    for value in ("auto", "true", "false"):  # Hydra reads true/false as booleans
        validate(compose_cfg(f"dataset.in_memory={value}"))
    with pytest.raises(M2MError, match="choose one of: auto, true, false"):
        validate(compose_cfg("dataset.in_memory=maybe"))
    with pytest.raises(M2MError, match=r"dataset.in_memory=false: dataset=digits is read whole"):
        check_tree(compose_cfg("dataset.in_memory=false").dataset)


def test_how_the_data_is_read_is_not_in_any_fingerprint(compose_cfg, tmp_path):
    import m2mdc.stages  # noqa: F401  (registers the stages)
    from m2mdc.stage import Context

    fps = {
        Context(compose_cfg(*args), tmp_path).fingerprint("teacher")
        for args in ([], ["dataset.in_memory=false", "dataset.memory_budget_gb=3"])
    }
    assert len(fps) == 1
    # while a setting that changes the batches does change it
    other = Context(compose_cfg("dataset.augment=cifar"), tmp_path).fingerprint("teacher")
    assert other not in fps


def test_imagenet_preset_reads_train_and_val_wnid_folders(compose_cfg, tmp_path):
    root = _imagenet_tree(tmp_path)
    ds = compose_cfg("dataset=imagenet", f"dataset.root={root}").dataset
    assert (ds.image_size, ds.augment, ds.in_memory) == (224, "imagenet", "auto")
    assert set(check_tree(ds)) == {"train", "test"}
    small = ds_cfg(name="imagenet", root=str(root), image_size=24)
    test = load_split(small, "test")  # the val folder is the reporting split
    assert isinstance(test, ImageData) and test.classes == list(WNIDS)
    assert (
        test.images.shape == (12, 3, 24, 24) and test.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    )
    # the JPEGs decoded by PIL and resized to the common size (their sizes differ)
    first = np.array(Image.open(root / "val" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").convert("RGB"))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(first).permute(2, 0, 1)[None].float(), size=(24, 24),
        mode="bilinear", antialias=True, align_corners=False,
    )[0].round().clamp(0, 255).byte()  # fmt: skip
    assert torch.equal(test.images[0], ref)
    mem, streamed = _both(root, "imagenet", image_size=24)
    a = Batches(mem, 5, 24, train=True, seed=0, augment="imagenet")
    b = Batches(streamed, 5, 24, train=True, seed=0, augment="imagenet")
    assert _same(list(a.epoch(2)), list(b.epoch(2)))


def _imagenet_refused(root: Path, match: str) -> None:
    with pytest.raises(M2MError, match=match) as exc:
        check_tree(ds_cfg(name="imagenet", root=str(root), val_fraction=0.0))
    msg = str(exc.value)
    assert msg.startswith("dataset.root") and "\n" not in msg
    assert "dataset.root/train/<wnid>/*.JPEG and dataset.root/val/<wnid>/*.JPEG" in msg


def test_imagenet_layout_errors_name_the_root_and_the_layout(tmp_path):
    _imagenet_refused(tmp_path / "nope", "does not exist or is not a folder")
    root = _imagenet_tree(tmp_path / "tree")
    for f in (root / "val").rglob("*.JPEG"):  # the validation archive as it extracts: flat
        f.rename(root / "val" / f.name)
    for d in (root / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    _imagenet_refused(root, "val holds its images directly, not in class folders")
    (root / "train").rename(root / "training")
    _imagenet_refused(root, "train does not exist")


@pytest.mark.slow
def test_imagenet_run_with_a_missing_root_exits_2_writing_nothing(tmp_path):
    proc = run_cli(
        "run",
        "dataset=imagenet",
        f"dataset.root={tmp_path / 'imagenet'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("m2mdc: error: dataset.root: "), lines
    assert "dataset.root/train/<wnid>/*.JPEG" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_png_tree_streamed_decodes_losslessly(tmp_path):
    """The equality above is not an artefact of decoding twice: the streamed pixels are the
    PNG's own."""
    root = tmp_path / "t"
    arrays = {
        (c, i): _image(root / "train" / c / f"{i}.png", i, (6, 5)) for c in "xy" for i in (0, 1)
    }
    (root / "test").symlink_to(root / "train")
    streamed = load_split(ds_cfg(name="imagefolder", root=str(root), in_memory="false"), "train")
    assert isinstance(streamed, FileData) and streamed.shape == (5, 6)
    for k, (c, i) in enumerate(sorted(arrays)):
        img = streamed.decode(k)
        assert isinstance(img, torch.Tensor)
        assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(arrays[(c, i)]))
