"""Model creation: local weights round trip, mismatches and offline downloads as M2MErrors."""

from __future__ import annotations

from urllib.error import URLError

import pytest
import torch
import torchvision
from torchvision.models._api import WeightsEnum

from m2mdc.arch import create_model, get_adapter
from m2mdc.errors import M2MError


@pytest.fixture(scope="module")
def imagenet_r18(tmp_path_factory):
    """A 1000-class torchvision resnet18 state_dict saved the way torchvision ships them."""
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path_factory.mktemp("w") / "resnet18-imagenet.pth"
    torch.save(state, path)
    return path, state


def test_fresh_model_carries_its_description():
    model = create_model("mobilenet_v2", 7)
    assert model.classifier[1].out_features == 7
    arch = model.m2mdc_arch
    assert (arch["family"], arch["name"], arch["num_classes"]) == (
        "mobilenet_v2",
        "mobilenet_v2",
        7,
    )
    assert arch["keep"]["c64"] == [0, 1, 2, 3]
    assert arch["widths"]["planes"]["c320"] == 320
    with pytest.raises(M2MError, match="unknown choice 'resnet50'"):
        create_model("resnet50", 10)


def test_weights_path_imagenet_head_round_trip(imagenet_r18):
    path, state = imagenet_r18
    model = create_model("resnet18", 10, weights_path=str(path))
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key
    assert model.fc.out_features == 10 and model.fc.in_features == 512
    assert model.m2mdc_arch["num_classes"] == 10


def test_weights_path_with_task_head_is_kept(tmp_path):
    torch.manual_seed(4)
    state = torchvision.models.mobilenet_v2(num_classes=10).state_dict()
    path = tmp_path / "mb10.pth"
    torch.save(state, path)
    model = create_model("mobilenet_v2", 10, weights_path=str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_weights_path_mismatch_names_file_and_key(tmp_path, imagenet_r18):
    path, state = imagenet_r18
    with pytest.raises(
        M2MError, match=r"resnet18-imagenet\.pth does not fit resnet34: missing key"
    ):
        create_model("resnet34", 10, weights_path=str(path))
    bad = dict(state)
    bad["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    bad_path = tmp_path / "bad.pth"
    torch.save(bad, bad_path)
    with pytest.raises(
        M2MError, match=r"bad\.pth.*'layer2\.0\.conv1\.weight' has shape \[128, 64, 1, 1\]"
    ):
        create_model("resnet18", 10, weights_path=str(bad_path))
    extra = {**state, "foo": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(M2MError, match="unexpected key 'foo'"):
        create_model("resnet18", 10, weights_path=str(tmp_path / "extra.pth"))
    head = {**state, "fc.weight": torch.zeros(7, 512), "fc.bias": torch.zeros(7)}
    torch.save(head, tmp_path / "head7.pth")
    with pytest.raises(M2MError, match=r"'fc\.weight' has shape \[7, 512\].*or \[10, 512\]"):
        create_model("resnet18", 10, weights_path=str(tmp_path / "head7.pth"))


def test_unreadable_or_missing_weights_file(tmp_path):
    with pytest.raises(M2MError, match="file not found"):
        create_model("resnet18", 10, weights_path=str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(M2MError, match=r"cannot load .*junk\.pth as a state_dict"):
        create_model("resnet18", 10, weights_path=str(junk))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(M2MError, match="is not a state_dict"):
        create_model("resnet18", 10, weights_path=str(tmp_path / "list.pth"))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_pretrained_offline_names_url_and_cache_path(monkeypatch, tmp_path, name):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub-home"))

    def offline(self, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    url = get_adapter(name).imagenet_weights(name).url
    expected = torch.hub.get_dir() + "/checkpoints/" + url.rsplit("/", 1)[1]
    with pytest.raises(M2MError) as info:
        create_model(name, 10, pretrained=True)
    msg = str(info.value)
    assert "\n" not in msg and name in msg and url in msg and expected in msg
    assert "model.weights=PATH" in msg


def test_pretrained_uses_downloaded_imagenet_weights(monkeypatch, imagenet_r18):
    _, state = imagenet_r18
    seen = []

    def cached(self, *args, **kwargs):
        seen.append(self)
        return dict(state)

    monkeypatch.setattr(WeightsEnum, "get_state_dict", cached)
    model = create_model("resnet18", 10, pretrained=True)
    assert seen == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 10
