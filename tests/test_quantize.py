"""INT8 deployment: the quantize stage (ONNX Runtime, static QDQ), its summary columns, report
table and Pareto points, and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from m2mdc.cli import COMMANDS, main
from m2mdc.errors import M2MError
from m2mdc.stage import STAGES, Context
from tests.conftest import run_cli

TINY = [
    "dataset.limit_train=320",
    "dataset.limit_test=160",
    "dataset.batch_size=32",
    "teacher.epochs=1",
    "kd.epochs=1",
    "slice.repair_epochs=1",
    "score.probe_samples=192",
    "prune.bn_recal_batches=4",
    "profile.latency=false",
    "quantize.calibration_samples=64",
    "quantize.latency_repeats=3",
    "quantize.latency_warmup=1",
]
# the teacher and the compressed models of a run without peers
QUANTIZED = ("teacher", "block_kd", "inner_slice")


# ---- refusals and configuration ---------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "what"),
    [(["quantize"], "m2mdc quantize"), (["run", "quantize.enabled=true"], "quantize.enabled")],
)
def test_without_onnxruntime_quantize_is_refused_in_one_line_before_anything_is_created(
    args, what, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    monkeypatch.chdir(tmp_path)
    assert main([*args, f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"m2mdc: error: {what}") and "onnxruntime" in err
    assert err.endswith("pip install 'm2mdc[deploy]'")
    assert list(tmp_path.iterdir()) == [], "a refused command must create nothing"


def test_without_onnxruntime_the_stage_itself_names_the_extra(tmp_path, monkeypatch):
    from m2mdc import int8

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(M2MError, match=r"onnxruntime: pip install 'm2mdc\[deploy\]'$"):
        int8.session(tmp_path / "model.onnx", 1)


def test_quantize_is_a_command_and_runs_in_run_only_when_enabled(compose_cfg):
    from m2mdc.pipeline import plan

    assert {s.command for s in STAGES.values()} <= set(COMMANDS)
    assert plan("quantize", compose_cfg("command=quantize")) == ["quantize"]
    assert "quantize" not in plan("run", compose_cfg())
    assert plan("run", compose_cfg("quantize.enabled=true"))[-1] == "quantize"


def test_quantize_settings_are_fingerprint_neutral(compose_cfg, tmp_path):
    """Every other stage's fingerprint is the same with the quantize settings at their
    defaults, changed, or absent (a configuration from before they existed); the quantize
    stage's own ignores `enabled` (control flow) but not what it measures."""
    import m2mdc.stages  # noqa: F401  (registers the stages)

    default = compose_cfg()
    changed = compose_cfg("quantize.enabled=true", "quantize.calibration_samples=7")
    absent = OmegaConf.create({k: v for k, v in OmegaConf.to_container(default).items()})
    del absent["quantize"]
    fps = [{n: Context(c, tmp_path).fingerprint(n) for n in STAGES if n != "quantize"}
           for c in (default, changed, absent)]  # fmt: skip
    assert fps[0] == fps[1] == fps[2]
    own = [Context(c, tmp_path).fingerprint("quantize") for c in (default, changed)]
    enabled = Context(compose_cfg("quantize.enabled=true"), tmp_path).fingerprint("quantize")
    assert enabled == own[0] != own[1]


def test_quantize_without_a_compressed_model_is_one_line(compose_cfg, tmp_path):
    from m2mdc.pipeline import run_command

    with pytest.raises(M2MError, match="has none: run `m2mdc run`"):
        run_command("quantize", compose_cfg("command=quantize"), tmp_path)
    assert not (tmp_path / "quantize" / "done.json").exists()


def _fake_run(run_dir: Path, fingerprints: dict[str, str]) -> None:
    """A run directory holding a finished model for each stage of ``fingerprints``."""
    for stage, fp in fingerprints.items():
        (run_dir / stage).mkdir(parents=True, exist_ok=True)
        (run_dir / stage / "model.pt").write_bytes(b"")
        (run_dir / stage / "done.json").write_text(json.dumps({"fingerprint": fp}))


def test_the_teacher_and_the_compressed_models_are_quantized_not_the_comparison_teacher(
    compose_cfg, tmp_path
):
    """The rows the stage deploys, and its staleness: a retrained teacher or student changes
    its fingerprint, a retrained comparison teacher (which it does not deploy) does not."""
    from m2mdc.stages.quantize import quantized_rows

    cfg = compose_cfg("command=quantize")
    stages = ("teacher", "prune", "distill", "slice", "teacher_same_epochs")
    _fake_run(tmp_path, {st: f"fp-{st}" for st in stages})
    ctx = Context(cfg, tmp_path)
    assert quantized_rows(ctx) == {
        "teacher": "teacher",
        "block_kd": "distill",
        "inner_slice": "slice",
    }
    before = ctx.fingerprint("quantize")
    for stage, stale in (("teacher_same_epochs", False), ("teacher", True), ("slice", True)):
        _fake_run(tmp_path, {stage: f"retrained-{stage}"})
        after = Context(cfg, tmp_path).fingerprint("quantize")
        assert (after != before) == stale, stage
        before = after


def test_a_run_with_only_a_teacher_is_refused(compose_cfg, tmp_path):
    """The teacher is quantized as the students' reference, never alone."""
    from m2mdc.pipeline import run_command

    _fake_run(tmp_path, {"teacher": "fp-teacher"})
    with pytest.raises(M2MError, match="has none: run `m2mdc run`"):
        run_command("quantize", compose_cfg("command=quantize"), tmp_path)
    assert not (tmp_path / "quantize").exists()


def test_report_aggregates_the_int8_columns_and_places_int8_points():
    from m2mdc.report import Run, int8_rows
    from m2mdc.report_plots import int8_points

    def run(seed: int, top1: float, ms: float) -> Run:
        rows = {
            "teacher": {"model": "teacher", "top1": 90.0, "macs": 4e9},
            "inner_slice": {
                "model": "inner_slice",
                "top1": top1 + 1,
                "macs": 1e9,
                "int8_top1": top1,
                "int8_latency_ms": ms,
                "fp32_ort_latency_ms": 2 * ms,
            },
        }
        return Run(Path(f"r{seed}"), seed, {}, rows, {})

    agg = int8_rows([run(1, 80.0, 1.0), run(2, 82.0, 3.0)])
    assert [r["model"] for r in agg] == ["inner_slice"]  # a row without INT8 columns is left out
    (r,) = agg
    assert (r["n"], r["int8_top1_mean"], r["int8_latency_ms_mean"]) == (2, 81.0, 2.0)
    assert r["fp32_ort_latency_ms_mean"] == 4.0 and r["macs_mean"] == 1e9
    assert r["int8_top1_std"] == pytest.approx(2**0.5)
    fp32_rows = [{"model": "inner_slice", "top1_mean": 82.0, "macs_mean": 1e9}]
    group = {"series": "s", "rows": fp32_rows, "int8": agg}
    (p,) = int8_points([group], "macs")
    assert (p["x"], p["y"], p["fp32"]) == (1.0, 81.0, (1.0, 82.0))  # GMacs: its model's
    (p,) = int8_points([group], "latency")
    assert (p["x"], p["y"], p["fp32"]) == (2.0, 81.0, None)  # no PyTorch latency measured


# ---- end to end on a tiny quickstart run ------------------------------------------------
@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory) -> Path:
    """`m2mdc run quantize.enabled=true` of the quickstart experiment, shrunk to seconds."""
    cwd = tmp_path_factory.mktemp("int8")
    run_dir = cwd / "run"
    args = [*TINY, "quantize.enabled=true", f"cache_dir={cwd / 'cache'}"]
    proc = run_cli("run", *args, f"hydra.run.dir={run_dir}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "quantize" / "metrics.json").read_text())


def _files(run_dir: Path, row: str) -> tuple[Path, Path]:
    return run_dir / "quantize" / row / "fp32.onnx", run_dir / "quantize" / row / "int8.onnx"


@pytest.mark.slow
def test_int8_models_load_and_run_in_onnx_runtime_alone(quantized_run):
    """A fresh interpreter with onnxruntime and numpy only (no torch, no m2mdc)."""
    paths = [str(_files(quantized_run, row)[1]) for row in QUANTIZED]
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        f"for p in {paths!r}:\n"
        "    s = ort.InferenceSession(p, providers=['CPUExecutionProvider'])\n"
        "    y = s.run(None, {s.get_inputs()[0].name: np.zeros((2, 3, 32, 32), np.float32)})\n"
        "    print(y[0].shape)\n"
        "assert 'torch' not in sys.modules and 'm2mdc' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["(2,", "10)"] * len(QUANTIZED)


def _top1(path: Path, batches) -> float:
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = 0
    for x, y in batches:
        logits = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        correct += int((np.argmax(logits, 1) == y.numpy()).sum())
    return 100.0 * correct / batches.num_examples


@pytest.mark.slow
def test_int8_top1_is_within_a_few_points_of_fp32_which_matches_pytorch(quantized_run):
    from m2mdc.data.datasets import load_split
    from m2mdc.data.loader import Batches

    cfg = OmegaConf.load(quantized_run / ".hydra" / "config.yaml")
    test = Batches(load_split(cfg.dataset, "test", cfg.cache_dir), 64, 32)  # evaluation batches
    m = _metrics(quantized_run)
    assert m["top1_split"] == "test" and set(m["models"]) == set(QUANTIZED)
    for row, stage in (("teacher", "teacher"), ("block_kd", "distill"), ("inner_slice", "slice")):
        fp32, q8 = (_top1(p, test) for p in _files(quantized_run, row))
        torch_top1 = json.loads((quantized_run / stage / "metrics.json").read_text())["top1"]
        got = m["models"][row]
        assert got["fp32_ort_top1"] == pytest.approx(fp32) and got["int8_top1"] == pytest.approx(q8)
        assert abs(fp32 - torch_top1) <= 0.5, (row, fp32, torch_top1)
        assert abs(q8 - fp32) <= 5.0, (row, q8, fp32)


@pytest.mark.slow
def test_int8_files_are_about_a_quarter_of_fp32_with_per_channel_qdq_weights(quantized_run):
    import onnx

    for row, entry in _metrics(quantized_run)["models"].items():
        fp32, q8 = _files(quantized_run, row)
        assert (entry["fp32_ort_bytes"], entry["int8_bytes"]) == (
            fp32.stat().st_size,
            q8.stat().st_size,
        )
        assert q8.stat().st_size < 0.35 * fp32.stat().st_size
        graph = onnx.load(str(q8)).graph
        ops = [n.op_type for n in graph.node]
        assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops)
        fp32_convs = [n for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"]
        assert ops.count("Conv") == len(fp32_convs) > 0
        inits = {t.name: t for t in graph.initializer}
        made_by = {o: n for n in graph.node for o in n.output}
        for conv in (n for n in graph.node if n.op_type == "Conv"):
            dq = made_by[conv.input[1]]  # the weight comes dequantized from int8, per channel
            assert dq.op_type == "DequantizeLinear"
            weight, scale = inits[dq.input[0]], inits[dq.input[1]]
            assert weight.data_type == onnx.TensorProto.INT8
            assert list(scale.dims) == [weight.dims[0]] and weight.dims[0] > 1
            assert {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0


@pytest.mark.slow
def test_latency_is_recorded_for_both_precisions_at_batch_1_and_64(quantized_run):
    m = _metrics(quantized_run)
    assert m["batch_sizes"] == [1, 64]
    assert m["threads"] == int(os.environ["OMP_NUM_THREADS"])  # torch's count, as set for it
    for entry in m["models"].values():
        for key in ("latency_ms", "latency_ms_b64"):
            fp32, q8 = entry[f"fp32_ort_{key}"], entry[f"int8_{key}"]
            assert fp32 > 0 and q8 > 0
            assert entry[f"int8_{key.replace('latency_ms', 'speedup')}"] == pytest.approx(fp32 / q8)


@pytest.mark.slow
def test_summary_rows_of_the_quantized_models_gain_the_int8_columns(quantized_run):
    summary = json.loads((quantized_run / "summary.json").read_text())
    rows = {r["model"]: r for r in summary["rows"]}
    models = _metrics(quantized_run)["models"]
    for row in QUANTIZED:
        for key in ("int8_top1", "int8_bytes", "int8_latency_ms", "int8_latency_ms_b64"):
            assert rows[row][key] == models[row][key]
        assert rows[row]["fp32_ort_top1"] == models[row]["fp32_ort_top1"]


@pytest.mark.slow
def test_calibration_is_deterministic(quantized_run, tmp_path):
    """The calibration set rebuilt from the run's configuration quantizes the FP32 model to
    the stage's INT8 file, byte for byte, twice."""
    from m2mdc import int8
    from m2mdc.stages.quantize import calibration_batches

    cfg = OmegaConf.load(quantized_run / ".hydra" / "config.yaml")
    fp32, q8 = _files(quantized_run, "inner_slice")
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        int8.quantize(fp32, out, calibration_batches(Context(cfg, quantized_run)))
    assert outs[0].read_bytes() == outs[1].read_bytes() == q8.read_bytes()


@pytest.mark.slow
def test_report_has_an_int8_table_and_int8_points(quantized_run, tmp_path):
    from m2mdc.report import aggregate, find_runs
    from m2mdc.report_plots import int8_points

    assert main(["report", str(quantized_run), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    table = text.split("### INT8 deployment", 1)[1].split("\n### ", 1)[0]
    rows = {r["model"]: r for r in json.loads((quantized_run / "summary.json").read_text())["rows"]}
    for row, display in (
        ("teacher", "Teacher"),
        ("block_kd", "Block-KD"),
        ("inner_slice", "Inner-slice"),
    ):
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {display} |"))
        assert f"| {rows[row]['int8_top1']:.2f} ± n/a |" in line
    points = int8_points(aggregate(find_runs([quantized_run])), "macs")
    assert sorted((p["model"], p["x"], p["y"]) for p in points) == sorted(
        (r, rows[r]["macs"] / 1e9, rows[r]["int8_top1"]) for r in QUANTIZED
    )
