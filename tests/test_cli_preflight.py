"""Pre-flight: settings naming model parts, bad paths and unreadable overrides are refused in
one plain line, exit code 2, before Hydra creates anything on disk."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2mdc.cli import main
from m2mdc.errors import Interrupted, M2MError, error_line, plain_line, signal_description
from tests.conftest import run_cli


@pytest.fixture
def refused(monkeypatch, tmp_path, capsys):
    """refused(*args) -> the error line of `m2mdc <args>` run in an empty directory, after
    checking exit code 2, one line, and that nothing was created. Reaching Hydra (the stages)
    fails the test: the refusal must come from the pre-flight."""
    import m2mdc.pipeline

    def _reached_hydra(command, args):
        raise AssertionError(f"pre-flight let `m2mdc {command} {' '.join(args)}` through")

    monkeypatch.setattr(m2mdc.pipeline, "hydra_main", _reached_hydra)
    monkeypatch.chdir(tmp_path)

    def _refused(*args: str) -> str:
        before = sorted(tmp_path.rglob("*"))
        code = main(list(args))
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and err.startswith("m2mdc: error: "), err
        assert "\x1b" not in err and "Traceback" not in err
        assert sorted(tmp_path.rglob("*")) == before, "a refused command must create nothing"
        return err.removeprefix("m2mdc: error: ")

    return _refused


# ResNet-18/34 have BasicBlock stages of (2, 2, 2, 2) / (3, 4, 6, 3) blocks; the first block of
# layer2..4 downsamples (protected). The CIFAR ResNets have three stages layer1..3 of n blocks
# (resnet20: 3, resnet56: 9), layer2.0 and layer3.0 protected. MobileNetV2's groups c16..c320
# hold (1, 2, 3, 4, 3, 3, 1) inverted residuals, the first of each group protected; features.1
# (c16) has no expansion.
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["prune.keep_cfg={layer2:[1]}"],
            "prune.keep_cfg: layer2.0 is a protected transition block and cannot be removed",
        ),
        (
            ["model=mobilenet_v2", "prune.keep_cfg={c24:[1]}"],
            "prune.keep_cfg: features.2 (c24[0]) is a protected transition block",
        ),
        (["prune.keep_cfg={layer3:[]}"], "prune.keep_cfg: stage layer3 would be empty"),
        (
            ["prune.keep_cfg={layer9:[0]}"],
            "prune.keep_cfg: unknown stage 'layer9'; stages: layer1, layer2, layer3, layer4",
        ),
        (
            ["model=resnet34", "prune.keep_cfg={layer3:[0,6]}"],
            "prune.keep_cfg: layer3.6 does not exist; valid layer3 indices: 0, 1, 2, 3, 4, 5",
        ),
        (["prune.keep_cfg=abc"], "prune.keep_cfg must map stage names to index lists"),
        (["prune.keep_cfg={layer1:[x]}"], "prune.keep_cfg.layer1 must be a list of block indices"),
        (
            ["slice.planes_keep={layer9:0.5}"],
            "slice.planes_keep: unknown stage 'layer9' for resnet18; valid stages: layer2, "
            "layer3, layer4 (and layer1 with slice.include_first_stage=true)",
        ),
        (
            ["slice.mid_keep={layer3:0.5,layer1:0.5}"],
            "slice.mid_keep.layer1: layer1 is not sliced unless slice.include_first_stage=true; "
            "valid stages: layer2, layer3, layer4",
        ),
        (
            ["model=mobilenet_v2", "slice.include_first_stage=true", "slice.mid_keep={c16:0.5}"],
            "slice.mid_keep.c16: c16 has no mid channels (features.1: no expansion conv); "
            "valid stages: c24, c32, c64, c96, c160, c320",
        ),
        (
            ["model=mobilenet_v2", "slice.planes_keep={layer4:0.5}"],
            "slice.planes_keep: unknown stage 'layer4' for mobilenet_v2; valid stages: c24, c32",
        ),
        (
            ["model=resnet20", "slice.planes_keep={layer3:0.5,layer4:0.5}"],
            "slice.planes_keep: unknown stage 'layer4' for resnet20; valid stages: layer2, "
            "layer3 (and layer1 with slice.include_first_stage=true)",
        ),
        (
            ["model=resnet20", "prune.keep_cfg={layer4:[0]}"],
            "prune.keep_cfg: unknown stage 'layer4'; stages: layer1, layer2, layer3",
        ),
        (
            ["model=resnet56", "prune.keep_cfg={layer3:[1,8]}"],
            "prune.keep_cfg: layer3.0 is a protected transition block and cannot be removed",
        ),
        (
            ["model=resnet56", "prune.keep_cfg={layer2:[0,9]}"],
            "prune.keep_cfg: layer2.9 does not exist; valid layer2 indices: 0, 1, 2, 3, 4, 5, 6, "
            "7, 8",
        ),
        (
            ["model=resnet20", "model.pretrained=true"],
            "model.pretrained=true: resnet20 has no ImageNet weights (the CIFAR ResNets train "
            "from scratch); set model.pretrained=false, or model.weights=PATH for your own",
        ),
        (
            ["model.name=resnet19"],
            "model.name='resnet19' is not valid; choose one of: mobilenet_v2, resnet110, "
            "resnet18, resnet20, resnet32, resnet34, resnet56 (or model=auto "
            "model.source=torchvision|timm for any residual CNN of those)",
        ),
        (
            ["budget.macs=0.3", "prune.keep_cfg={layer3:[0]}"],
            "budget.macs and prune.keep_cfg both choose the blocks; give one",
        ),
        (
            ["budget.macs=0.3", "slice.planes_keep={layer3:0.5}"],
            "budget.macs and slice.planes_keep both choose the keep fractions; give one",
        ),
        (
            ["-m", "prune.keep_cfg={layer3:[0]},{layer4:[1]}"],
            "prune.keep_cfg: layer4.0 is a protected transition block",
        ),
    ],
)
def test_settings_naming_model_parts_are_checked_before_anything_runs(refused, args, expected):
    assert expected in refused("run", *args)


@pytest.mark.parametrize(
    "args",
    [
        ["prune.keep_cfg={layer1:[1],layer3:[0]}"],
        ["slice.include_first_stage=true", "slice.planes_keep={layer1:0.25,layer4:0.5}"],
        ["model=resnet34", "prune.keep_cfg={layer3:[0,5]}", "slice.mid_keep={layer3:0.25}"],
        ["model=mobilenet_v2", "prune.keep_cfg={c24:[0],c96:[0,2]}", "slice.mid_keep={c24:0.5}"],
        ["model=resnet20", "prune.keep_cfg={layer1:[2],layer3:[0,1]}", "slice.mid_keep={layer3:1}"],
        ["model=resnet56", "slice.include_first_stage=true", "slice.planes_keep={layer1:0.5}"],
        ["model=resnet110", "model.pretrained=true", "model.weights=my_resnet110.pth"],
    ],
)
def test_settings_that_fit_the_model_pass(compose_cfg, args):
    from m2mdc.structure import validate_all

    validate_all(compose_cfg(*args))


def test_the_structure_is_built_on_the_meta_device_once_per_model():
    from m2mdc.structure import reference_model

    model = reference_model("resnet34")
    assert reference_model("resnet34") is model
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    cifar = reference_model("resnet56")
    assert {p.device.type for p in cifar.parameters()} == {"meta"}
    assert [len(getattr(cifar, f"layer{i}")) for i in range(1, 4)] == [9, 9, 9]


def test_validating_a_config_without_model_parts_needs_no_torch():
    code = (
        "import sys; from hydra import compose, initialize_config_dir\n"
        "from m2mdc.config import register_configs, validate\n"
        "from m2mdc.cli import conf_dir\n"
        "register_configs()\n"
        "with initialize_config_dir(config_dir=str(conf_dir()), version_base='1.3'):\n"
        "    validate(compose('config', overrides=['slice.planes_keep=0.25']))\n"
        "assert 'torch' not in sys.modules, 'validation imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_keep_cfg_example_fails_before_anything_is_written(tmp_path):
    proc = run_cli("run", "prune.keep_cfg={layer2:[1]}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "m2mdc: error: prune.keep_cfg: layer2.0 is a protected transition block and cannot be "
        "removed"
    )
    assert list(tmp_path.iterdir()) == [], "no run directory, no cache"


@pytest.mark.parametrize("under", [False, True])
def test_cache_dir_that_is_a_file_or_under_one_is_refused(refused, tmp_path, under):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    value = f"{blocker}/cache" if under else str(blocker)
    err = refused("run", f"cache_dir={value}")
    assert err.startswith(f"cache_dir={value}: ") and f"{blocker} " in err
    assert "not a directory" in err
    assert blocker.read_text() == "x"


def test_unquoted_unicode_run_dir_gets_the_quoted_form_to_type(refused):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    err = refused("run", "hydra.run.dir=outputs/été")
    assert err.startswith("hydra.run.dir=outputs/été: ") and "quote" in err
    # the suggested shell word, as the shell passes it, is an override Hydra reads back
    suggestion = shlex.split(err.rsplit("e.g. ", 1)[1])
    assert len(suggestion) == 1
    override = OverridesParser.create().parse_override(suggestion[0])
    assert (override.key_or_group, override.value()) == ("hydra.run.dir", "outputs/été")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("experiment_name=a#b", "experiment_name=a#b: Hydra cannot read '#' in an unquoted value"),
        ("été=1", "été=1: Hydra cannot read 'é' in a setting name"),
        ("prune.keep_cfg={layer2:[1]", "prune.keep_cfg={layer2:[1]: not a valid override ("),
    ],
)
def test_grammar_errors_name_the_override(refused, override, expected):
    assert refused("run", override).startswith(expected)


class _Opaque:
    """Pickled as code: a weights_only load must refuse it."""


def test_library_escape_codes_never_reach_the_error_line(tmp_path):
    from m2mdc.artifacts import safe_torch_load

    path = tmp_path / "code.pt"
    torch.save({"state_dict": _Opaque()}, path)
    with pytest.raises(M2MError) as err:
        safe_torch_load(path)
    assert "m2mdc never unpickles code" in str(err.value)
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)


def test_error_messages_are_one_plain_line():
    raw = "cannot load: \x1b[1mbold\x1b[0m text\n\t(1) first option \x1b["
    assert str(M2MError(raw)) == plain_line(raw) == "cannot load: bold text (1) first option"


def test_interruptions_name_the_signal_and_are_not_errors():
    assert signal_description(signal.SIGINT) == "interrupted (Ctrl-C)"
    assert signal_description(signal.SIGTERM) == "stopped by SIGTERM"
    stop = Interrupted(f"distill: {signal_description(signal.SIGINT)}; state saved")
    assert stop.exit_code == 130
    assert error_line(stop) == "m2mdc: distill: interrupted (Ctrl-C); state saved"
    assert error_line(M2MError("bad")) == "m2mdc: error: bad"


def _help_line(out: str, command: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(f"  {command} "))


def test_help_states_the_defaults_the_config_composes(compose_cfg, capsys):
    cfg = compose_cfg()
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    schedule = str(cfg.slice.schedule)
    other = ({"oneshot", "progressive"} - {schedule}).pop()
    line = _help_line(out, "slice")
    assert schedule in line and other not in line
    teacher = _help_line(out, "finetune-teacher")
    assert ("from scratch" in teacher) is (not cfg.model.pretrained)
    assert ("last third" in teacher) is (cfg.teacher.unfreeze == "last_third")
    assert f"the {cfg.experiment_name} experiment on {cfg.dataset.name}" in out


def test_docs_cite_only_files_in_the_repo():
    root = Path(__file__).resolve().parents[1]
    docs = [root / "README.md", root / "BENCHMARKS.md", *sorted((root / "docs").glob("*.md"))]
    for doc in docs:
        for name in set(re.findall(r"\b[A-Z][A-Z_]+\.md\b", doc.read_text())):
            assert (root / name).is_file(), f"{doc.name} cites {name}, which is not in the repo"
