"""End-to-end: the real ``m2mdc`` command in a subprocess on the bundled digits data."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from m2mdc.artifacts import load_checkpoint
from tests.conftest import TINY, _ok, run_cli  # other test files import TINY, _ok from here

pytestmark = pytest.mark.slow


@pytest.fixture
def quick_run(tiny_run) -> Path:
    """One `m2mdc run` of the quickstart experiment, shrunk to a few seconds (the session's)."""
    return tiny_run


def test_run_writes_every_contract_file(quick_run):
    for rel in [
        "teacher/model.pt",
        "teacher/metrics.json",
        "score/scores.json",
        "prune/model.pt",
        "prune/plan.json",
        "prune/metrics.json",
        "distill/model.pt",
        "distill/metrics.json",
        "slice/model.pt",
        "slice/plan.json",
        "slice/metrics.json",
        "profile/metrics.json",
        "summary.json",
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
    ]:
        assert (quick_run / rel).is_file(), rel


def test_scores_rank_all_resnet18_blocks_with_transitions_protected(quick_run):
    scores = json.loads((quick_run / "score" / "scores.json").read_text())
    blocks = scores["blocks"]
    assert [b["name"] for b in blocks] == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    assert {b["name"] for b in blocks if b["protected"]} == {"layer2.0", "layer3.0", "layer4.0"}
    assert sorted(b["rank"] for b in blocks) == list(range(1, 9))
    by_rank = sorted(blocks, key=lambda b: b["rank"])
    assert all(a["score"] >= b["score"] for a, b in itertools.pairwise(by_rank))


def test_prune_plan_follows_scores_and_constraints(quick_run):
    plan = json.loads((quick_run / "prune" / "plan.json").read_text())
    assert plan["ratio"] == 0.4 and plan["k_target"] == 2  # floor(0.4 * 5 free blocks)
    assert len(plan["removed"]) == 2
    assert not set(plan["removed"]) & set(plan["protected"])
    assert all(plan["keep_cfg"][s] for s in plan["keep_cfg"])
    model, _ = load_checkpoint(quick_run / "prune" / "model.pt")
    assert sum(len(getattr(model, f"layer{s}")) for s in range(1, 5)) == 6


def test_distill_logs_the_staged_schedule(quick_run):
    m = json.loads((quick_run / "distill" / "metrics.json").read_text())
    assert [e["alpha"] for e in m["epochs"]] == [0.0, 0.1]
    assert [e["beta"] for e in m["epochs"]] == [0.0, 0.1]
    for e in m["epochs"]:
        assert {"ce", "logit_align", "feat_align", "train_top1", "test_top1"} <= set(e)


def test_summary_rows_and_reductions(quick_run):
    s = json.loads((quick_run / "summary.json").read_text())
    rows = {r["model"]: r for r in s["rows"]}
    assert list(rows) == ["teacher", "block_kd", "inner_slice"]
    assert rows["block_kd"]["macs"] < rows["teacher"]["macs"]
    assert rows["inner_slice"]["macs"] < rows["block_kd"]["macs"]
    t, b = rows["teacher"], rows["block_kd"]
    assert b["macs_reduction_pct"] == pytest.approx(100 * (1 - b["macs"] / t["macs"]))
    # the profile's parameter count is the checkpoint's
    model, _ = load_checkpoint(quick_run / "slice" / "model.pt")
    assert rows["inner_slice"]["params"] == sum(p.numel() for p in model.parameters())


def test_rerun_skips_finished_stages(quick_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    proc = _ok(run_cli("run", *TINY, f"hydra.run.dir={run}", cwd=quick_run.parent))
    assert proc.stdout.count("skipped") >= 5


def test_changed_config_in_same_dir_is_refused_without_touching_outputs(quick_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    before = (run / "teacher" / "model.pt").read_bytes()
    proc = run_cli(
        "finetune-teacher",
        *TINY,
        "teacher.epochs=3",
        f"hydra.run.dir={run}",
        cwd=quick_run.parent,
    )
    assert proc.returncode == 2
    assert "teacher.epochs: 2 -> 3" in proc.stderr and "force=true" in proc.stderr
    assert (run / "teacher" / "model.pt").read_bytes() == before


def test_stage_before_prerequisite_names_the_command(tmp_path):
    proc = run_cli("prune", *TINY, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "m2mdc score" in proc.stderr and "Traceback" not in proc.stderr


def test_profile_bare_architecture_with_keep_cfg(tmp_path):
    proc = _ok(
        run_cli(
            "profile",
            "model=resnet18",
            "dataset=fake",
            "dataset.num_classes=10",
            "profile.input_size=32",
            "profile.latency=false",
            "prune.keep_cfg={layer1:[0],layer2:[0],layer3:[0],layer4:[0]}",
            f"hydra.run.dir={tmp_path / 'p'}",
            cwd=tmp_path,
        )
    )
    m = json.loads((tmp_path / "p" / "profile" / "metrics.json").read_text())
    assert m["mode"] == "architecture"
    assert m["models"]["resnet18"]["params"] == 11_181_642
    # removing one BasicBlock from each of layer1..layer4 removes exactly these weights
    removed = sum(2 * (9 * c * c) + 2 * 2 * c for c in (64, 128, 256, 512))
    assert m["models"]["keep_cfg"]["params"] == 11_181_642 - removed
    assert "keep_cfg" in proc.stdout


def test_keep_cfg_removing_protected_block_is_refused(tmp_path):
    proc = run_cli(
        "profile",
        "dataset=fake",
        "prune.keep_cfg={layer2:[1]}",
        "profile.latency=false",
        f"hydra.run.dir={tmp_path / 'p'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "layer2.0" in proc.stderr and "protected" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_finetune_teacher_on_cifar10_subset(cifar_root, tmp_path):
    run_dir = tmp_path / "c10"
    _ok(
        run_cli(
            "finetune-teacher",
            "dataset=imagefolder",
            f"dataset.root={cifar_root}",
            "dataset.limit_train=1000",
            "dataset.limit_test=500",
            "teacher.epochs=1",
            f"hydra.run.dir={run_dir}",
            f"cache_dir={tmp_path / 'cache'}",
            cwd=tmp_path,
        )
    )
    m = json.loads((run_dir / "teacher" / "metrics.json").read_text())
    assert len(m["epochs"]) == 1
    assert m["top1"] > 10.0 + 3.0  # chance is 10% on the 10 balanced classes
    model, _ = load_checkpoint(run_dir / "teacher" / "model.pt", expect_classes=10)
    assert isinstance(model(torch.zeros(1, 3, 32, 32)), torch.Tensor)


def _top1s(run_dir: Path) -> dict[str, float]:
    s = json.loads((run_dir / "summary.json").read_text())
    return {r["model"]: r["top1"] for r in s["rows"]}


def test_sigkill_during_distill_then_rerun_gives_identical_results(
    quick_run, stage_cache, tmp_path
):
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "killed"
    exe = Path(sys.executable).parent / "m2mdc"
    args = [str(exe), "run", *TINY, f"hydra.run.dir={run_dir}", f"cache_dir={stage_cache}"]
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = run_dir / "distill" / "state.pt"
    deadline = time.time() + 600
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert state.is_file(), "distill never saved a state"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "distill" / "done.json").exists()
    resumed = _ok(run_cli(*args[1:], cwd=tmp_path))
    assert "distill: resuming after epoch 1" in resumed.stdout
    assert _top1s(run_dir) == _top1s(quick_run)
    d1 = json.loads((run_dir / "distill" / "metrics.json").read_text())["epochs"]
    d0 = json.loads((quick_run / "distill" / "metrics.json").read_text())["epochs"]
    assert d1 == d0


def test_manifest_records_hashes_and_tampering_is_refused(quick_run, tmp_path):
    import hashlib
    import shutil

    manifest = json.loads((quick_run / "manifest.json").read_text())
    entry = manifest["artifacts"]["teacher/model.pt"]
    digest = hashlib.sha256((quick_run / "teacher" / "model.pt").read_bytes()).hexdigest()
    assert entry["sha256"] == digest
    assert manifest["packages"]["torch"] and "git_commit" in manifest
    assert "summary.json" in manifest["artifacts"]
    copy = tmp_path / "copy"
    shutil.copytree(quick_run, copy)
    (copy / "profile" / "done.json").unlink()
    blob = bytearray((copy / "teacher" / "model.pt").read_bytes())
    blob[-100] ^= 0xFF
    (copy / "teacher" / "model.pt").write_bytes(bytes(blob))
    proc = run_cli("profile", *TINY, f"hydra.run.dir={copy}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "changed after it was written" in proc.stderr


def test_export_torchscript_with_parity(quick_run, tmp_path):
    out = tmp_path / "exp"
    _ok(
        run_cli(
            "export",
            f"checkpoint={quick_run / 'slice' / 'model.pt'}",
            f"hydra.run.dir={out}",
            cwd=tmp_path,
        )
    )
    m = json.loads((out / "export" / "torchscript" / "metrics.json").read_text())
    assert m["format"] == "torchscript" and m["max_abs_diff"] <= m["atol"]
    ts = torch.jit.load(str(out / "export" / "torchscript" / "model.ts.pt"))
    model, _ = load_checkpoint(quick_run / "slice" / "model.pt")
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(ts(x), model(x), atol=1e-5)


def test_export_formats_share_a_run_and_the_onnx_file_runs_alone_elsewhere(quick_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    run_dir = tmp_path / "run"
    shutil.copytree(quick_run, run_dir)
    _ok(run_cli("export", *TINY, f"hydra.run.dir={run_dir}", cwd=quick_run.parent))
    old = os.umask(0o027)  # the export follows the umask of the command that writes it
    try:
        _ok(
            run_cli(
                "export",
                *TINY,
                "export.format=onnx",
                f"hydra.run.dir={run_dir}",
                cwd=quick_run.parent,
            )
        )
    finally:
        os.umask(old)
    ts = json.loads((run_dir / "export" / "torchscript" / "metrics.json").read_text())
    assert (run_dir / "export" / "torchscript" / "model.ts.pt").stat().st_size == ts["bytes"]
    onnx_dir = run_dir / "export" / "onnx"
    m = json.loads((onnx_dir / "metrics.json").read_text())
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["done.json", "metrics.json", "model.onnx"]
    model, _ = load_checkpoint(run_dir / m["source"])
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert m["bytes"] == (onnx_dir / "model.onnx").stat().st_size > weights * 0.9
    assert m["files"] == ["model.onnx"]
    for p in (onnx_dir, onnx_dir / "model.onnx", onnx_dir / "metrics.json"):
        assert stat.S_IMODE(p.stat().st_mode) == (0o750 if p.is_dir() else 0o640), p
    moved = tmp_path / "elsewhere" / "model.onnx"
    moved.parent.mkdir()
    shutil.copy(onnx_dir / "model.onnx", moved)
    sess = ort.InferenceSession(str(moved), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, m["input_size"], m["input_size"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.inference_mode():
        assert torch.allclose(got, model(x), atol=1e-4)
    manifest = json.loads((run_dir / "manifest.json").read_text())["artifacts"]
    assert {"export/torchscript/model.ts.pt", "export/onnx/model.onnx"} <= set(manifest)
    again = _ok(run_cli("export", *TINY, f"hydra.run.dir={run_dir}", cwd=quick_run.parent))
    assert "[export/torchscript] skipped" in again.stdout + again.stderr


def test_unwritable_output_dir_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("run", f"hydra.run.dir={blocker}/run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "hydra.run.dir" in proc.stderr and "not a directory" in proc.stderr
    assert blocker.read_text() == "x"


def test_stage_by_stage_equals_run(quick_run, stage_cache, tmp_path):
    from m2mdc import api

    run_dir = tmp_path / "stages"
    # the stage commands in process (the API runs what the command line runs; no start-ups),
    # the last one on the command line; teacher and scores are reused from the cache
    for cmd in ("finetune-teacher", "score", "prune", "distill", "slice"):
        api.stage(cmd, [*TINY, f"cache_dir={stage_cache}"], run_dir=run_dir)
    proc = _ok(run_cli("profile", *TINY, f"hydra.run.dir={run_dir}", cwd=quick_run.parent))
    assert "profile (run" in proc.stdout
    for stage in ("teacher", "prune", "distill", "slice"):
        a = json.loads((run_dir / stage / "metrics.json").read_text())["top1"]
        b = json.loads((quick_run / stage / "metrics.json").read_text())["top1"]
        assert a == b, stage
    prof = json.loads((run_dir / "profile" / "metrics.json").read_text())["models"]
    assert list(prof) == ["teacher", "block_kd", "inner_slice"]


def test_bring_your_own_teacher_checkpoint(quick_run, tmp_path):
    teacher_top1 = json.loads((quick_run / "teacher" / "metrics.json").read_text())["top1"]
    model, _ = load_checkpoint(quick_run / "teacher" / "model.pt")
    plain = tmp_path / "plain_state_dict.pt"
    torch.save(model.state_dict(), plain)  # what a torchvision user would hand us
    for i, ckpt in enumerate([quick_run / "teacher" / "model.pt", plain]):
        run_dir = tmp_path / f"byo{i}"
        _ok(
            run_cli(
                "finetune-teacher",
                *TINY,
                f"teacher.checkpoint={ckpt}",
                f"hydra.run.dir={run_dir}",
                cwd=tmp_path,
            )
        )
        m = json.loads((run_dir / "teacher" / "metrics.json").read_text())
        assert m["epochs"] == [] and m["top1"] == teacher_top1
    proc = run_cli(
        "finetune-teacher",
        *TINY,
        "model=resnet34",
        f"teacher.checkpoint={quick_run / 'teacher' / 'model.pt'}",
        f"hydra.run.dir={tmp_path / 'bad'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "holds a resnet18 but model=resnet34" in proc.stderr


def test_mobilenet_v2_run_slices_below_block_kd(tmp_path):
    run_dir = tmp_path / "mb"
    _ok(run_cli("run", "model=mobilenet_v2", *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path))
    rows = {r["model"]: r for r in json.loads((run_dir / "summary.json").read_text())["rows"]}
    assert rows["inner_slice"]["macs"] < rows["block_kd"]["macs"] < rows["teacher"]["macs"]
    plan = json.loads((run_dir / "prune" / "plan.json").read_text())
    assert set(plan["protected"]) == {f"features.{i}" for i in (1, 2, 4, 7, 11, 14, 17)}
    assert len(plan["removed"]) == 4  # floor(0.4 * 10 free inverted residuals)
    model, _ = load_checkpoint(run_dir / "slice" / "model.pt")
    assert rows["inner_slice"]["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "override,expected",
    [
        ("slice.planes_keep=1.5", "slice.planes_keep=1.5 is out of range; allowed: > 0 and <= 1"),
        ("slice.mid_keep={layer3:0}", "slice.mid_keep.layer3=0.0 is out of range"),
        ("slice.planes_keep=abc", "slice.planes_keep='abc' is not valid"),
    ],
)
def test_bad_keep_fractions_are_refused(tmp_path, override, expected):
    proc = run_cli("run", override, cwd=tmp_path)
    assert proc.returncode == 2 and expected in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_teacher_same_epochs_row_trains_the_students_budget(quick_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    _ok(run_cli("run", *TINY, "compare=teacher_same_epochs", f"hydra.run.dir={run}", cwd=tmp_path))
    # the budget, read independently from what the students' stages logged
    kd_epochs = len(json.loads((run / "distill" / "metrics.json").read_text())["epochs"])
    slice_steps = json.loads((run / "slice" / "metrics.json").read_text())["steps"]
    repair = int(next(t for t in TINY if t.startswith("slice.repair_epochs=")).split("=")[1])
    budget = kd_epochs + 3 * repair  # TINY: 2 KD epochs; layer2..4 sliced, each 1 repair epoch
    assert kd_epochs == 2 and [s["stage"] for s in slice_steps] == ["layer2+layer3+layer4"]

    m = json.loads((run / "teacher_same_epochs" / "metrics.json").read_text())
    assert m["extra_epochs"] == budget and len(m["epochs"]) == budget
    teacher = json.loads((run / "teacher" / "metrics.json").read_text())
    assert m["top1_start"] == teacher["top1"] and m["teacher_epochs"] == len(teacher["epochs"])
    # earlier stages were reused, not retrained
    assert "[teacher] skipped" in (run / "m2mdc.log").read_text()

    rows = {r["model"]: r for r in json.loads((run / "summary.json").read_text())["rows"]}
    same = rows["teacher_same_epochs"]
    assert same["top1"] == m["top1"]
    assert same["params"] == rows["teacher"]["params"] and same["macs"] == rows["teacher"]["macs"]

    report = tmp_path / "report"
    _ok(run_cli("report", str(run), "--out", str(report), cwd=tmp_path))
    assert "Teacher (same epochs)" in (report / "report.md").read_text()


def test_paper_recipe_slices_progressively_and_the_default_at_once_on_one_budget(quick_run):
    default = json.loads((quick_run / "slice" / "plan.json").read_text())
    default_metrics = json.loads((quick_run / "slice" / "metrics.json").read_text())
    run = quick_run.parent / "paper"  # same working directory: the same stage cache
    # the default's KD learning-rate schedule too, so both distill stages train alike and only
    # the slicing schedules differ
    paper_run = ("recipe=paper", "kd.lr_schedule=cosine", f"hydra.run.dir={run}")
    _ok(run_cli("run", *TINY, *paper_run, cwd=quick_run.parent))
    assert "[teacher] reused from cache" in (run / "m2mdc.log").read_text()
    paper = json.loads((run / "slice" / "plan.json").read_text())
    paper_metrics = json.loads((run / "slice" / "metrics.json").read_text())
    stages = [s["stage"] for s in paper_metrics["steps"]]
    assert stages == ["layer2", "layer3", "layer4"]  # progressive: one stage per step
    assert [s["stage"] for s in default_metrics["steps"]] == ["+".join(stages)]  # oneshot
    # each progressive step repairs slice.repair_epochs (TINY: 1); the oneshot step all of them
    assert [len(s["repair"]) for s in paper_metrics["steps"]] == [1, 1, 1]
    assert len(default_metrics["steps"][0]["repair"]) == len(stages)
    # both repair with the paper's staged cosine alignment
    assert {"logit_align", "feat_align"} <= set(paper_metrics["steps"][0]["repair"][0])
    assert {"logit_align", "feat_align"} <= set(default_metrics["steps"][0]["repair"][0])
    # same widths and MACs; the default's layer2 cut read the same block-pruned student as
    # the paper's first step (both distill stages start from the same pruned model and data)
    assert paper["widths"] == default["widths"] and paper_metrics["macs"] == default_metrics["macs"]
    first, step = paper["steps"][0], default["steps"][0]
    assert step["planes"]["layer2"] == first["planes"]["layer2"]
    assert {b: v for b, v in step["mid"].items() if b.startswith("layer2")} == first["mid"]


def test_gradual_decay_ends_in_oneshot_architecture_and_records_the_cut(quick_run):
    oneshot = json.loads((quick_run / "slice" / "metrics.json").read_text())
    oneshot_plan = json.loads((quick_run / "slice" / "plan.json").read_text())
    run = quick_run.parent / "gradual"  # the same distilled student (teacher from the cache)
    _ok(
        run_cli(
            "run", *TINY, "slice.schedule=gradual", f"hydra.run.dir={run}", cwd=quick_run.parent
        )
    )
    start = json.loads((run / "distill" / "metrics.json").read_text())["top1"]
    assert start == json.loads((quick_run / "distill" / "metrics.json").read_text())["top1"]
    m = json.loads((run / "slice" / "metrics.json").read_text())
    plan = json.loads((run / "slice" / "plan.json").read_text())
    # the same channels from the same distilled student: same widths, parameters, MACs
    assert plan["steps"][0]["planes"] == oneshot_plan["steps"][0]["planes"]
    assert plan["widths"] == oneshot_plan["widths"]
    assert (m["params"], m["macs"]) == (oneshot["params"], oneshot["macs"])
    (step,) = m["steps"]
    assert len(step["repair"]) == len(oneshot["steps"][0]["repair"])  # the same epoch budget
    assert step["repair"][-1]["decay_factor"] == 0.0
    # decayed to zero, the physical cut changes nothing
    assert step["top1_sliced"] == step["top1_decayed"] == step["repair"][-1]["test_top1"]
    assert m["top1"] == step["top1_recal"] == step["top1_repaired"]  # then BN recalibration
    keys = {"step", "stage", "top1_before", "top1_sliced", "top1_recal"}
    assert m["cut"] == [{k: step[k] for k in (*keys, "top1_decayed")}]
    assert oneshot["cut"] == [{k: oneshot["steps"][0][k] for k in keys}]
    assert m["cut"][0]["top1_before"] == start == oneshot["cut"][0]["top1_before"]


def test_torch_pruning_peers_match_macs_and_latency_and_epochs_and_reach_the_report(
    quick_run, tmp_path
):
    pytest.importorskip("torch_pruning")
    from m2mdc.peers import MAX_RATIO

    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    compare = "compare=[teacher_same_epochs,torch_pruning]"
    # both peers; the latency match within 10% and on one thread: the test machine is shared,
    # and two threads contending with other jobs time unsteadily
    match = ("peer.match=[macs,latency]", "peer.latency_tolerance=0.1")
    one_thread = {"OMP_NUM_THREADS": "1"}
    _ok(
        run_cli("run", *TINY, compare, *match, f"hydra.run.dir={run}", cwd=tmp_path, env=one_thread)
    )
    kd_epochs = len(json.loads((run / "distill" / "metrics.json").read_text())["epochs"])
    slice_metrics = json.loads((run / "slice" / "metrics.json").read_text())
    budget = kd_epochs + 3 * 1  # TINY: layer2..4 sliced, slice.repair_epochs=1

    m = json.loads((run / "peer_torch_pruning" / "metrics.json").read_text())
    assert len(m["epochs"]) == budget and m["student_epochs"]["total"] == budget
    assert abs(m["macs"] - slice_metrics["macs"]) <= 0.02 * slice_metrics["macs"]
    rows = {r["model"]: r for r in json.loads((run / "summary.json").read_text())["rows"]}
    assert set(rows) >= {"teacher", "block_kd", "inner_slice", "teacher_same_epochs"}
    assert rows["peer_torch_pruning"]["macs"] == m["macs"]  # profile reloaded the checkpoint
    assert rows["peer_torch_pruning"]["top1"] == m["top1"]

    lat = json.loads((run / "peer_torch_pruning_latency" / "metrics.json").read_text())
    # the same training as the MAC-matched peer
    assert len(lat["epochs"]) == budget and lat["student_epochs"] == m["student_epochs"]
    assert lat["terms"] == m["terms"] and lat["importance"] == m["importance"]
    # matched to the student's batch-1 latency as timed interleaved with it; every trial kept
    trials = lat["bisection"]
    assert trials[0]["ratio"] == MAX_RATIO
    for t in trials:
        assert set(t) == {"ratio", "macs", "latency_ms", "student_latency_ms", "latency_ratio"}
        assert t["latency_ratio"] > 0 and t["macs"] > 0
    closest = min(trials, key=lambda t: abs(t["latency_ratio"] - 1))
    assert (lat["ratio"], lat["macs"]) == (closest["ratio"], closest["macs"])
    assert abs(lat["latency_ratio"] - 1) <= 0.1 and lat["latency_ratio"] == closest["latency_ratio"]
    # both comparisons beside each other in summary.json, with their MACs and latency
    peer_rows = [rows["peer_torch_pruning"], rows["peer_torch_pruning_latency"]]
    assert rows["peer_torch_pruning_latency"]["macs"] == lat["macs"]
    assert rows["peer_torch_pruning_latency"]["top1"] == lat["top1"]
    assert all(r["latency_ms"] for r in peer_rows)  # the profile timed them with the rest

    report = tmp_path / "report"
    _ok(run_cli("report", str(run), "--out", str(report), cwd=tmp_path))
    md = (report / "report.md").read_text()
    assert "Torch-Pruning peer" in md and "Teacher (same epochs)" in md
    assert (report / "pareto.png").stat().st_size > 0
