"""``m2mdc report DIR... [--out OUTDIR] [--name report]``: tables and plots from finished runs.

Every ``summary.json`` below the given directories is one run; it and the other files read
from its run directory are checked against the run's ``manifest.json`` first (a changed file
is refused, a run without a manifest is included and marked unverified). Runs whose
configuration (the one ``summary.json`` records, for older summaries ``.hydra/config.yaml``)
is equal apart from the seed and the keys in :data:`IGNORED_KEYS` form a group; per group the
report holds the per-seed table of the paper's Tables 1/3/5, the compute table of Tables
2/4/6 and, where the group ran the paper's dataset and model, the published numbers beside
ours (:mod:`m2mdc.report_paper`). Outputs (``report.md``, ``.csv``, ``.json``,
``pareto.png``, ``kd_curves.png``) are written atomically into OUTDIR.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from m2mdc.errors import M2MError
from m2mdc.report_paper import PAPER, paper_comparison
from m2mdc.report_paper import ROWS as _ROWS
from m2mdc.report_paper import change_pct as _change
from m2mdc.report_paper import scaled as _scaled
from m2mdc.rows import DISPLAY, ROWS, STUDENT_ROWS

# Settings that never change a run's numbers, so runs differing only in them share a group.
# Besides the seed (which is what a group averages over): how the run was started (command,
# force, checkpoint: the `profile checkpoint=...` input), where it ran or cached data (device,
# cache_dir, use_cache: the cache is content-addressed), Hydra's own node, the export command's
# settings, dataset download, decoding threads and streaming (the same batches either way),
# the latency measurement settings (latency is a property of the machine, not of the model's
# accuracy), and the execution-speed `perf`
# switches (like `device`: how the same computation was run), and the console's `ui` settings.
# `quantize`: like export, deployment measurements of the same models.
IGNORED_KEYS: tuple[str, ...] = (
    "seed", "command", "force", "device", "cache_dir", "use_cache", "checkpoint", "hydra",
    "perf", "ui", "logger", "export", "quantize", "dataset.download", "dataset.num_workers",
    "dataset.in_memory", "dataset.memory_budget_gb",
    "profile.latency", "profile.latency_warmup", "profile.latency_repeats", "profile.batch_sizes",
)  # fmt: skip
# Where a run's grouping configuration came from, and what the report says about it.
CONFIG_SOURCES = {
    "summary": "the configuration recorded in summary.json by the command that wrote it",
    "hydra": "summary.json records no configuration (written by an older m2mdc): grouped by "
    ".hydra/config.yaml, which a later command may have rewritten",
    "fields": "summary.json records no configuration and there is no .hydra/config.yaml: "
    "grouped by the summary's model, dataset, classes, input size, experiment and prune ratio",
}
# Used as the grouping key when a run records no configuration at all (summary.json fields).
SUMMARY_KEYS = {"model": "model.name", "dataset": "dataset.name", "experiment": "experiment_name",
                "prune_ratio": "prune.ratio", "num_classes": "dataset.num_classes",
                "input_size": "profile.input_size"}  # fmt: skip
KD_KEYS = ("top1", "train_top1", "ce", "logit_align", "feat_align", "alpha", "beta")
CHANGE_NOTE = (
    "100 x (row / teacher - 1) of the mean params or MACs over seeds: negative = fewer than "
    "the teacher (-52.8% is 52.8% fewer). summary.json, the run's console summary and this "
    "report's .csv/.json give the same quantity with the opposite sign as *_reduction_pct "
    "(+52.8 = 52.8% fewer)."
)
STD_NOTE = (
    "Our ± is the sample standard deviation over seeds (ddof=1); a single seed shows n/a. "
    "The paper's published ± values are population standard deviations (ddof=0): Table 1's "
    "teacher accuracies 82.82, 82.71, 83.93 give 0.55 only with ddof=0 (0.67 with ddof=1)."
)


@dataclass
class Run:
    """One finished run: its summary rows, grouping configuration and KD history.

    ``config_source`` says where ``config`` came from (:data:`CONFIG_SOURCES`); ``unverified``
    lists why files the report read could not be checked against the run's manifest (empty:
    every one was checked); ``blocks_removed`` is ``prune/plan.json``'s list, or None.
    """

    dir: Path
    seed: int | None
    meta: dict[str, Any]
    rows: dict[str, dict[str, Any]]
    config: dict[str, Any]
    kd_epochs: list[dict[str, Any]] = field(default_factory=list)
    config_source: str = "summary"
    unverified: list[str] = field(default_factory=list)
    blocks_removed: list[str] | None = None


def _flatten(node: Any, prefix: str = "", depth: int = 0) -> dict[str, Any]:
    # Two levels (group.key) like the schema; deeper mappings such as keep_cfg stay one value.
    if isinstance(node, dict) and depth < 2:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}", depth + 1))
        return out
    return {prefix: node}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


def _load_hydra_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.load(path)
        try:
            cfg = OmegaConf.to_container(raw, resolve=True)
        except Exception:  # interpolations into Hydra's runtime node: keep them as written
            cfg = OmegaConf.to_container(raw, resolve=False)
    except Exception as exc:
        raise M2MError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    return {str(k): v for k, v in cfg.items()} if isinstance(cfg, dict) else None


def _checked_read(run: Run, rel: str) -> Any:
    """Read ``run.dir/rel`` after checking it against the run's manifest.

    A file whose sha256 differs from the manifest's is refused (M2MError: a report never
    mixes in a record that changed after it was written); a file that cannot be checked (no
    manifest, or not recorded in it) is read, and the reason goes to ``run.unverified``.
    """
    from m2mdc.artifacts import read_json
    from m2mdc.manifest import MANIFEST, verify

    manifest = run.dir / MANIFEST
    arts = None
    if manifest.is_file():
        doc = read_json(manifest)
        arts = doc.get("artifacts") if isinstance(doc, dict) else None
        if not isinstance(arts, dict):
            raise M2MError(f"report: {manifest} has no artifacts table; cannot check {run.dir}")
    if arts is None:
        why = f"no {MANIFEST}"
    elif rel not in arts:
        why = f"{rel} is not recorded in {MANIFEST}"
    else:
        try:
            verify(run.dir / rel)
        except M2MError as exc:
            raise M2MError(
                f"report: {exc}; rerun {run.dir} or leave it out of the report"
            ) from None
        why = ""
    if why and why not in run.unverified:
        run.unverified.append(why)
    return read_json(run.dir / rel)


def _grouping_config(run: Run, summary: dict[str, Any]) -> dict[str, Any]:
    """The configuration that produced the results: the one summary.json records; for a
    summary written before it did, ``.hydra/config.yaml`` (which a later command may have
    rewritten), else the summary's own fields."""
    recorded = summary.get("config")
    if recorded is not None:
        if not isinstance(recorded, dict):
            raise M2MError(f"{run.dir / 'summary.json'}: 'config' is not a mapping")
        run.config_source = "summary"
        return _flatten(recorded)
    hydra_cfg = _load_hydra_config(run.dir)
    if hydra_cfg is not None:
        run.config_source = "hydra"
        return _flatten(hydra_cfg)
    run.config_source = "fields"
    return {key: summary.get(src) for src, key in SUMMARY_KEYS.items()}


def load_run(summary_path: Path) -> Run:
    """Read one run directory: summary.json and, when present, prune/plan.json and
    distill/metrics.json, each checked against the run's manifest (see :func:`_checked_read`);
    ``.hydra/config.yaml`` only for summaries that record no config."""
    run = Run(summary_path.parent, None, {}, {}, {})
    summary = _checked_read(run, summary_path.name)
    rows = summary.get("rows") if isinstance(summary, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "model" in r for r in rows):
        raise M2MError(f"{summary_path} is not an m2mdc summary (no 'rows' list of models)")
    config = _grouping_config(run, summary)
    seed = summary.get("seed", config.get("seed"))
    run.seed = None if seed is None else int(seed)
    run.config = {k: v for k, v in config.items() if not _ignored(k)}
    ordered = sorted(rows, key=lambda r: r["model"] != "teacher")  # stable: teacher first
    run.rows = {r["model"]: r for r in ordered}
    run.meta = {k: v for k, v in summary.items() if k not in ("rows", "config", "fingerprints")}
    if (run.dir / "distill" / "metrics.json").is_file():
        run.kd_epochs = _checked_read(run, "distill/metrics.json").get("epochs", [])
    if (run.dir / "prune" / "plan.json").is_file():
        run.blocks_removed = list(_checked_read(run, "prune/plan.json").get("removed", []))
    _warn(run)
    return run


def _warn(run: Run) -> None:
    from m2mdc.ui import log

    if run.unverified:
        log.warning(
            f"report: {run.dir} is UNVERIFIED ({'; '.join(run.unverified)}): what it records "
            "cannot be checked against a sha256; it is included and marked unverified"
        )
    if run.config_source != "summary":
        log.warning(f"report: {run.dir}: {CONFIG_SOURCES[run.config_source]}")


def find_runs(dirs: Sequence[str | Path]) -> list[Run]:
    """Every run (a ``summary.json``) below the given directories, each path once."""
    paths: dict[Path, None] = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise M2MError(f"report: {d} is not a directory")
        for p in sorted(d.rglob("summary.json")):
            paths.setdefault(p.resolve(), None)
    if not paths:
        where = ", ".join(str(d) for d in dirs)
        raise M2MError(f"report: no summary.json below {where} (a run writes it when it finishes)")
    return [load_run(p) for p in paths]


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and SAMPLE std (ddof=1); std is None for fewer than two values."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (cost, accuracy) points, by ascending cost.

    A point is dominated when another has cost <= and accuracy >= with one strictly better:
    lower MACs and higher accuracy are both wins. Identical points do not dominate each other.
    """
    pts = list(points)
    keep = [
        i
        for i, (c, a) in enumerate(pts)
        if not any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for c2, a2 in pts)
    ]
    return sorted(keep, key=lambda i: (pts[i][0], -pts[i][1]))


def _aggregate_rows(runs: list[Run]) -> list[dict[str, Any]]:
    names = list(dict.fromkeys(n for r in runs for n in r.rows))
    out = []
    for name in names:
        present = [r.rows[name] for r in runs if name in r.rows]
        row: dict[str, Any] = {"model": name, "n": len(present)}
        row["top1_mean"], row["top1_std"] = mean_std(p.get("top1") for p in present)
        for k in ("params", "macs", "conv_macs", "latency_ms"):
            row[f"{k}_mean"] = mean_std(p.get(k) for p in present)[0]
        out.append(row)
    teacher = out[0] if out and out[0]["model"] == "teacher" else None
    for row in out:  # reductions from the MEANS, not from the runs' own *_pct fields
        for k in ("params", "macs", "conv_macs"):
            ch = _change(row[f"{k}_mean"], teacher[f"{k}_mean"]) if teacher else None
            row[f"{k}_reduction_pct"] = None if ch is None else (-ch or 0.0)  # no -0.0
        t1 = teacher["top1_mean"] if teacher else None
        row["top1_delta"] = (
            None if t1 is None or row["top1_mean"] is None else row["top1_mean"] - t1
        )
    return out


def split_name(split: str) -> str:
    """How a report names the split a run's top1 was measured on (summary ``top1_split``)."""
    return {"test": "test", "val": "validation"}.get(split, split)


def margins(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The final student's top1 minus each comparison's, paired per seed (the runs where both
    rows exist), with the student's MACs and latency over the comparison's (means): at equal
    MACs, at equal latency (the two Torch-Pruning peers) and at equal epochs (the teacher).

    The final student is the last student row a run has (inner_slice, else block_kd, ...).
    """
    out = []
    comparisons = [r.name for r in ROWS if r.kind == "comparison"]
    for against in comparisons:
        pairs = []
        for run in runs:
            student = next((n for n in reversed(STUDENT_ROWS) if n in run.rows), None)
            if student is not None and against in run.rows:
                pairs.append((student, run.rows[student], run.rows[against]))
        if not pairs:
            continue
        diff = mean_std(
            None if s.get("top1") is None or c.get("top1") is None else s["top1"] - c["top1"]
            for _, s, c in pairs
        )

        def ratio(key: str, pairs: list = pairs) -> float | None:
            num, den = (mean_std(p[i].get(key) for p in pairs)[0] for i in (1, 2))
            return None if num is None or not den else num / den

        out.append(
            {
                "student": pairs[0][0],
                "against": against,
                "n": len(pairs),
                "margin_mean": diff[0],
                "margin_std": diff[1],
                "macs_ratio": ratio("macs"),
                "latency_ratio": ratio("latency_ms"),
            }
        )
    return out


def _kd_curve(runs: list[Run]) -> list[dict[str, Any]]:
    by_epoch: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        for e in r.kd_epochs:  # top1: the reporting split's (test, or val without one)
            top1 = e.get("test_top1", e.get("val_top1"))
            by_epoch.setdefault(int(e["epoch"]), []).append({**e, "top1": top1})
    return [
        {"epoch": ep, "n": len(es), **{k: mean_std(e.get(k) for e in es)[0] for k in KD_KEYS}}
        for ep, es in sorted(by_epoch.items())
    ]


def _fmt_value(v: Any) -> str:
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"), sort_keys=True).replace('"', "")
    return str(v)


def aggregate(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Group runs by configuration minus seed/ignored keys; mean/std per row; paper columns.

    Returns:
        JSON-ready groups sorted by model and label, each with ``runs`` (per seed, with where
        its configuration came from and why it is unverified, if it is), ``rows`` (aggregates,
        teacher first), ``blocks_removed`` (per run), ``kd_curve``, ``paper`` (see
        :func:`~m2mdc.report_paper.paper_comparison`) and ``config``.
    """
    buckets: dict[str, list[Run]] = {}
    for r in runs:
        key = json.dumps(r.config, sort_keys=True, default=str)
        buckets.setdefault(key, []).append(r)
    groups: list[dict[str, Any]] = []
    for members in buckets.values():
        members.sort(key=lambda r: (r.seed is None, r.seed or 0, str(r.dir)))
        first, cfg = members[0], members[0].config
        groups.append(
            {
                "model": first.meta.get("model", cfg.get("model.name")),
                "experiment": first.meta.get("experiment", cfg.get("experiment_name")),
                "dataset": first.meta.get("dataset", cfg.get("dataset.name")),
                "num_classes": first.meta.get("num_classes"),
                "input_size": first.meta.get("input_size"),
                "split": split_name(first.meta.get("top1_split", "test")),
                "seeds": [r.seed for r in members],
                "runs": [
                    {
                        "dir": str(r.dir),
                        "seed": r.seed,
                        "top1": {n: row.get("top1") for n, row in r.rows.items()},
                        "config_source": r.config_source,
                        "unverified": r.unverified,
                        "blocks_removed": r.blocks_removed,
                    }
                    for r in members
                ],
                "blocks_removed": [
                    None if r.blocks_removed is None else len(r.blocks_removed) for r in members
                ],
                "rows": _aggregate_rows(members),
                "margins": margins(members),
                "int8": int8_rows(members),
                "kd_curve": _kd_curve(members),
                "config": cfg,
            }
        )
    for g in groups:  # label: model, experiment, and what varies within that sweep
        peers = [
            h for h in groups if (h["model"], h["experiment"]) == (g["model"], g["experiment"])
        ]
        keys = sorted({k for h in peers for k in h["config"]})
        varying = [k for k in keys if len({_fmt_value(h["config"].get(k)) for h in peers}) > 1]
        g["label"] = " · ".join(
            [str(g["model"]), str(g["experiment"])]
            + [f"{k}={_fmt_value(g['config'].get(k))}" for k in varying]
        )
    groups.sort(key=lambda g: (str(g["model"]), g["label"]))
    for i, g in enumerate(groups, 1):
        g["id"], g["series"] = f"g{i}", _series(g)
        g["paper"] = paper_comparison(g)
    _mark_pareto(groups)
    return groups


def _series(g: dict[str, Any]) -> str:
    return f"{g['model']} · {g['dataset']} · {g['input_size']}px"


def _mark_pareto(groups: list[dict[str, Any]]) -> None:
    # Frontier per series (architecture, dataset, input size): only those are comparable.
    for s in {_series(g) for g in groups}:
        rows = [r for g in groups if _series(g) == s for r in g["rows"]]
        for cost, flag in (("macs_mean", "pareto"), ("latency_ms_mean", "pareto_latency")):
            usable = [r for r in rows if r[cost] is not None and r["top1_mean"] is not None]
            front = pareto_frontier([(r[cost], r["top1_mean"]) for r in usable])
            for i, r in enumerate(usable):
                r[flag] = i in front


def main(argv: Sequence[str]) -> int:
    """``m2mdc report``: parse arguments, aggregate, write the report files, print tables."""
    parser = _Parser(
        prog="m2mdc report",
        description="Tables and plots from finished runs: per-seed, compute, paper side by side.",
        epilog="Writes NAME.md, NAME.csv, NAME.json, pareto.png, pareto_latency.png and "
        "kd_curves.png (prefixed NAME_ when --name is given), and NAME.html with --html, into "
        "OUTDIR; every summary.json below each DIR is a run.",
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="searched recursively")
    parser.add_argument("--out", metavar="OUTDIR", help="output directory (default: first DIR)")
    parser.add_argument("--name", default="report", help="file stem (default: report)")
    parser.add_argument(
        "--html",
        action="store_true",
        help="also write NAME.html: one self-contained page (tables, plots inlined, configs)",
    )
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    runs = find_runs(args.dirs)
    groups = aggregate(runs)
    write_report(groups, args.dirs, Path(args.out or args.dirs[0]), args.name, html=args.html)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are M2MErrors: one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise M2MError(f"report: {message}")


def to_csv(groups: Sequence[dict[str, Any]]) -> str:
    """One CSV line per (group, model row) with the aggregates and the paper's values."""
    cols = ["group", "label", "arch", "experiment", "dataset", "num_classes", "input_size",
            "model", "n", "seeds", "top1_mean", "top1_std", "params_mean", "macs_mean",
            "conv_macs_mean", "latency_ms_mean", "params_reduction_pct", "macs_reduction_pct",
            "conv_macs_reduction_pct", "top1_delta", "pareto", "unverified_runs", "paper_config",
            "paper_top1", "paper_params_m", "paper_gmacs", "top1_minus_paper"]  # fmt: skip
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for g in groups:
        paper = {r["model"]: r for r in (g["paper"] or {}).get("rows", [])}
        meta = {"group": g["id"], "arch": g["model"], "seeds": " ".join(map(str, g["seeds"]))}
        meta |= {k: g[k] for k in ("label", "experiment", "dataset", "num_classes", "input_size")}
        meta |= {"unverified_runs": sum(bool(r["unverified"]) for r in g["runs"])}
        meta |= {"paper_config": _paper_config(g["paper"])}
        for r in g["rows"]:
            p = paper.get(r["model"], {})
            w.writerow(
                {k: r.get(k) for k in cols if k in r}
                | meta
                | {"pareto": r.get("pareto", False), "paper_top1": p.get("top1_paper")}
                | {"paper_params_m": p.get("params_m_paper"), "paper_gmacs": p.get("gmacs_paper")}
                | {"top1_minus_paper": p.get("top1_diff")}
            )
    return buf.getvalue()


def _paper_config(p: dict[str, Any] | None) -> str:
    """One cell: whether the paper's values were shown and, if so, what differs."""
    if p is None:
        return ""
    if not p["shown"]:
        return f"not shown: {p['why']}"
    return "differs: " + "; ".join(p["differs"]) if p["differs"] else "same"


# ---- rendering: markdown, console, files ------------------------------------------------
def _f(v: float | None, nd: int = 2, sign: bool = False) -> str:
    if v is None:
        return "–"
    return f"{(v if round(v, nd) else 0.0):{'+' if sign else ''}.{nd}f}"  # never "-0.00"


def _pm(mean: float | None, std: float | None, sign: bool = False) -> str:
    return f"{_f(mean, sign=sign)} ± {'n/a' if std is None else _f(std)}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{_f(v, 1, sign=True)}%"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _name(n: str) -> str:
    return DISPLAY.get(n, n)


def seed_table(g: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Tables 1/3/5 layout: ``Seed | Teacher | Block-KD | Inner-slice``, then Mean ± Std."""
    names = [r["model"] for r in g["rows"]]
    body = [[str(r["seed"]), *(_f(r["top1"].get(n)) for n in names)] for r in g["runs"]]
    body.append(["Mean ± Std", *(_pm(r["top1_mean"], r["top1_std"]) for r in g["rows"])])
    return ["Seed", *map(_name, names)], body


def compute_table(g: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Tables 2/4/6 layout plus ConvGMacs, latency and the changes vs the teacher's means
    (:data:`CHANGE_NOTE`: negative = fewer than the teacher)."""
    head = ["Model", "Acc (mean)", "Params (M)", "GMacs", "ConvGMacs", "Latency (ms)",
            "Params change vs teacher", "GMacs change vs teacher",
            "ConvGMacs change vs teacher", "Pareto"]  # fmt: skip
    body = [
        [
            _name(r["model"]),
            _f(r["top1_mean"]),
            _f(_scaled(r["params_mean"], 1e6)),
            _f(_scaled(r["macs_mean"], 1e9), 4),
            _f(_scaled(r["conv_macs_mean"], 1e9), 4),
            _f(r["latency_ms_mean"], 1),
            *(
                _pct(None if r[f"{k}_reduction_pct"] is None else -r[f"{k}_reduction_pct"])
                for k in ("params", "macs", "conv_macs")
            ),
            "★" if r.get("pareto") else "",
        ]
        for r in g["rows"]
    ]
    return head, body


def paper_tables(p: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    """Per-seed and compute tables with the paper's values beside ours and ours − paper."""
    head = ["Seed"] + [c for n in _ROWS for c in (f"{_name(n)} ours", "paper", "Δ")]
    body = []
    for s in p["seeds"]:
        cells = [str(s["seed"])]
        for n in _ROWS:
            a, b = s["ours"].get(n), s["paper"].get(n)
            cells += [_f(a), _f(b), _f(None if a is None or b is None else a - b, sign=True)]
        body.append(cells)
    rows = p["rows"]
    body.append(
        ["Mean ± Std"]
        + [
            c
            for r in rows
            for c in (
                _pm(r["top1_ours"], r["top1_std_ours"]),
                _pm(r["top1_paper"], r["top1_std_paper"]) + "ᵖ",
                _f(r["top1_diff"], sign=True),
            )
        ]
    )
    body.append(
        ["paper, sample std"]
        + [c for r in rows for c in ("", _pm(r["top1_paper"], r["top1_sample_std_paper"]), "")]
    )
    mac, spec = p["mac_column"], (("top1", 2), ("params_m", 2), ("gmacs", 4))
    head2 = ["Model"] + [c for h in ("Acc", "Params (M)", mac) for c in (f"{h} ours", "paper", "Δ")]
    head2 += ["Params change vs teacher ours", "paper", f"{mac} change vs teacher ours", "paper"]
    body2 = [
        [_name(r["model"])]
        + [_f(r[f"{k}_{side}"], nd, sign=side == "diff") for k, nd in spec for side in SIDES]
        + [_pct(r[f"{k}_change_pct_{side}"]) for k in ("params_m", "gmacs") for side in SIDES[:2]]
        for r in rows
    ]
    return [(head, body), (head2, body2)]


SIDES = ("ours", "paper", "diff")


def _duplicate_seed_note(seeds: list[int | None]) -> list[str]:
    # a rerun of the same seed in another directory counts twice in the mean: say so
    dup = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    return [f"Note: seed(s) {', '.join(map(str, dup))} appear more than once.", ""] if dup else []


def _md(head: list[str], body: list[list[str]]) -> list[str]:
    rule = "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"
    return ["| " + " | ".join(head) + " |", rule, *("| " + " | ".join(r) + " |" for r in body), ""]


def _notes() -> list[str]:
    return [
        "- **Groups**: runs whose configuration is equal apart from the seed and the settings "
        "that do not change results: "
        + ", ".join(f"`{k}`" for k in IGNORED_KEYS)
        + ". The configuration is the one each summary.json records (that of the command "
        "that produced the results); for a summary written by an older m2mdc, "
        "`.hydra/config.yaml`, else the summary's model, dataset, classes, input size, "
        "experiment and prune ratio (such runs are named under **Provenance**).",
        f"- **Std**: {STD_NOTE}",
        f"- **Change vs teacher**: {CHANGE_NOTE} GMacs: 1e9 multiply-accumulates of "
        "convolutions and linear layers for one image at the group's input size; ConvGMacs: "
        "convolutions only.",
        "- **Pareto** ★: not dominated in (higher accuracy, lower GMacs) within its "
        "architecture, dataset and input size.",
        "- **Verified**: every summary.json, prune/plan.json and distill/metrics.json read "
        "here matched the sha256 its run's manifest.json records, except the runs marked "
        "**unverified** (nothing to check them against); a changed file stops the report.",
    ]


def _provenance(groups: Sequence[dict[str, Any]]) -> list[str]:
    """Loud lines for unverified runs and for runs grouped by an older record."""
    runs = [r for g in groups for r in g["runs"]]
    bad = [r for r in runs if r["unverified"]]
    old = [r for r in runs if r["config_source"] != "summary"]
    if not bad and not old:
        return []
    out = ["## Provenance", ""]
    if bad:
        out += [f"**Warning: {_n(len(bad), 'run')} UNVERIFIED** (included, not checked):", ""]
        out += [f"- `{r['dir']}`: {'; '.join(r['unverified'])}" for r in bad] + [""]
    if old:
        out += [f"**Warning: {_n(len(old), 'run')} grouped without a recorded configuration:**"]
        out += ["", *(f"- `{r['dir']}`: {CONFIG_SOURCES[r['config_source']]}" for r in old), ""]
    return out


MARGIN_NOTE = {
    "peer_torch_pruning": "equal MACs",
    "peer_torch_pruning_latency": "equal latency",
    "teacher_same_epochs": "equal epochs",
}


def _margins_md(g: dict[str, Any]) -> list[str]:
    """The final student against each comparison (:func:`margins`), when the group has any."""
    if not g.get("margins"):
        return []
    head = ["Student", "Against", "At", "Seeds", "Margin (points)", "MACs ratio", "Latency ratio"]
    body = [
        [
            _name(m["student"]),
            _name(m["against"]),
            MARGIN_NOTE.get(m["against"], ""),
            str(m["n"]),
            _pm(m["margin_mean"], m["margin_std"], sign=True),
            _f(m["macs_ratio"], 3),
            _f(m["latency_ratio"], 3),
        ]
        for m in g["margins"]
    ]
    return [
        "### Margins (student top-1 minus the comparison's, paired per seed)",
        "",
        "Ratios: the student's mean MACs and batch-1 latency over the comparison's.",
        "",
        *_md(head, body),
    ]


def int8_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per model some run quantized (summary.json's ``int8_*`` columns, from ``m2mdc
    quantize``): the means over those runs of its INT8 and FP32 ONNX Runtime columns
    (``<column>_mean``), its MACs, the INT8 top1's sample std and the run count ``n``."""
    out = []
    for name in dict.fromkeys(n for r in runs for n in r.rows):
        present = [r.rows[name] for r in runs if r.rows.get(name, {}).get("int8_top1") is not None]
        if not present:
            continue
        keys = dict.fromkeys(k for p in present for k in p if k.startswith(("int8_", "fp32_ort_")))
        row: dict[str, Any] = {"model": name, "n": len(present)}
        for k in [*keys, "macs"]:
            row[f"{k}_mean"] = mean_std(p.get(k) for p in present)[0]
        row["int8_top1_std"] = mean_std(p["int8_top1"] for p in present)[1]
        out.append(row)
    return out


def _int8_md(g: dict[str, Any]) -> list[str]:
    """The INT8 deployment table (:func:`int8_rows`), when the group has quantized models."""
    if not g.get("int8"):
        return []
    suffixes = sorted({s for r in g["int8"] for s in _batch_suffixes(r)}, key=lambda s: int(s[2:]))
    lat = [f"latency_ms{s}" for s in ("", *suffixes)]
    head = ["Model", "Seeds", "FP32 acc", "INT8 acc", "Δ", "FP32 MB", "INT8 MB", "Size ratio"]
    for k in lat:
        b = k.rpartition("_b")[2] if "_b" in k else "1"
        head += [f"FP32 ms (b{b})", f"INT8 ms (b{b})", f"Speedup (b{b})"]
    body = []
    for r in g["int8"]:
        cells = [_name(r["model"]), str(r["n"]), _f(r.get("fp32_ort_top1_mean"))]
        cells += [
            _pm(r["int8_top1_mean"], r["int8_top1_std"]),
            _f(r.get("int8_top1_delta_mean"), sign=True),
        ]
        cells += [_f(_scaled(r.get(f"{p}_bytes_mean"), 1e6)) for p in ("fp32_ort", "int8")]
        cells += [_f(r.get("int8_size_ratio_mean"), 3)]
        for k in lat:
            speed = k.replace("latency_ms", "speedup")
            cells += [_f(r.get(f"fp32_ort_{k}_mean")), _f(r.get(f"int8_{k}_mean"))]
            cells += [_f(r.get(f"int8_{speed}_mean"), 3)]
        body.append(cells)
    return [
        "### INT8 deployment (ONNX Runtime, static QDQ; means over seeds)",
        "",
        f"{g['split'].capitalize()} top-1 (%) of each FP32 model exported to ONNX and of its "
        "INT8 model, both run by ONNX Runtime on the CPU; sizes are the model files; the "
        "latencies (ms) were timed interleaved in one process (the compute table's latency is "
        "PyTorch's). Speedup: FP32 over INT8.",
        "",
        *_md(head, body),
    ]


def _batch_suffixes(r: dict[str, Any]) -> list[str]:
    """``_b64`` etc.: the batch sizes beyond 1 an INT8 aggregate has latencies for."""
    return [
        k[len("int8_latency_ms") : -len("_mean")] for k in r if k.startswith("int8_latency_ms_b")
    ]


def _paper_md(g: dict[str, Any]) -> list[str]:
    """The "Beside the paper" section, with what differs from the paper's run; or one line
    saying why the paper's values are not shown (another dataset)."""
    p = g["paper"]
    if p is None:
        return []
    if not p["shown"]:
        return [f"The paper's values are not shown: {p['why']}.", ""]
    out = [f"### Beside the paper ({p['tables']}, {g['model']})", ""]
    if p["differs"]:
        out += ["**Not the paper's configuration.** This group differs from the paper's run in:"]
        out += ["", *(f"- {d}" for d in p["differs"]), ""]
    else:
        out += ["**The paper's configuration**: dataset, model, blocks removed and slicing.", ""]
    if p["unchecked"]:
        out += ["Cannot be checked:", "", *(f"- {d}" for d in p["unchecked"]), ""]
    out += [
        f"Paper: {p['paper_used']}. Ours: {p['ours_used']}. Δ = ours − paper. "
        f"ᵖ: the paper's population std (ddof=0); the next line recomputes its "
        f"sample std from its per-seed values. {p['mac_column']} is compared with "
        f"our {p['mac_key']}.",
        "",
    ]
    for t in paper_tables(p):
        out += _md(*t)
    return out


def _run_line(r: dict[str, Any]) -> str:
    marks = [f"**unverified** ({'; '.join(r['unverified'])})"] if r["unverified"] else []
    where = {"hydra": ".hydra/config.yaml", "fields": "summary fields"}.get(r["config_source"])
    marks += [f"grouped by {where}"] if where else []
    return f"- seed {r['seed']}: `{r['dir']}`" + (f": {', '.join(marks)}" if marks else "")


def _group_md(g: dict[str, Any]) -> list[str]:
    n_bad = sum(bool(r["unverified"]) for r in g["runs"])
    return [
        f"## {g['id']}: {g['label']}",
        "",
        f"{g['dataset']} · {g['num_classes']} classes · input "
        f"{g['input_size']}x{g['input_size']} · seeds "
        + ", ".join(str(s) for s in g["seeds"])
        + f" ({_n(len(g['runs']), 'run')}"
        + (f", **{n_bad} unverified**)" if n_bad else ")"),
        "",
        *_duplicate_seed_note(g["seeds"]),
        f"### Top-1 per seed (%, {g['split']} split)",
        "",
        *_md(*seed_table(g)),
        "### Compute and parameters (means over seeds)",
        "",
        *_md(*compute_table(g)),
        *_margins_md(g),
        *_int8_md(g),
        *_paper_md(g),
        "<details><summary>runs</summary>",
        "",
        *map(_run_line, g["runs"]),
        "",
        "</details>",
        "",
    ]


def to_markdown(
    groups: Sequence[dict[str, Any]], sources: Sequence[str], plots: dict[str, str]
) -> str:
    """The whole report.md: notes, provenance warnings, plots, then per group the
    per-seed/compute/paper tables."""
    n_runs = sum(len(g["runs"]) for g in groups)
    out = [
        "# m2mdc report",
        "",
        f"{_n(n_runs, 'run')} in {_n(len(groups), 'group')}, found below: "
        + ", ".join(f"`{s}`" for s in sources)
        + ".",
        "",
        *_notes(),
        "",
        *_provenance(groups),
    ]
    out += [f"![{k}]({v})" for k, v in plots.items()] + [""]
    for g in groups:
        out += _group_md(g)
    return "\n".join(out)


def write_report(
    groups: list[dict[str, Any]],
    sources: Sequence[str],
    out: Path,
    name: str,
    *,
    html: bool = False,
) -> None:
    """Write ``<name>.md/.csv/.json`` and the PNGs into ``out`` atomically (and, with
    ``html``, ``<name>.html``: :mod:`m2mdc.report_html`); print the tables."""
    from m2mdc import __version__
    from m2mdc.artifacts import atomic_write_bytes, atomic_write_json
    from m2mdc.report_plots import kd_curves_png, pareto_png
    from m2mdc.ui import console, table

    prefix = "" if name == "report" else f"{name}_"  # two reports in one directory keep apart
    plots, images = {}, {}
    for key, png in (
        ("pareto", pareto_png(groups, DISPLAY)),
        ("pareto_latency", pareto_png(groups, DISPLAY, cost="latency")),
        ("kd_curves", kd_curves_png(groups)),
    ):
        if png is not None:
            atomic_write_bytes(out / f"{prefix}{key}.png", png)
            plots[key] = f"{prefix}{key}.png"
            images[plots[key]] = png
    report_md = to_markdown(groups, sources, plots)
    atomic_write_bytes(out / f"{name}.md", report_md.encode())
    if html:
        from m2mdc.report_html import to_html

        atomic_write_bytes(out / f"{name}.html", to_html(report_md, images, groups).encode())
    atomic_write_bytes(out / f"{name}.csv", to_csv(groups).encode())
    atomic_write_json(
        out / f"{name}.json",
        {
            "format": 1,
            "generated_by": f"m2mdc report {__version__}",
            "sources": list(sources),
            "ignored_keys": list(IGNORED_KEYS),
            "std": STD_NOTE,
            "change_vs_teacher": CHANGE_NOTE,
            "plots": plots,
            "paper": PAPER,
            "groups": groups,
        },
    )
    for g in groups:
        console.print(table(f"{g['id']}: {g['label']} ({g['split']} top-1 %)", *seed_table(g)))
        console.print(table(f"{g['id']}: compute (means over seeds)", *compute_table(g)))
    console.print(f"change vs teacher: {CHANGE_NOTE}")
    files = [f"{name}.md", *([f"{name}.html"] if html else []), f"{name}.csv", f"{name}.json"]
    files += plots.values()
    console.print(f"report: {_n(len(groups), 'group')} -> {out}/ ({', '.join(files)})")
