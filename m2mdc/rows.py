"""The models of a run, one row each in ``summary.json``, the profile and every report.

One table names them all: the row name, the stage directory holding its ``model.pt``, its
display name, its kind (the teacher, a student of the method, or a comparison) and whether it
is a compressed model (the students and the Torch-Pruning peers). The quantize stage deploys
the compressed models and, as their reference, the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    name: str  # the row name in summary.json / profile / report
    stage: str  # the stage directory holding model.pt and metrics.json
    display: str  # the name in report tables and plots
    kind: str  # teacher | student | comparison
    compressed: bool = False  # a compressed model: a student, or a Torch-Pruning peer


ROWS: tuple[Row, ...] = (
    Row("teacher", "teacher", "Teacher", "teacher"),
    Row("block_pruned", "prune", "Block-pruned", "student", compressed=True),
    Row("block_kd", "distill", "Block-KD", "student", compressed=True),
    Row("inner_slice", "slice", "Inner-slice", "student", compressed=True),
    Row("teacher_same_epochs", "teacher_same_epochs", "Teacher (same epochs)", "comparison"),
    # the Torch-Pruning peers (peer.match): at the inner_slice student's MACs, and at its latency
    Row(
        "peer_torch_pruning",
        "peer_torch_pruning",
        "Torch-Pruning peer (equal MACs)",
        "comparison",
        compressed=True,
    ),
    Row(
        "peer_torch_pruning_latency",
        "peer_torch_pruning_latency",
        "Torch-Pruning peer (equal latency)",
        "comparison",
        compressed=True,
    ),
)
BY_NAME = {r.name: r for r in ROWS}
# row name -> stage directory, in pipeline order
MODEL_ROWS: tuple[tuple[str, str], ...] = tuple((r.name, r.stage) for r in ROWS)
STUDENT_ROWS: tuple[str, ...] = tuple(r.name for r in ROWS if r.kind == "student")
COMPRESSED_ROWS: tuple[str, ...] = tuple(r.name for r in ROWS if r.compressed)
# what the quantize stage deploys: the compressed models and the teacher they are measured against
QUANTIZED_ROWS: tuple[str, ...] = tuple(r.name for r in ROWS if r.compressed or r.kind == "teacher")
DISPLAY: dict[str, str] = {r.name: r.display for r in ROWS}


def finished_models(run_dir: Path) -> dict[str, str]:
    """Row name -> stage for every finished stage of a run that saved a model, in pipeline
    order. ``block_pruned`` (before KD) is listed only when no distilled student exists, since
    both have the same architecture."""
    found = {
        row: st
        for row, st in MODEL_ROWS
        if (run_dir / st / "model.pt").is_file() and (run_dir / st / "done.json").is_file()
    }
    if "block_kd" in found:
        found.pop("block_pruned", None)
    return found
