"""``m2mdc <command> [overrides]``: argv[1] picks the command, the rest goes to Hydra unchanged.

Before Hydra runs, every job the arguments describe (each combination of a ``-m`` sweep) is
composed once and validated, so a typo, an unknown choice or an out-of-range value is one
line on stderr and exit code 2, and nothing is created on disk.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from m2mdc import __version__
from m2mdc.composition import compose_jobs, config_tree, unknown_command
from m2mdc.errors import M2MError, error_line
from m2mdc.hydra_args import conf_dir, split_overrides  # noqa: F401  (conf_dir: re-exported)

# command -> one-line description, in pipeline order; `report` is not a Hydra command. The
# {fields} are filled from the default configuration (see _usage).
COMMANDS: dict[str, str] = {
    "run": "run every stage in order (teacher .. profile; quantize.enabled) and write summary.json",
    "finetune-teacher": "train the teacher ({teacher}), {optim}, gradient clipping",
    "score": "rank blocks by label mutual information of pooled activations (probe set)",
    "prune": "remove the lowest-scoring free blocks, rebuild from the teacher, recalibrate BN",
    "distill": "staged KD repair of the pruned student against the teacher",
    "slice": "residual-safe channel slicing (planes, mid) with KD repair, {schedule} schedule",
    "compare": "fair baselines: compare=teacher_same_epochs and/or torch_pruning (peer)",
    "profile": "parameters, MACs and latency of every model in the run (or one checkpoint)",
    "export": "write a model as TorchScript / ONNX / torch.export and check output parity",
    "quantize": "INT8 (ONNX Runtime, QDQ) of teacher and compressed models: top1, size, latency",
    "report": "tables and plots from finished runs: per-seed, compute, paper side by side",
}

_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion"}


def _default_facts() -> dict[str, str]:
    """What the help states about the defaults, read from the composed default config."""
    from hydra import compose

    with config_tree():
        cfg = compose("config")
    start = "ImageNet weights, new classifier" if cfg.model.pretrained else "from scratch"
    trained = "last third unfrozen" if cfg.teacher.unfreeze == "last_third" else "all layers"
    return {
        "teacher": f"{start}, {trained}",
        "schedule": str(cfg.slice.schedule),
        "optim": "Adam" if cfg.teacher.optim == "adam" else "SGD",
        "experiment": str(cfg.experiment_name),
        "dataset": str(cfg.dataset.name),
    }


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    facts = _default_facts()
    lines = [
        f"m2mdc {__version__}: MI-guided block pruning, residual-safe slicing and staged KD",
        "",
        "usage: m2mdc <command> [key=value ...] [hydra flags: -m, --cfg job, --help, ...]",
        "",
        "commands:",
        *(f"  {c.ljust(width)}  {d.format(**facts)}" for c, d in COMMANDS.items()),
        "",
        "examples:",
        f"  m2mdc run                                   # the {facts['experiment']} experiment "
        f"on {facts['dataset']}",
        "  m2mdc run model=resnet18 prune.ratio=0.4",
        "  m2mdc run -m seed=42,99,123 prune.ratio=0.1,0.25",
        "  m2mdc profile model=resnet18 dataset=fake profile.input_size=32",
        "  m2mdc <command> --help                      # the composed config and its groups",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        print(f"m2mdc {__version__}")
        return 0
    command, rest = args[0], args[1:]
    try:
        if command not in COMMANDS:
            raise unknown_command(command, COMMANDS)
        if command == "report":  # argparse, not Hydra: its M2MErrors are printed below
            from m2mdc.report import main as report_main

            return report_main(rest)
        overrides, flags = split_overrides(rest)
        modes = [f for f in flags if f in ("-m", "--multirun", "--cfg", "-c", "--info", "-i")]
        if len(modes) > 1:  # Hydra would raise a ValueError with a traceback
            raise M2MError(
                f"{' and '.join(modes)} cannot be combined: -m runs a sweep, --cfg and --info "
                "print one job's configuration; drop -m to print the first job's"
            )
        if not any(f in _INFO_FLAGS for f in flags):
            multirun = any(f in ("-m", "--multirun") for f in flags)
            compose_jobs(overrides, multirun=multirun, command=command)
            rest = _data_parallel(rest, multirun)
    except M2MError as exc:
        print(error_line(exc), file=sys.stderr)
        return exc.exit_code
    from m2mdc.pipeline import hydra_main

    return hydra_main(command, rest)


# hydra.run.dir of conf/config.yaml, with {now} for the time
RUN_DIR = "outputs/runs/${experiment_name}/{now}"


def _data_parallel(args: list[str], multirun: bool) -> list[str]:
    """Under torchrun: join the process group, and one run directory for every rank."""
    from m2mdc.train import dist

    if not dist.launched():
        return args
    if multirun:
        raise M2MError(
            "-m under torchrun: torchrun runs one job on several ranks; run the jobs of a "
            "sweep one after another, or through the submitit launcher (hydra/launcher="
            "submitit_slurm with hydra.launcher.tasks_per_node)"
        )
    dist.init()
    return dist.shared_run_dir(args, RUN_DIR)


if __name__ == "__main__":
    raise SystemExit(main())
