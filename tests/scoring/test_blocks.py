"""Block scorers, score_blocks, rank and collect_pooled on tiny hand-made models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from m2mdc.errors import M2MError
from m2mdc.scoring.activations import collect_pooled
from m2mdc.scoring.blocks import BLOCK_SCORERS, last_batchnorm, rank, score_blocks


class Emit(nn.Module):
    """A "block" whose [B, C, 2, 2] output is a fixed function of the first input feature
    (the label code) or of the second (pure noise)."""

    def __init__(self, source: int, channels: int = 4) -> None:
        super().__init__()
        self.source = source
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, self.source].reshape(-1, 1, 1, 1)
        scale = torch.arange(1, self.channels + 1, dtype=x.dtype).reshape(1, -1, 1, 1)
        return (v * scale).expand(-1, -1, 2, 2) + 0.0


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.informative = Emit(0)
        self.noise = Emit(1)
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.informative(x).mean(dim=(1, 2, 3))
        b = self.noise(x).mean(dim=(1, 2, 3))
        return self.head(torch.stack([a, b], dim=1))


def _batches(n: int, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.stack([y.float() + 0.01 * torch.rand(n, generator=g), torch.rand(n, generator=g)], 1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_mi_scores_label_determined_block_above_noise_block() -> None:
    model = TwoBlocks()
    blocks = {"informative": model.informative, "noise": model.noise}
    scores = score_blocks(model, blocks, "mi", _batches(600, 64), probe_samples=500, bins=10)
    assert list(scores) == ["informative", "noise"]
    assert scores["informative"] > 0.8 > 0.1 > scores["noise"]  # ~log 3 vs ~0 nats
    assert rank(scores) == {"informative": 1, "noise": 2}


def test_collect_pooled_keeps_max_samples_in_order_and_removes_hooks() -> None:
    model = TwoBlocks().train()
    batches = _batches(100, 16)
    drawn: list[int] = []

    def source():
        for i, b in enumerate(batches):
            drawn.append(i)
            yield b

    seen: list[int] = []
    pooled, labels = collect_pooled(
        model, {"a": model.informative}, source(), 40, progress=lambda d, t: seen.append(d)
    )
    x = torch.cat([b[0] for b in batches])[:40]
    y = torch.cat([b[1] for b in batches])[:40]
    assert pooled["a"].shape == (40, 4) and pooled["a"].dtype == torch.float32
    torch.testing.assert_close(pooled["a"], x[:, :1] * torch.arange(1.0, 5.0))
    assert torch.equal(labels, y)
    assert drawn == [0, 1, 2]  # stopped after the truncated third batch
    assert seen == [16, 32, 40]
    assert model.training  # mode restored
    assert not model.informative._forward_hooks


def test_collect_pooled_removes_hooks_on_error_and_short_probe() -> None:
    model = TwoBlocks()

    def bad():
        yield _batches(8, 8)[0]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        collect_pooled(model, {"a": model.informative}, bad(), 100)
    assert not model.informative._forward_hooks
    pooled, labels = collect_pooled(model, {"a": model.informative}, _batches(10, 4), 100)
    assert pooled["a"].shape == (10, 4) and labels.shape == (10,)


def test_collect_pooled_rejects_module_that_never_runs() -> None:
    model = TwoBlocks()
    with pytest.raises(RuntimeError, match="exactly once"):
        collect_pooled(model, {"x": nn.Conv2d(1, 1, 1)}, _batches(8, 8), 8)


def _block(width: int, w: float, gammas: list[float]) -> nn.Sequential:
    blk = nn.Sequential(nn.Conv2d(width, width, 3, bias=False), nn.BatchNorm2d(width))
    nn.init.constant_(blk[0].weight, w)
    blk[1].weight.data = torch.tensor(gammas)
    return blk


def test_l1_is_mean_abs_weight_independent_of_width() -> None:
    narrow, wide = _block(2, -0.5, [1.0, 1.0]), _block(8, 0.5, [1.0] * 8)
    scorer = BLOCK_SCORERS.get("l1")
    assert scorer(narrow, None, None, name="n") == pytest.approx(0.5)
    assert scorer(wide, None, None, name="w") == pytest.approx(0.5)


def test_bn_gamma_uses_last_main_branch_bn() -> None:
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn1 = nn.BatchNorm2d(2)
            self.bn2 = nn.BatchNorm2d(2)
            self.downsample = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))

    blk = Res()
    blk.bn2.weight.data = torch.tensor([-2.0, 4.0])
    blk.downsample[1].weight.data = torch.tensor([100.0, 100.0])
    assert last_batchnorm(blk) is blk.bn2
    assert BLOCK_SCORERS.get("bn_gamma")(blk, None, None, name="b") == pytest.approx(3.0)


def test_random_scores_are_seeded_and_order_independent() -> None:
    model = TwoBlocks()
    blocks = {"a": model.informative, "b": model.noise}
    s1 = score_blocks(model, blocks, "random", None, seed=3)
    s2 = score_blocks(model, dict(reversed(list(blocks.items()))), "random", None, seed=3)
    s3 = score_blocks(model, blocks, "random", None, seed=4)
    assert s1 == s2 and s1 != s3
    assert all(0 <= v < 1 for v in s1.values())


def test_score_blocks_collects_activations_only_when_needed() -> None:
    model = TwoBlocks()

    def boom():
        raise AssertionError("probe must not be iterated")
        yield

    blocks = {"a": _block(2, 0.1, [1.0, 2.0])}
    assert score_blocks(model, blocks, "bn_gamma", boom(), seed=0)["a"] == pytest.approx(1.5)
    with pytest.raises(M2MError, match=r"score\.method.*valid choices"):
        score_blocks(model, blocks, "nope", None)


def test_rank_descending_with_name_tiebreak_and_nan_last() -> None:
    scores = {"b": 1.0, "a": 1.0, "c": 2.0, "d": float("nan"), "e": -1.0}
    assert rank(scores) == {"c": 1, "a": 2, "b": 3, "e": 4, "d": 5}
