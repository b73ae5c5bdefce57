"""Composing and validating configurations the way the command line describes them.

Shared by the command line (:mod:`m2mdc.cli`) and the Python API (:mod:`m2mdc.api`): an
override list is parsed with Hydra's grammar, each job it describes is composed from the config
tree and validated (schema ranges and choices, settings that name model parts, writable
directories, image trees), and every failure becomes one line (:class:`M2MError`) naming the
setting and its valid choices. Nothing here runs a stage or writes a byte.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m2mdc.errors import M2MError
from m2mdc.hydra_args import conf_dir

if TYPE_CHECKING:
    from omegaconf import DictConfig


@contextmanager
def config_tree() -> Iterator[None]:
    """Hydra initialised on m2mdc's config tree for the length of the block (``hydra.compose``
    works inside it). The Hydra state the caller had, e.g. inside its own Hydra app, is put
    back afterwards: nothing of m2mdc's is left behind."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from m2mdc.config import register_configs

    register_configs()
    saved = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            yield
    finally:
        GlobalHydra.instance().clear()  # the instance initialize_config_dir restored
        if saved is not None:
            GlobalHydra.instance().initialize(saved)


def unknown_command(command: str, commands: Iterable[str]) -> M2MError:
    """The error for a command that is not one of ``commands``."""
    choices = list(commands)
    hint = difflib.get_close_matches(command, choices, n=1)
    return M2MError(
        f"unknown command '{command}'"
        + (f" (did you mean '{hint[0]}'?)" if hint else "")
        + f"; commands: {', '.join(choices)}"
    )


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


def parse_overrides(overrides: list[str]) -> list[Any]:
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


def is_hydra_setting(override: Any) -> bool:
    """Whether a parsed override sets Hydra's own configuration (``hydra.run.dir=...``,
    ``hydra/launcher=...``) rather than m2mdc's."""
    return bool(override.get_key_element().lstrip("+~").startswith("hydra"))


def compose_job(job: Sequence[str], base: DictConfig) -> DictConfig:
    """One job's configuration, composed (inside :func:`config_tree`) and validated: schema,
    model parts, a writable ``cache_dir``, and an image tree's classes and splits. ``base`` is
    the default configuration, whose keys an unknown-setting error lists."""
    from hydra import compose

    from m2mdc.structure import validate_all

    try:
        cfg = compose("config", overrides=list(job))
        validate_all(cfg)
    except Exception as exc:
        raise M2MError(explain(exc, base)) from None
    check_writable("cache_dir", str(cfg.cache_dir))
    check_data(cfg)
    return cfg


def check_data(cfg: DictConfig) -> None:
    """An image tree's classes and splits (:func:`m2mdc.data.datasets.check_tree`), and the
    settings that need the training images in memory, before anything runs."""
    from m2mdc.config import IMAGE_TREES

    ds = cfg.dataset
    streamed = str(ds.in_memory).lower() == "false"
    if ds.name in IMAGE_TREES or streamed:
        from m2mdc.data.datasets import check_tree

        check_tree(ds)
    if streamed and float(cfg.kd.ig.prob) > 0:
        raise M2MError(
            f"kd.ig.prob={cfg.kd.ig.prob}: the IG overlay needs the training images in memory; "
            "set dataset.in_memory=auto or true, or kd.ig.prob=0"
        )


def compose_jobs(overrides: list[str], multirun: bool = False, command: str = "run") -> None:
    """Compose and validate every job a (possibly sweeping) command line describes, as
    ``command`` will run it, and check that its run (or sweep) directory can be written."""
    from hydra import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = parse_overrides(overrides)
    # Hydra's own keys (hydra.run.dir, hydra/launcher=...) are validated by Hydra itself.
    user = [o for o in parsed if not is_hydra_setting(o)]
    jobs = BasicSweeper.split_arguments(user, max_batch_size=None)[0] if user else [[]]
    with config_tree():
        base = compose("config")
        for job in jobs:
            compose_job([*job, f"command={command}"], base)
        own = [o.input_line for o in parsed if o not in user and o.input_line]
        try:
            hcfg = compose("config", overrides=[*jobs[0], *own], return_hydra_config=True).hydra
        except Exception as exc:
            raise M2MError(explain(exc, base)) from None
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        check_writable(key, str(hcfg.sweep.dir if multirun else hcfg.run.dir))
