"""Image trees are checked before anything trains: the tree's shape (classes, empty classes,
class sets of the splits, a missing test split) and every file's decodability
(``dataset.bad_files``)."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2mdc.data import datasets
from m2mdc.data.datasets import check_tree, has_test_split, load_split
from m2mdc.errors import M2MError
from tests.conftest import run_cli
from tests.test_data import ds_cfg


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _tree(root: Path, splits=None, n: int = 3) -> Path:
    """root/<split>/<class>/<i>.png, 8x8 images; ``splits`` maps split -> class names."""
    splits = splits or {"train": ["cat", "dog"], "test": ["cat", "dog"]}
    for s, (split, classes) in enumerate(splits.items()):
        for c, name in enumerate(classes):
            for i in range(n):
                _png(root / split / name / f"{i}.png", seed=100 * s + 10 * c + i)
    return root


def _truncated_jpeg(path: Path) -> None:
    """A JPEG whose header is valid (PIL opens it and reads its size) but whose data ends
    early."""
    buf = io.BytesIO()
    arr = np.random.default_rng(7).integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    path.write_bytes(buf.getvalue()[:-20])
    with Image.open(path) as im:
        assert im.size == (8, 8)  # only decoding fails


WHY = {  # what the refusal says of each
    "truncated.jpg": "image file is truncated (",
    "zero.jpg": "empty file",
    "text.png": "not an image format PIL can read",
}
BAD = {
    "truncated.jpg": _truncated_jpeg,
    "zero.jpg": lambda p: p.write_bytes(b""),
    "text.png": lambda p: p.write_text("not an image\n"),
}


def folder(root: Path, **kw):
    return ds_cfg(name="imagefolder", root=str(root), val_fraction=0.0, **kw)


def _refused(ds, match: str) -> str:
    with pytest.raises(M2MError, match=match) as exc:
        check_tree(ds)
    msg = str(exc.value)
    assert msg.startswith("dataset.root") and "\n" not in msg
    # loading runs the same check (any entry point is protected)
    with pytest.raises(M2MError, match=match):
        load_split(ds, "train")
    return msg


def test_one_class_is_refused(tmp_path):
    root = _tree(tmp_path, {"train": ["cat"], "test": ["cat"]})
    msg = _refused(folder(root), "one class folder")
    assert f"{root / 'train'} has one class folder (cat)" in msg and "at least 2" in msg


def test_empty_class_folder_is_refused(tmp_path):
    root = _tree(tmp_path)
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / "notes.txt").write_text("no images here")
    msg = _refused(folder(root), "without images")
    assert f"{root / 'train'} has class folders without images: bird " in msg


def test_differing_class_sets_name_the_classes_only_in_one_split(tmp_path):
    root = _tree(tmp_path, {"train": ["cat", "dog", "emu"], "test": ["ant", "cat", "dog"]})
    msg = _refused(folder(root), "different class folders")
    assert "(only in train: emu; only in test: ant)" in msg
    assert str(root / "train") in msg and str(root / "test") in msg


def test_check_tree_lists_without_decoding(tmp_path, monkeypatch):
    root = _tree(tmp_path)
    for name, make in BAD.items():
        make(root / "train" / "dog" / name)
    (root / "train" / "dog" / "readme.txt").write_text("not an image file name")

    def no_decoding(*args, **kwargs):
        raise AssertionError("check_tree opened an image")

    monkeypatch.setattr(Image, "open", no_decoding)
    tree = check_tree(folder(root))
    assert sorted(tree) == ["test", "train"]
    assert tree["train"].classes == ["cat", "dog"]
    assert len(tree["train"].files) == 6 + len(BAD) and len(tree["test"].files) == 6
    assert check_tree(ds_cfg(name="digits")) == {}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_each_kind_of_undecodable_file_is_refused_by_default(tmp_path, bad):
    root = _tree(tmp_path)
    BAD[bad](root / "train" / "dog" / bad)
    ds = folder(root)
    ds.bad_files = "error"
    with pytest.raises(M2MError) as exc:
        load_split(ds, "train", str(tmp_path / "cache"))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("dataset.root")
    assert f"1 of 7 image files under {root / 'train'} cannot be decoded" in msg
    assert f"decoded ({root / 'train' / 'dog' / bad}: {WHY[bad]}" in msg
    assert msg.endswith("fix or remove it, or set dataset.bad_files=skip to leave it out")
    assert not (tmp_path / "cache" / "decoded").exists()  # a refused load caches nothing
    # without the setting (a library caller's config object): the same refusal
    del ds.bad_files
    with pytest.raises(M2MError, match=r"dataset\.bad_files=skip"):
        load_split(ds, "train")


def _tree_with_bad_files(root: Path) -> tuple[Path, list[str]]:
    _tree(root, n=4)
    names = ["cat/text.png", "dog/truncated.jpg", "dog/zero.jpg"]
    for name in names:
        BAD[name.split("/")[1]](root / "train" / name)
    return root, names


def test_error_counts_the_bad_files_and_names_the_first(tmp_path):
    root, names = _tree_with_bad_files(tmp_path)
    with pytest.raises(M2MError) as exc:
        load_split(folder(root, bad_files="error"), "train")
    msg = str(exc.value)
    assert f"3 of 11 image files under {root / 'train'} cannot be decoded" in msg
    assert f"(first {root / 'train' / names[0]}: not an image format PIL can read)" in msg
    assert msg.endswith("or set dataset.bad_files=skip to leave them out")


def test_skip_leaves_out_exactly_the_bad_files_and_logs_one_line(tmp_path, caplog):
    root, names = _tree_with_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="m2mdc"):
        data = load_split(folder(root, bad_files="skip"), "train")
    assert len(data) == 8 and data.labels.tolist() == [0] * 4 + [1] * 4
    good = sorted((root / "train").glob("*/?.png"))
    expected = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in good])
    assert torch.equal(data.images.permute(0, 2, 3, 1), expected)
    lines = [r.getMessage() for r in caplog.records if "bad_files" in r.getMessage()]
    assert lines == [
        f"dataset.bad_files=skip: left out 3 of 11 image files under {root / 'train'} that "
        f"cannot be decoded: {', '.join(names)}"
    ]


def test_skip_refuses_a_class_left_without_images(tmp_path):
    root = _tree(tmp_path, n=2)
    for png in (root / "train" / "dog").iterdir():
        png.write_bytes(b"")
    with pytest.raises(M2MError, match=r"no image under .*train can be decoded in the .* dog$"):
        load_split(folder(root, bad_files="skip"), "train")


def test_cached_decode_keeps_its_bad_files_whatever_the_setting(tmp_path, monkeypatch, caplog):
    root, names = _tree_with_bad_files(tmp_path / "tree")
    cache = str(tmp_path / "cache")
    skipped = load_split(folder(root, bad_files="skip"), "train", cache)
    assert len(list((tmp_path / "cache" / "decoded").iterdir())) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(datasets, "_decode", no_decoding)
    with pytest.raises(
        M2MError, match=f"3 of 11 .*first {re.escape(str(root / 'train' / names[0]))}: "
    ):
        load_split(folder(root, bad_files="error"), "train", cache)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m2mdc"):
        again = load_split(folder(root, bad_files="skip"), "train", cache)
    assert torch.equal(again.images, skipped.images)
    assert torch.equal(again.labels, skipped.labels)
    assert sum("left out 3 of 11" in r.getMessage() for r in caplog.records) == 1


def test_train_only_tree_needs_a_validation_split(tmp_path):
    root = _tree(tmp_path, {"train": ["cat", "dog"]}, n=4)
    with pytest.raises(M2MError) as exc:
        load_split(folder(root), "train")
    msg = str(exc.value)
    assert f"dataset.root: {root} has no test folder" in msg
    assert "set dataset.val_fraction (e.g. dataset.val_fraction=0.1)" in msg

    ds = folder(root)
    ds.val_fraction = 0.25
    assert not has_test_split(ds)
    train, val = load_split(ds, "train"), load_split(ds, "val")
    assert (len(train), len(val)) == (6, 2)
    assert sorted(val.labels.tolist()) == [0, 1]  # stratified
    with pytest.raises(M2MError, match="has no test folder, so there is no test split"):
        load_split(ds, "test")


def test_has_test_split(tmp_path):
    assert has_test_split(folder(_tree(tmp_path)))
    assert has_test_split(ds_cfg(name="digits")) and has_test_split(ds_cfg(name="fake"))


def test_check_tree_reads_a_composed_config(compose_cfg, tmp_path):
    root = _tree(tmp_path, {"train": ["cat", "dog"]})
    cfg = compose_cfg("dataset=imagefolder", f"dataset.root={root}")
    with pytest.raises(M2MError, match="has no test folder"):
        check_tree(cfg.dataset)
    cfg = compose_cfg("dataset=imagefolder", f"dataset.root={root}", "dataset.val_fraction=0.1")
    assert list(check_tree(cfg.dataset)) == ["train"] and not has_test_split(cfg.dataset)
    with pytest.raises(M2MError, match=f"dataset.root: {re.escape(str(root / 'nope'))} does"):
        check_tree(compose_cfg("dataset=imagefolder", f"dataset.root={root / 'nope'}").dataset)


def test_bad_files_setting_is_validated(compose_cfg):
    from m2mdc.config import validate

    assert compose_cfg("dataset=imagefolder", "dataset.root=x").dataset.bad_files == "error"
    validate(compose_cfg("dataset.bad_files=skip"))
    with pytest.raises(
        M2MError, match=r"dataset\.bad_files='maybe' is not valid; choose one of: error, skip"
    ):
        validate(compose_cfg("dataset.bad_files=maybe"))


@pytest.mark.slow
def test_run_on_a_tree_with_a_bad_file_exits_2_with_one_line(tmp_path):
    from tests.test_e2e import TINY

    root = _tree(tmp_path / "tree")
    BAD["text.png"](root / "train" / "cat" / "text.png")
    proc = run_cli(
        "run",
        *TINY,
        "dataset=imagefolder",
        f"dataset.root={root}",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "dataset.bad_files=skip" in lines[0]
    assert str(root / "train" / "cat" / "text.png") in lines[0]
    assert not (tmp_path / "run" / "teacher" / "model.pt").exists()
