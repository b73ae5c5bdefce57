"""Teacher weights whose head has another class count: the new head is trained, or refused
when ``teacher.epochs=0`` would leave the teacher an untrained classifier."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from torchvision.models._api import WeightsEnum

import m2mdc.stages.finetune_teacher as finetune_teacher
from m2mdc.arch.zoo import create_model_and_head
from m2mdc.artifacts import load_checkpoint
from m2mdc.errors import M2MError
from m2mdc.stage import Context

SMALL = ["dataset.limit_train=64", "dataset.limit_test=32", "dataset.batch_size=32"]


@pytest.fixture(scope="module")
def head1000(tmp_path_factory):
    """A resnet18 state_dict with torchvision's 1000-class head (built here, no download)."""
    torch.manual_seed(5)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("w") / "r18-1000.pth"
    torch.save(state, path)
    return path, state


def test_create_reports_the_head_it_replaced(head1000, tmp_path) -> None:
    path, _ = head1000
    assert create_model_and_head("resnet18", 10, weights_path=str(path))[1] == 1000
    assert create_model_and_head("resnet18", 1000, weights_path=str(path))[1] is None
    fits = tmp_path / "r18-10.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), fits)
    assert create_model_and_head("resnet18", 10, weights_path=str(fits))[1] is None
    assert create_model_and_head("resnet18", 10)[1] is None


@pytest.mark.parametrize("setting", ["teacher.checkpoint", "model.weights"])
def test_a_new_head_with_zero_epochs_is_refused_before_anything_is_written(
    compose_cfg, tmp_path, head1000, setting
) -> None:
    path, _ = head1000
    ctx = Context(compose_cfg(*SMALL, f"{setting}={path}", "teacher.epochs=0"), tmp_path / "r")
    with pytest.raises(M2MError) as err:
        finetune_teacher.run(ctx)
    msg = str(err.value)
    assert msg.startswith(
        f"{setting}={path}: the head in these weights has 1000 classes but the dataset has 10"
    )
    assert "set teacher.epochs > 0" in msg and "\n" not in msg
    assert not (tmp_path / "r" / "teacher").exists()


def test_imagenet_or_random_weights_with_zero_epochs_are_refused(
    compose_cfg, tmp_path, head1000, monkeypatch
) -> None:
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, **kw: dict(head1000[1]))
    ctx = Context(compose_cfg(*SMALL, "model.pretrained=true", "teacher.epochs=0"), tmp_path)
    with pytest.raises(M2MError, match=r"^model\.pretrained=true: the head .* 1000 classes"):
        finetune_teacher.run(ctx)
    ctx = Context(compose_cfg(*SMALL, "model.pretrained=false", "teacher.epochs=0"), tmp_path)
    with pytest.raises(M2MError, match=r"^teacher\.epochs=0 with random initial weights"):
        finetune_teacher.run(ctx)


def test_a_new_head_is_trained_for_teacher_epochs(compose_cfg, tmp_path, head1000, caplog):
    path, state = head1000
    cfg = compose_cfg(
        *SMALL, f"teacher.checkpoint={path}", "teacher.epochs=1", "teacher.unfreeze=last_third"
    )
    with caplog.at_level(logging.INFO, logger="m2mdc"):
        metrics = finetune_teacher.run(Context(cfg, tmp_path))
    assert "its 1000-class head was replaced by a new 10-class one, trained for 1 epoch" in (
        caplog.text
    )
    assert "1 epochs" not in caplog.text
    assert [row["epoch"] for row in metrics["epochs"]] == [1]
    model, _ = load_checkpoint(tmp_path / "teacher" / "model.pt")
    assert model.fc.out_features == 10
    # teacher.unfreeze=last_third keeps the stem frozen: it is the file's
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_a_fitting_head_is_the_finished_teacher(compose_cfg, tmp_path) -> None:
    fits = tmp_path / "r18-10.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), fits)
    cfg = compose_cfg(*SMALL, f"teacher.checkpoint={fits}", "teacher.epochs=0")
    assert finetune_teacher.run(Context(cfg, tmp_path / "r"))["epochs"] == []
