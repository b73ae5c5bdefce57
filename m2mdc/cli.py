"""``m2mdc <command> [overrides]``: argv[1] picks the command, the rest goes to Hydra unchanged.

Before Hydra runs, every job the arguments describe (each combination of a ``-m`` sweep) is
composed once and validated, so a typo, an unknown choice or an out-of-range value is one
line on stderr and exit code 2, and nothing is created on disk.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m2mdc import __version__
from m2mdc.errors import M2MError, error_line
from m2mdc.hydra_args import conf_dir, split_overrides

# command -> one-line description, in pipeline order; `report` is not a Hydra command. The
# {fields} are filled from the default configuration (see _usage).
COMMANDS: dict[str, str] = {
    "run": "run every stage in order (teacher .. slice, profile) and write summary.json",
    "finetune-teacher": "train the teacher ({teacher}), Adam, gradient clipping",
    "score": "rank blocks by label mutual information of pooled activations (probe set)",
    "prune": "remove the lowest-scoring free blocks, rebuild from the teacher, recalibrate BN",
    "distill": "staged KD repair of the pruned student against the teacher",
    "slice": "residual-safe channel slicing (planes, mid) with KD repair, {schedule} schedule",
    "compare": "fair baselines: compare=teacher_same_epochs and/or torch_pruning (peer)",
    "profile": "parameters, MACs and latency of every model in the run (or one checkpoint)",
    "export": "write a model as TorchScript / ONNX / torch.export and check output parity",
    "report": "tables and plots from finished runs: per-seed, compute, paper side by side",
}

_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion"}


def _default_facts() -> dict[str, str]:
    """What the help states about the defaults, read from the composed default config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from m2mdc.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("config")
    GlobalHydra.instance().clear()
    start = "ImageNet weights, new classifier" if cfg.model.pretrained else "from scratch"
    trained = "last third unfrozen" if cfg.teacher.unfreeze == "last_third" else "all layers"
    return {
        "teacher": f"{start}, {trained}",
        "schedule": str(cfg.slice.schedule),
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


def _schema_keys(cfg: object, path: str) -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.select(cfg, path) if path else cfg  # type: ignore[arg-type]
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def explain(exc: BaseException, base_cfg: object | None = None) -> str:
    """Turn a Hydra/OmegaConf composition error into one line naming the key and the choices."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(exc, M2MError):
        return str(exc)
    if isinstance(exc, MissingConfigException):
        text = str(exc)
        first = text.splitlines()[0]
        options = [ln.strip() for ln in text.splitlines() if ln.startswith("\t") and "=" not in ln]
        group = first.split("'")[-2] if "'" in first else first
        if "/" in group:
            g, _, v = group.rpartition("/")
            if not options:  # a list choice (logger=[csv,foo]): Hydra names no options
                options = sorted(p.stem for p in (conf_dir() / g).glob("*.yaml"))
            return f"{g}={v} is not a valid choice; choose one of: {', '.join(options)}"
        return first
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return str(exc).splitlines()[0]
    full_key = getattr(cause, "full_key", None) or ""
    if isinstance(cause, ConfigKeyError | ConfigAttributeError):
        from m2mdc.config import KDTermConfig

        if getattr(cause, "object_type", None) is KDTermConfig:  # inside a kd.terms list value
            fields = list(KDTermConfig.__dataclass_fields__)
            hint = difflib.get_close_matches(full_key.rpartition(".")[2], fields, n=1)
            where = "" if full_key.startswith("kd.terms") else " in a kd.terms entry"
            return (
                f"unknown setting '{full_key}'{where}"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; settings of a term: {', '.join(fields)}"
            )
        parent, _, leaf = full_key.rpartition(".")
        known = _schema_keys(base_cfg, parent) if base_cfg is not None else []
        hint = difflib.get_close_matches(leaf, known, n=1)
        msg = f"unknown setting '{full_key}'"
        if hint:
            msg += f" (did you mean '{f'{parent}.' if parent else ''}{hint[0]}'?)"
        if known:
            msg += f"; settings under '{parent or '<root>'}': {', '.join(known)}"
        return msg
    detail = str(cause).splitlines()[0]
    return f"{full_key}: {detail}" if full_key else detail


def check_writable(key: str, directory: str) -> None:
    """Fail early when ``directory`` cannot be created or written (nothing is left behind)."""
    import tempfile

    p = Path(directory).expanduser().absolute()
    ancestor = p
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor == p and not p.is_dir():
        raise M2MError(f"{key}={directory}: {p} exists and is not a directory")
    if not ancestor.is_dir():
        raise M2MError(f"{key}={directory}: cannot create it, {ancestor} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        raise M2MError(f"{key}={directory}: not writable ({exc.strerror or exc})") from None


def grammar_error(line: str, message: str) -> str:
    """One line for an override Hydra cannot parse; when its lexer stops at a character that
    quoting allows (non-ASCII letters, ``#``, ``~``, ...), the quoted form to type."""
    lines = message.splitlines() or [""]
    lexer = "LexerNoViableAltException: "
    if lines[0].startswith(lexer) and len(lines) > 1 and "^" in lines[1]:
        pos = lines[1].index("^") - len(lexer)
        key, eq, value = line.partition("=")
        char = line[pos] if 0 <= pos < len(line) else "?"
        if not eq or pos < len(key):
            return f"{line}: Hydra cannot read {char!r} in a setting name"
        msg = f"{line}: Hydra cannot read {char!r} in an unquoted value; quote the value"
        if "'" in value or '"' in value:
            return msg + ' (key="...", with \\" for a quote inside)'
        return msg + f""", e.g. '{key}="{value}"'"""
    detail = next((ln for ln in lines if not ln.startswith(("Error parsing", "See http"))), "")
    detail = re.sub(r" expecting \{.*\}$", "", detail or lines[0])
    return f"{line}: not a valid override ({detail})"


def _parse_overrides(overrides: list[str]) -> list[Any]:
    """Hydra's parse of each override; a grammar error names the override that caused it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed += parser.parse_overrides([line])
        except Exception as exc:  # OverrideParseException and the lexer's own errors
            raise M2MError(grammar_error(line, str(exc))) from None
    return parsed


def _compose_jobs(overrides: list[str], multirun: bool = False) -> None:
    """Compose and validate every job a (possibly sweeping) override list describes."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra

    from m2mdc.config import register_configs
    from m2mdc.structure import validate_all

    register_configs()
    parsed = _parse_overrides(overrides)
    # Hydra's own keys (hydra.run.dir, hydra/launcher=...) are validated by Hydra itself.
    user = [o for o in parsed if not o.get_key_element().lstrip("+~").startswith("hydra")]
    jobs = BasicSweeper.split_arguments(user, max_batch_size=None)[0] if user else [[]]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        base = compose("config")
        for job in jobs:
            try:
                cfg = compose("config", overrides=list(job))
                validate_all(cfg)
            except Exception as exc:
                raise M2MError(explain(exc, base)) from None
            check_writable("cache_dir", str(cfg.cache_dir))
            if cfg.dataset.name == "imagefolder":  # classes and splits, before anything runs
                from m2mdc.data.datasets import check_tree

                check_tree(cfg.dataset)
        own = [o.input_line for o in parsed if o not in user and o.input_line]
        try:
            hcfg = compose("config", overrides=[*jobs[0], *own], return_hydra_config=True).hydra
        except Exception as exc:
            raise M2MError(explain(exc, base)) from None
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        check_writable(key, str(hcfg.sweep.dir if multirun else hcfg.run.dir))
    GlobalHydra.instance().clear()


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
            hint = difflib.get_close_matches(command, COMMANDS, n=1)
            raise M2MError(
                f"unknown command '{command}'"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; commands: {', '.join(COMMANDS)}"
            )
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
            _compose_jobs(overrides, multirun=any(f in ("-m", "--multirun") for f in flags))
    except M2MError as exc:
        print(error_line(exc), file=sys.stderr)
        return exc.exit_code
    from m2mdc.pipeline import hydra_main

    return hydra_main(command, rest)


if __name__ == "__main__":
    raise SystemExit(main())
