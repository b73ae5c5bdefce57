"""The command line as Hydra sees it: where the config tree is, and which arguments are
overrides and which are Hydra's own flags. Below both the CLI and the pipeline (and the API),
which each need them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# Hydra flags that take a value (so the value is not mistaken for an override).
_FLAGS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--shell-completion",
    "-sc",
}


def conf_dir() -> Path:
    """The config tree: conf/ beside the package in a checkout, m2mdc.conf when installed."""
    import importlib.resources

    return Path(str(importlib.resources.files("m2mdc.conf")))


def split_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from Hydra's own flags (and their values)."""
    overrides: list[str] = []
    flags: list[str] = []
    it = iter(args)
    for a in it:
        if a.startswith("-"):
            flags.append(a)
            if a in _FLAGS_WITH_VALUE:
                nxt = next(it, None)
                if nxt is not None:
                    flags.append(nxt)
        else:
            overrides.append(a)
    return overrides, flags
