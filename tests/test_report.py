"""`m2mdc report`: aggregation, tables, files and the CLI path, on summary files made here.

No model is trained: every run directory is written by :func:`write_run` with the layout a
finished pipeline leaves (summary.json, .hydra/config.yaml, distill/metrics.json).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from m2mdc import cli
from m2mdc.errors import M2MError
from m2mdc.report import PAPER, aggregate, find_runs, main, pareto_frontier

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (top1, params, macs) per row; seed-dependent accuracy so the std is not zero
R18 = {
    "teacher": (83.0, 11_181_642, 37_016_576),
    "block_kd": (85.0, 9_630_000, 23_000_000),
    "inner_slice": (85.5, 3_090_000, 13_900_000),
}


def write_run(
    root: Path,
    name: str,
    *,
    seed: int,
    rows: dict[str, tuple[float, float, float]],
    model: str = "resnet18",
    ratio: float = 0.4,
    config: bool = True,
    extra_cfg: dict | None = None,
) -> Path:
    """A run directory as the pipeline leaves it; the summary's *_pct fields are bogus (999)
    so a test notices if the report used them instead of recomputing from the means."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    summary_rows = [
        {
            "model": n,
            "top1": t,
            "params": p,
            "macs": m,
            "conv_macs": m - 5000,
            "latency_ms": 10.0,
            "params_reduction_pct": 999.0,
            "macs_reduction_pct": 999.0,
        }
        for n, (t, p, m) in rows.items()
    ]
    summary = {
        "rows": summary_rows,
        "model": model,
        "dataset": "cifar100",
        "num_classes": 100,
        "input_size": 32,
        "seed": seed,
        "experiment": "sweep",
        "prune_ratio": ratio,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    if config:
        # device and force differ between seeds: ignored keys must not split a group
        cfg = {
            "command": "run",
            "experiment_name": "sweep",
            "model": {"name": model},
            "dataset": {"name": "cifar100", "image_size": 32, "num_workers": seed % 2},
            "prune": {"ratio": ratio, "keep_cfg": None},
            "kd": {"epochs": 2},
            "profile": {"latency_repeats": seed},
            "seed": seed,
            "device": "cpu" if seed % 2 else "cuda",
            "force": bool(seed % 2),
            **(extra_cfg or {}),
        }
        import yaml

        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    epochs = [
        {
            "epoch": e,
            "ce": 1.0 / e,
            "logit_align": 0.1,
            "feat_align": 0.2,
            "alpha": 0.0,
            "beta": 0.0,
            "train_top1": 50.0 + e,
            "test_top1": 60.0 + e + seed % 3,
        }
        for e in (1, 2)
    ]
    (run / "distill").mkdir()
    (run / "distill" / "metrics.json").write_text(json.dumps({"epochs": epochs}))
    return run


def shifted(rows: dict, dt: float) -> dict:
    return {n: (t + dt, p, m) for n, (t, p, m) in rows.items()}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """resnet18 at two prune ratios x 3 seeds (nested like a Hydra sweep) + one mobilenet run."""
    root = tmp_path_factory.mktemp("sweep")
    for ratio in (0.25, 0.4):
        for seed, dt in ((42, 0.0), (99, 1.0), (123, 3.0)):
            write_run(root / f"r{ratio}", f"s{seed}", seed=seed, rows=shifted(R18, dt), ratio=ratio)
    mb = {"teacher": (66.0, 2_350_000, 24_400_000), "block_kd": (67.9, 1_710_000, 18_600_000)}
    write_run(root, "mb", seed=42, rows=mb, model="mobilenet_v2")
    return root


@pytest.fixture(scope="module")
def report_dir(sweep: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main([str(sweep), "--out", str(out)]) == 0
    return out


def test_groups_by_config_minus_seed_and_ignored_keys(sweep: Path):
    groups = aggregate(find_runs([sweep]))
    assert [(g["model"], len(g["runs"])) for g in groups] == [
        ("mobilenet_v2", 1),
        ("resnet18", 3),
        ("resnet18", 3),
    ]
    r18 = [g for g in groups if g["model"] == "resnet18"]
    assert {g["config"]["prune.ratio"] for g in r18} == {0.25, 0.4}  # two groups kept apart
    assert [g["seeds"] for g in r18] == [[42, 99, 123]] * 2
    assert "prune.ratio=0.25" in r18[0]["label"] and "prune.ratio=0.4" in r18[1]["label"]
    assert not any(k.startswith(("device", "force", "profile.latency")) for k in r18[0]["config"])


def test_mean_and_sample_std(sweep: Path):
    g = next(g for g in aggregate(find_runs([sweep])) if g["model"] == "resnet18")
    teacher = g["rows"][0]
    values = [83.0, 84.0, 86.0]
    assert teacher["model"] == "teacher" and teacher["n"] == 3
    assert teacher["top1_mean"] == pytest.approx(statistics.mean(values))
    assert teacher["top1_std"] == pytest.approx(statistics.stdev(values))  # ddof=1
    assert teacher["top1_std"] != pytest.approx(statistics.pstdev(values))


def test_reductions_come_from_the_means_not_the_pct_fields(tmp_path: Path):
    # seed-dependent parameter counts (as MI-chosen blocks may differ between seeds)
    for seed, p in ((1, 4_000_000), (2, 2_000_000)):
        rows = {"teacher": (80.0, 10_000_000, 1e9), "inner_slice": (81.0, p, 4e8)}
        write_run(tmp_path, f"s{seed}", seed=seed, rows=rows)
    (g,) = aggregate(find_runs([tmp_path]))
    inner = g["rows"][1]
    assert inner["params_mean"] == 3_000_000
    assert inner["params_reduction_pct"] == pytest.approx(70.0)
    assert inner["macs_reduction_pct"] == pytest.approx(60.0)
    assert g["rows"][0]["params_reduction_pct"] == 0.0
    assert inner["top1_delta"] == pytest.approx(1.0)


def test_teacher_first_and_unknown_rows_kept(tmp_path: Path):
    rows = {"block_kd": (1.0, 2, 2), "teacher": (2.0, 4, 4), "peer_torch_pruning": (3.0, 1, 1)}
    write_run(tmp_path, "a", seed=1, rows=rows)
    (g,) = aggregate(find_runs([tmp_path]))
    assert [r["model"] for r in g["rows"]] == ["teacher", "block_kd", "peer_torch_pruning"]
    assert g["rows"][2]["params_reduction_pct"] == pytest.approx(75.0)


def test_runs_without_hydra_config_group_by_summary_fields(tmp_path: Path):
    for seed in (1, 2):
        write_run(tmp_path, f"s{seed}", seed=seed, rows=R18, config=False)
    write_run(tmp_path, "other", seed=1, rows=R18, config=False, ratio=0.1)
    groups = aggregate(find_runs([tmp_path]))
    assert sorted(len(g["runs"]) for g in groups) == [1, 2]


def test_pareto_frontier_on_hand_made_points():
    pts = [(1.0, 50.0), (2.0, 60.0), (2.0, 55.0), (3.0, 60.0), (0.5, 40.0), (4.0, 70.0),
           (4.0, 70.0), (5.0, 65.0)]  # fmt: skip
    # (2,55) loses to (2,60) on accuracy, (3,60) to (2,60) on cost, (5,65) to (4,70) on both;
    # the identical (4,70) pair does not dominate itself; result ordered by cost
    assert pareto_frontier(pts) == [4, 0, 1, 5, 6]
    assert pareto_frontier([]) == []
    assert pareto_frontier([(1.0, 1.0)]) == [0]


def test_pareto_flags_per_series(sweep: Path):
    groups = aggregate(find_runs([sweep]))
    mb = next(g for g in groups if g["model"] == "mobilenet_v2")
    # block_kd is on mobilenet's own frontier although resnet18 rows would dominate it
    assert [r["pareto"] for r in mb["rows"]] == [False, True]


def test_markdown_has_seed_table_mean_std_and_paper_columns(report_dir: Path):
    md = (report_dir / "report.md").read_text()
    assert "| Seed | Teacher | Block-KD | Inner-slice |" in md
    assert "| Mean ± Std | 84.33 ± 1.53 |" in md  # 83, 84, 86: sample std 1.53
    assert "| 123 | 86.00 | 88.00 | 88.50 |" in md
    assert "| Model | Acc (mean) | Params (M) | GMacs |" in md
    assert "Beside the paper (Tables 1 and 2, resnet18)" in md
    assert "83.15 ± 0.55ᵖ" in md and "83.15 ± 0.67" in md  # published and recomputed
    assert "| Teacher ours | paper | Δ |" in md
    assert "population standard deviations (ddof=0)" in md
    assert "67.90 ± n/a" in md  # one mobilenet seed: no std
    assert "![pareto](pareto.png)" in md and "![kd_curves](kd_curves.png)" in md


def test_csv_and_json_written(report_dir: Path):
    rows = list(csv.DictReader((report_dir / "report.csv").open()))
    assert len(rows) == 3 + 3 + 2
    t = next(r for r in rows if r["arch"] == "resnet18" and r["model"] == "teacher")
    assert float(t["top1_mean"]) == pytest.approx(84.3333, abs=1e-3)
    assert float(t["paper_top1"]) == 83.15
    data = json.loads((report_dir / "report.json").read_text())
    assert len(data["groups"]) == 3 and "seed" in data["ignored_keys"]
    curve = data["groups"][1]["kd_curve"]
    assert [e["epoch"] for e in curve] == [1, 2]
    assert curve[0]["test_top1"] == pytest.approx(61.0 + (42 % 3 + 99 % 3 + 123 % 3) / 3)


def test_plots_are_valid_pngs(report_dir: Path):
    from PIL import Image

    for name in ("pareto.png", "kd_curves.png"):
        data = (report_dir / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(report_dir / name) as im:
            im.verify()


def test_paper_values_are_consistent_and_population_std():
    for model, p in PAPER.items():
        for i, (mean, std) in enumerate(p["mean_std"]):
            per_seed = [v[i] for v in p["seeds"].values()]
            assert statistics.mean(per_seed) == pytest.approx(mean, abs=0.006), model
            assert statistics.pstdev(per_seed) == pytest.approx(std, abs=0.006), model
        stated = p["stated_inner_slice_change_pct"]
        assert 100 * (p["params_m"][2] / p["params_m"][0] - 1) == pytest.approx(
            stated["params"],
            abs=0.3,  # the published columns are rounded
        )


def test_cli_report_returns_0_and_name_option(sweep: Path, tmp_path: Path):
    assert cli.main(["report", str(sweep / "r0.4"), "--out", str(tmp_path), "--name", "r"]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"r.md", "r.csv", "r.json", "r_pareto.png"}


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "bad-flag"])
def test_cli_errors_are_one_line_exit_2(case: str, tmp_path: Path, capsys):
    target = tmp_path / "nowhere"
    args = ["report", str(target)]
    if case != "missing":
        target.mkdir()
    if case == "corrupt":
        (target / "summary.json").write_text("{not json")
    if case == "bad-flag":
        args.append("--bogus")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2mdc: error: ") and err.count("\n") == 1, err
    assert not (target / "report.md").exists()


def test_main_raises_m2merror_for_the_cli_to_print(tmp_path: Path):
    with pytest.raises(M2MError, match=r"no summary\.json"):
        main([str(tmp_path)])
