"""compare=teacher_same_epochs: the teacher trained on for the students' post-pruning epochs."""

from __future__ import annotations

import torch
from torch import nn

from m2mdc.data.datasets import ImageData
from m2mdc.data.loader import Batches
from m2mdc.train.loop import ce_loss, fit
from tests.conftest import run_cli


class RecordingBatches(Batches):
    """Batches that remember which data epochs were drawn."""

    drawn: list[int]

    def epoch(self, epoch, start_batch=0):
        self.drawn.append(epoch)
        return super().epoch(epoch, start_batch=start_batch)


def test_epoch_offset_draws_later_data_epochs(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = ImageData(
        torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=g),
        torch.arange(32) % 2,
        ["a", "b"],
    )
    train = RecordingBatches(data, 8, 8, train=True, seed=3)
    train.drawn = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    fit(
        model,
        model.parameters(),
        train,
        Batches(data, 16, 8),
        epochs=2,
        lr=1e-2,
        grad_clip=1.0,
        loss_fn=ce_loss,
        state_path=tmp_path / "s.pt",
        fingerprint="fp",
        desc="t",
        epoch_offset=5,
    )
    assert train.drawn == [6, 7]


def test_compare_command_without_a_comparison_names_the_setting(tmp_path):
    proc = run_cli("compare", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "compare=teacher_same_epochs" in proc.stderr.strip().splitlines()[-1]


def test_unknown_comparison_is_refused_with_the_choices(tmp_path):
    proc = run_cli("run", "compare=[teacher_same_epochs,nope]", cwd=tmp_path)
    assert proc.returncode == 2
    assert "compare[1]='nope' is not valid; choose one of: teacher_same_epochs" in proc.stderr
    assert not (tmp_path / "outputs").exists()
