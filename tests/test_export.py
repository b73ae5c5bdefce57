"""ONNX files beyond protobuf's size limit keep their weights beside them, under the final name."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from m2mdc.stages import export


def test_an_onnx_model_too_big_for_one_file_references_its_data_by_the_final_name(
    tmp_path, monkeypatch: pytest.MonkeyPatch
):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    monkeypatch.setattr(export, "ONNX_INLINE_LIMIT", 0)  # every model is "too big"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "out" / "model.onnx"
    path.parent.mkdir()
    export._onnx(model, x, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"model.onnx.data"}
    moved = tmp_path / "moved"
    shutil.copytree(path.parent, moved)
    shutil.rmtree(path.parent)  # nothing of the original place is left to lean on
    sess = ort.InferenceSession(str(moved / "model.onnx"), providers=["CPUExecutionProvider"])
    y = torch.randn(5, 3, 8, 8)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: y.numpy()})[0])
    with torch.inference_mode():
        assert torch.allclose(got, model(y), atol=1e-5)
