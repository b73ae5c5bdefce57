"""The ``perf`` section: defaults are plain float32 with fused Adam; channels_last / bf16 /
compile are wired in."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from m2mdc.arch.zoo import create_model
from m2mdc.data.datasets import ImageData
from m2mdc.data.loader import Batches
from m2mdc.distill.losses import preset_terms
from m2mdc.distill.repair import kd_repair
from m2mdc.errors import M2MError
from m2mdc.train import perf
from m2mdc.train.loop import ce_loss, evaluate, fit
from tests.conftest import tiny_classifier

tiny = tiny_classifier


def batches(n: int = 32, size: int = 8, classes: int = 3) -> tuple[Batches, Batches]:
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    d = ImageData(imgs, torch.arange(n) % classes, [str(i) for i in range(classes)])
    return Batches(d, 8, size, train=True, seed=3), Batches(d, 16, size)


def run_fit(model: nn.Module, tmp_path, cfg) -> list[dict]:
    return fit_result(model, tmp_path, cfg).history


def fit_result(model: nn.Module, tmp_path, cfg, epochs: int = 2):
    train, test = batches()
    return fit(
        model,
        model.parameters(),
        train,
        test,
        epochs=epochs,
        lr=1e-2,
        grad_clip=1.0,
        loss_fn=ce_loss,
        state_path=tmp_path / "state.pt",
        fingerprint="fp",
        desc="t",
        perf=cfg,
    )


def test_defaults_are_no_ops() -> None:
    model = tiny()
    x = torch.randn(2, 3, 8, 8)
    assert perf.resolve(None).is_default
    assert perf.resolve({"channels_last": False, "amp": "none", "compile": False}).is_default
    assert perf.prepare(model, None, "cpu") is model
    assert perf.as_input(x, None) is x
    assert isinstance(perf.autocast(None, "cpu"), contextlib.nullcontext)
    assert perf.grad_scaler(None, "cpu") is None
    assert all(p.is_contiguous() for p in model.parameters())


def test_schema_defaults_match_the_plain_path(compose_cfg) -> None:
    cfg = compose_cfg()
    assert dict(cfg.perf) == {
        "channels_last": False,
        "amp": "none",
        "compile": False,
        "fused_adam": True,
        "threads": None,  # the CLI divides the cores among concurrent jobs (tests/test_threads.py)
        "sync_bn": False,  # data-parallel only (tests/test_ddp.py)
    }
    assert perf.resolve(cfg.perf, "cpu").is_default
    assert list(cfg.profile.batch_sizes) == [1, 64]


def test_default_perf_gives_the_same_training_as_none(tmp_path) -> None:
    a = run_fit(tiny(), tmp_path / "a", None)
    b = run_fit(tiny(), tmp_path / "b", {"channels_last": False, "amp": "none", "compile": False})
    assert a == b


def test_fp16_needs_cuda_and_amp_values_are_checked() -> None:
    with pytest.raises(M2MError, match=r"perf\.amp=fp16 needs a CUDA device"):
        perf.resolve({"amp": "fp16"}, "cpu")
    with pytest.raises(M2MError, match="choose one of: none, bf16, fp16"):
        perf.resolve({"amp": "fp8"}, "cpu")


def test_invalid_amp_is_refused_at_validation(compose_cfg) -> None:
    from m2mdc.config import validate

    with pytest.raises(M2MError, match=r"perf.amp='fp32' is not valid"):
        validate(compose_cfg("perf.amp=fp32"))


def test_channels_last_and_bf16_train_and_evaluate(tmp_path) -> None:
    cfg = {"channels_last": True, "amp": "bf16", "compile": False}
    model = tiny()
    hist = run_fit(model, tmp_path, cfg)
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in hist)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model[0].weight.dtype == torch.float32  # autocast never casts the weights
    _, test = batches()
    ev = evaluate(model, test, cfg)
    assert 0 <= ev["top1"] <= 100
    with perf.autocast(cfg, "cpu"):
        assert model(perf.as_input(torch.randn(2, 3, 8, 8), cfg)).dtype == torch.bfloat16


def test_kd_repair_under_bf16_and_channels_last(tmp_path) -> None:
    teacher = create_model("resnet18", 4).eval()
    student = create_model("resnet18", 4)
    train, test = batches(n=16, size=16, classes=4)
    cfg = {"channels_last": True, "amp": "bf16", "compile": False}
    res = kd_repair(
        student,
        teacher,
        train,
        test,
        terms=preset_terms("staged_cosine", 0.1, 0.1),
        epochs=2,
        lr=1e-4,
        grad_clip=1.0,
        temperature=4.0,
        state_path=tmp_path / "s.pt",
        fingerprint="fp",
        desc="kd",
        perf=cfg,
    )
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in res.history)
    assert teacher.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_wraps_without_touching_the_module() -> None:
    model = tiny()
    keys = list(model.state_dict())
    fwd = perf.prepare(model, {"compile": True}, "cpu")  # lazy: nothing is compiled yet
    assert fwd is not model and list(model.state_dict()) == keys
    assert perf.compiled(len, {"compile": False}) is len
    assert perf.compiled(len, {"compile": True}) is not len


def test_default_adam_is_fused_and_trains_close_to_the_per_parameter_loop(tmp_path) -> None:
    model = tiny()
    assert perf.adam(list(model.parameters()), 1e-2, None).defaults["fused"] is True
    assert not perf.adam(list(model.parameters()), 1e-2, {"fused_adam": False}).defaults["fused"]
    a = run_fit(tiny(), tmp_path / "a", None)
    b = run_fit(tiny(), tmp_path / "b", {"fused_adam": False})
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-3, abs=1e-4)


def test_fused_adam_falls_back_where_torch_has_no_fused_kernel(monkeypatch) -> None:
    real = torch.optim.Adam

    class NoFused(real):  # type: ignore[misc, valid-type]
        def __init__(self, params, **kw) -> None:
            if kw.get("fused"):
                raise RuntimeError("`fused=True` requires params of supported devices")
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "Adam", NoFused)
    opt = perf.adam(list(tiny().parameters()), 1e-2, None)
    assert isinstance(opt, NoFused) and not opt.defaults["fused"]


def test_final_state_leaves_out_the_optimizer(tmp_path) -> None:
    run_fit(tiny(), tmp_path, None)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["optimizer"] is None and state["model"]


def test_final_state_of_a_shorter_run_is_not_resumed(tmp_path) -> None:
    run_fit(tiny(), tmp_path, None)  # 2 epochs, final state without optimizer
    res = fit_result(tiny(), tmp_path, None, epochs=3)
    assert res.resumed_from == 0 and len(res.history) == 3


@pytest.mark.slow
def test_compiled_fit_runs(tmp_path) -> None:
    hist = run_fit(tiny(), tmp_path, {"channels_last": False, "amp": "none", "compile": True})
    assert len(hist) == 2
