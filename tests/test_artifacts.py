"""Checkpoint contract: plain tensors only, rebuild from arch, strict load, clear refusals."""

from __future__ import annotations

import io
import json
import logging
import pickle
import zipfile

import pytest
import torch

from m2mdc.arch import get_adapter
from m2mdc.artifacts import atomic_write_json, load_checkpoint, save_checkpoint
from m2mdc.errors import M2MError


@pytest.fixture
def student():
    ad = get_adapter("resnet18")
    torch.manual_seed(0)
    model = ad.create("resnet18", num_classes=10)
    return ad.keep(model, {"layer1": [1], "layer3": [0]})


def test_checkpoint_round_trip_rebuilds_the_pruned_model(tmp_path, student):
    path = tmp_path / "model.pt"
    save_checkpoint(path, student, {"stage": "prune"})
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "arch", "state_dict", "meta"} and raw["format"] == 1
    json.dumps(raw["arch"])  # the architecture description is plain data
    model, meta = load_checkpoint(path, expect_model="resnet18", expect_classes=10)
    assert meta == {"stage": "prune"}
    assert len(model.layer1) == 1 and len(model.layer3) == 1
    x = torch.randn(2, 3, 32, 32)
    student.eval()
    assert torch.equal(model(x), student(x))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused_and_never_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": _Evil()}, path)
    with pytest.raises(M2MError, match="never unpickles code"):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out
    # a raw pickle stream (not torch's zip format) too
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(M2MError):
        load_checkpoint(raw)
    assert "pwned" not in capsys.readouterr().out


def test_truncated_missing_and_foreign_files_are_clear_errors(tmp_path, student):
    path = tmp_path / "model.pt"
    save_checkpoint(path, student)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(M2MError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(M2MError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "plain.pt")
    with pytest.raises(M2MError, match="not an m2mdc checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(M2MError, match="holds a resnet18 but model=resnet34"):
        load_checkpoint(path, expect_model="resnet34")
    with pytest.raises(M2MError, match="has 10 classes but the dataset has 100"):
        load_checkpoint(path, expect_classes=100)


def test_shape_mismatch_is_reported_by_key(tmp_path, student):
    path = tmp_path / "model.pt"
    save_checkpoint(path, student)
    obj = torch.load(path, weights_only=True)
    obj["state_dict"]["fc.weight"] = torch.zeros(3, 3)
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(M2MError, match=r"fc.weight has shape \(3, 3\)"):
        load_checkpoint(path)


def test_atomic_write_leaves_old_file_when_serialisation_fails(tmp_path):
    p = tmp_path / "m.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"]


def test_checkpoint_is_a_zip_of_tensors(tmp_path, student):
    path = tmp_path / "model.pt"
    save_checkpoint(path, student)
    assert zipfile.is_zipfile(path)


def test_loading_a_run_model_whose_manifest_was_deleted_says_it_is_unverified(
    tmp_path, student, caplog
):
    stage = tmp_path / "run" / "prune"
    save_checkpoint(stage / "model.pt", student)
    (stage / "done.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="m2mdc"):
        model, _ = load_checkpoint(stage / "model.pt")
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in student.parameters()
    )
    assert [r.levelno for r in caplog.records if "UNVERIFIED" in r.getMessage()] == [
        logging.WARNING
    ]
