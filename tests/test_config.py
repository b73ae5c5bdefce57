"""Config composition and validation: bad values are refused with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from m2mdc.cli import main, split_overrides
from m2mdc.config import validate
from m2mdc.errors import M2MError


def test_default_config_is_the_quickstart(compose_cfg):
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.experiment_name == "quickstart"
    assert (cfg.model.name, cfg.dataset.name, cfg.dataset.image_size) == ("resnet18", "digits", 32)
    assert cfg.model.pretrained is False


@pytest.mark.parametrize(
    "exp,model",
    [
        ("paper_resnet18", "resnet18"),
        ("paper_resnet34", "resnet34"),
        ("paper_mobilenetv2", "mobilenet_v2"),
    ],
)
def test_paper_experiments_follow_section_4_1(compose_cfg, exp, model):
    cfg = compose_cfg(f"experiment={exp}")
    validate(cfg)
    assert cfg.model.name == model and cfg.model.pretrained
    assert (cfg.dataset.name, cfg.dataset.image_size) == ("cifar100", 224)
    assert (cfg.teacher.epochs, cfg.teacher.lr, cfg.teacher.unfreeze) == (5, 1e-3, "last_third")
    assert (cfg.kd.epochs, cfg.kd.lr, cfg.kd.alpha, cfg.kd.beta) == (5, 1e-4, 0.1, 0.1)
    assert (cfg.dataset.batch_size, cfg.dataset.eval_batch_size) == (128, 256)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("teacher.epochs=-1", "teacher.epochs=-1 is out of range"),
        ("dataset.image_size=0", "dataset.image_size=0 is out of range"),
        ("prune.ratio=1.0", "prune.ratio=1.0 is out of range; allowed: >= 0 and < 1"),
        ("prune.ratio=-0.1", "prune.ratio=-0.1 is out of range"),
        ("dataset.batch_size=0", "dataset.batch_size=0"),
        ("teacher.lr=0", "teacher.lr=0"),
        ("teacher.unfreeze=half", "choose one of: last_third, all"),
        ("device=tpu", "choose one of: auto, cpu, cuda"),
    ],
)
def test_out_of_range_values_name_key_and_allowed_range(compose_cfg, override, expected):
    with pytest.raises(M2MError, match=None) as err:
        validate(compose_cfg(override))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["prune.ration=0.4"], "unknown setting 'prune.ration' (did you mean 'prune.ratio'?)"),
        (
            ["model=resnet19"],
            "model=resnet19 is not a valid choice; choose one of: auto, mobilenet_v2, resnet110, "
            "resnet18, resnet20, resnet32, resnet34, resnet56",
        ),
        (
            ["dataset=mnist"],
            "dataset=mnist is not a valid choice; "
            "choose one of: cifar10, cifar100, digits, fake, imagefolder, imagenet",
        ),
        (["teacher.epochs=-1"], "teacher.epochs=-1 is out of range; allowed: >= 0"),
        (["dataset.image_size=0"], "dataset.image_size=0 is out of range; allowed: > 0"),
        (["teacher.epochs=abc"], "teacher.epochs"),
        (["-m", "prune.ratio=0.1,1.5"], "prune.ratio=1.5 is out of range"),
    ],
)
def test_cli_refuses_bad_settings_in_one_line(args, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["run", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("m2mdc: error: ")
    assert expected in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert not (tmp_path / "outputs").exists(), "a refused command must create nothing"


def test_unknown_command_lists_the_commands(capsys):
    assert main(["distil"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'distil'" in err and "did you mean 'distill'" in err


def test_help_lists_every_command(capsys):
    from m2mdc.cli import COMMANDS

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for c in COMMANDS:
        assert f"  {c} " in out


def test_split_overrides_keeps_hydra_flags_and_their_values():
    ov, fl = split_overrides(["-m", "seed=1,2", "--cfg", "job", "prune.ratio=0.1", "-p", "model"])
    assert ov == ["seed=1,2", "prune.ratio=0.1"]
    assert fl == ["-m", "--cfg", "job", "-p", "model"]


EXPERIMENTS = sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml")
)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_preset_composes_and_validates(compose_cfg, exp, tmp_path):
    # an image-folder experiment needs its root; any existing directory passes validation
    cfg = compose_cfg(f"experiment={exp}", f"dataset.root={tmp_path}")
    validate(cfg)
    assert cfg.experiment_name == exp


def test_cifar10_subset_experiment_is_resnet18_from_scratch_on_the_full_subset(compose_cfg):
    cfg = compose_cfg("experiment=cifar10_subset", "dataset.root=/data/c10")
    assert (cfg.model.name, cfg.model.pretrained, cfg.teacher.unfreeze) == (
        "resnet18",
        False,
        "all",
    )
    assert (cfg.dataset.name, cfg.dataset.image_size, cfg.dataset.limit_train) == (
        "imagefolder",
        32,
        None,
    )


def test_multirun_with_cfg_is_one_line(capsys):
    assert main(["run", "-m", "seed=1,2", "--cfg", "job"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "m2mdc: error: -m and --cfg cannot be combined: -m runs a sweep, --cfg and --info print "
        "one job's configuration; drop -m to print the first job's"
    )
