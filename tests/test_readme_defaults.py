"""The README's configuration reference states what the config composes.

Every row of the table names keys (``group.key``, then bare keys of the same group, or
``group=`` for a group choice) and, in the default column, one command-line value per key
(or one for all of them). Each value is parsed with Hydra's override grammar, as a user would
type it, and compared with what a bare ``m2mdc run`` composes; so the test fails when either
the README or the config drifts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

README = Path(__file__).resolve().parents[1] / "README.md"
TICKED = re.compile(r"`([^`]*)`")


def reference_rows() -> list[tuple[str, str]]:
    """(keys cell, default cell) of every row of the configuration reference table."""
    text = README.read_text()
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            rows.append((cells[0], cells[1]))
    return rows


def row_keys(cell: str) -> list[str]:
    """``teacher.epochs``, ``lr`` -> teacher.epochs, teacher.lr; ``model=`` stays a choice."""
    keys, group = [], ""
    for token in TICKED.findall(cell):
        if "." in token:
            group = token.rsplit(".", 1)[0]
            keys.append(token)
        else:
            keys.append(f"{group}.{token}" if group and not token.endswith("=") else token)
    return keys


def matches(expected: Any, actual: Any) -> bool:
    """Equal values (bools only equal bools); a mapping may state a subset of the keys."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and matches(v, actual[k]) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected is actual
    return bool(expected == actual)


@pytest.fixture(scope="module")
def composed():
    """(config, group choices) of a bare `m2mdc run`, as `m2mdc run --cfg job` shows it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from m2mdc.config import register_configs
    from m2mdc.hydra_args import conf_dir

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config"), resolve=True)
        choices = dict(compose("config", return_hydra_config=True).hydra.runtime.choices)
    GlobalHydra.instance().clear()
    return cfg, choices


def test_the_table_is_found_and_every_row_states_a_value_per_key():
    rows = reference_rows()
    assert len(rows) > 40
    for keys_cell, default_cell in rows:
        keys, values = row_keys(keys_cell), TICKED.findall(default_cell)
        assert keys, keys_cell
        assert len(values) in (1, len(keys)), f"{keys_cell}: one default per key: {default_cell}"


@pytest.mark.parametrize(("keys_cell", "default_cell"), reference_rows())
def test_documented_default_is_what_run_composes(composed, keys_cell, default_cell):
    cfg, choices = composed
    parser = OverridesParser.create()
    keys, values = row_keys(keys_cell), TICKED.findall(default_cell)
    for key, value in zip(keys, values * len(keys) if len(values) == 1 else values, strict=True):
        expected = parser.parse_override(f"x={value}").value()
        if key.endswith("="):
            actual = choices[key[:-1]]
        else:
            actual = OmegaConf.select(OmegaConf.create(cfg), key, default="<missing>")
            actual = OmegaConf.to_container(actual) if OmegaConf.is_config(actual) else actual
        assert matches(expected, actual), f"README says {key} = {value}; the config has {actual!r}"
