"""Optional extras (``pip install 'm2mdc[<extra>]'``): what a feature needs installed,
looked up (not imported) so that a command refuses before anything runs.

Example:
    >>> require("m2mdc quantize", "deploy")  # without onnxruntime
    Traceback (most recent call last):
    m2mdc.errors.M2MError: m2mdc quantize needs onnxruntime: pip install 'm2mdc[deploy]'
"""

from __future__ import annotations

import importlib.util

from m2mdc.errors import M2MError

# extra -> the importable packages it installs (pyproject.toml's optional dependencies)
EXTRAS: dict[str, tuple[str, ...]] = {
    # INT8 deployment: the ONNX exporter (onnxscript), onnx and ONNX Runtime
    "deploy": ("onnxruntime", "onnx", "onnxscript"),
}


def missing(extra: str) -> list[str]:
    """The packages of ``extra`` that cannot be imported."""
    return [p for p in EXTRAS[extra] if importlib.util.find_spec(p) is None]


def require(what: str, extra: str) -> None:
    """Refuse ``what`` in one line naming the missing packages and the install command."""
    absent = missing(extra)
    if absent:
        raise M2MError(f"{what} needs {', '.join(absent)}: pip install 'm2mdc[{extra}]'")
