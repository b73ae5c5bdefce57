"""Data-parallel training on the CPU with gloo and 2 processes: the training loop against a
single process, then the real command under torchrun (equivalence, and resume after kill -9)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from m2mdc.data.loader import Batches
from m2mdc.errors import M2MError
from m2mdc.train import dist
from m2mdc.train.loop import TrainSpec, check_shares, evaluate, fit, recalibrate_bn
from m2mdc.train.optim import Optim

N, BATCH = 40, 15  # global batches of 15, 15, 10: shares of 8 and 7 (uneven), then 5 and 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _train(out: Path, sync_bn: bool) -> dict:
    """fit (with an extra trained module in the loss), evaluate and both recalibrations."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    data = SimpleNamespace(
        images=torch.randint(0, 256, (N, 3, 8, 8), dtype=torch.uint8, generator=g),
        labels=torch.randint(0, 3, (N,), generator=g),
    )
    train, test = Batches(data, BATCH, 8, train=True, seed=3), Batches(data, BATCH, 8)
    model, extra = _net(), nn.Linear(3, 3)
    perf = {"sync_bn": sync_bn, "fused_adam": False}

    def loss_fn(m, x, y, epoch):
        logits = m(x)
        ce = F.cross_entropy(logits, y)
        aux = F.cross_entropy(extra(logits), y)
        return ce + 0.5 * aux, logits, {"ce": ce, "aux": aux}

    spec = TrainSpec(
        epochs=2, lr=0.05, grad_clip=0.0, state_path=out / f"state{dist.world()}.pt",
        fingerprint="t", desc="t", perf=perf, optim=Optim(name="sgd", weight_decay=0.0),
    )  # fmt: skip
    params = [*model.parameters(), *extra.parameters()]
    result = fit(model, params, train, test, spec, loss_fn=loss_fn, extra_state=extra)
    ev = evaluate(model, test)
    recal = recalibrate_bn(model, train, 2, perf=perf)
    bn = model[1]
    return {
        "history": result.history,
        "eval": ev,
        "recal": recal,
        "eval_recal": evaluate(model, test),
        "stats": torch.cat([bn.running_mean, bn.running_var]).tolist(),
        "params": torch.cat([p.detach().flatten() for p in params]).tolist(),
    }


def test_shards_of_a_batch_are_the_global_batch_split_evenly():
    """Each rank's share of every global batch: contiguous, sizes within one of each other,
    together exactly the one-process batch (the same order, flips and crops)."""
    g = torch.Generator().manual_seed(0)
    data = SimpleNamespace(
        images=torch.randint(0, 256, (N, 3, 8, 8), dtype=torch.uint8, generator=g),
        labels=torch.arange(N),
    )
    whole = Batches(data, BATCH, 8, train=True, seed=5, augment="cifar")
    for world in (2, 3):
        shards = [whole.shard(r, world).epoch(4) for r in range(world)]
        for x, y in whole.epoch(4):
            parts = [next(s) for s in shards]
            sizes = [len(p[1]) for p in parts]
            assert max(sizes) - min(sizes) <= 1
            assert torch.equal(torch.cat([p[1] for p in parts]), y)
            assert torch.allclose(torch.cat([p[0] for p in parts]), x, atol=1e-6)


def test_a_last_batch_smaller_than_the_world_is_refused_naming_the_settings():
    data = SimpleNamespace(
        images=torch.zeros(33, 3, 8, 8, dtype=torch.uint8), labels=torch.zeros(33)
    )
    check_shares(Batches(data, 32, 8), 1, "teacher")  # one process: any last batch
    check_shares(Batches(data, 16, 8), 1, "teacher")
    with pytest.raises(M2MError, match=r"teacher: the last batch .* holds 1 of 33 .* 2 ranks"):
        check_shares(Batches(data, 32, 8), 2, "teacher")
    check_shares(Batches(data, 31, 8), 2, "teacher")  # 31 + 2


def test_a_sweep_under_torchrun_is_refused_before_anything_runs(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    cmd = [
        sys.executable,
        "-m",
        "m2mdc",
        "run",
        "-m",
        "seed=1,2",
        f"hydra.sweep.dir={tmp_path / 'sw'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "m2mdc: error: -m under torchrun: torchrun runs one job on several ranks; run the jobs "
        "of a sweep one after another, or through the submitit launcher (hydra/launcher="
        "submitit_slurm with hydra.launcher.tasks_per_node)"
    ]
    assert not (tmp_path / "sw").exists()


def _rank(rank: int, port: int, out: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    dist.init()
    for sync_bn in (True, False):
        res = _train(out / f"sync{sync_bn}", sync_bn)
        (out / f"sync{sync_bn}" / f"rank{rank}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Both trainings of :func:`_train` (with and without SyncBatchNorm) on 2 gloo ranks."""
    out = tmp_path_factory.mktemp("ranks")
    for sync_bn in (True, False):
        (out / f"sync{sync_bn}").mkdir()
    mp.spawn(_rank, args=(_free_port(), out), nprocs=2)
    return out


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _close(a, b, rel: float, path: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], rel, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, rel, f"{path}[{i}]")
    else:
        assert a == pytest.approx(b, rel=rel, abs=rel), path


def test_two_ranks_train_evaluate_and_recalibrate_like_one_process(two_ranks, tmp_path):
    """With SyncBatchNorm, 2 gloo ranks over an uneven split of every global batch give one
    process's history, weights (the extra module's too), evaluation and recalibration."""
    single = _train(tmp_path, sync_bn=True)
    ranks = _ranks(two_ranks / "syncTrue")
    assert ranks[0] == ranks[1]  # every rank holds the same model and numbers
    _close(ranks[0], single, 1e-5)
    assert [r["epoch"] for r in single["history"]] == [1, 2]


def test_without_sync_bn_ranks_still_agree_on_recalibrated_statistics(two_ranks, tmp_path):
    """Per-rank BatchNorm statistics in training (not the single process's), but the ranks
    still end identical: rank 0's buffers reach everyone, its recalibration is broadcast."""
    ranks = _ranks(two_ranks / "syncFalse")
    assert ranks[0]["stats"] == ranks[1]["stats"]
    assert ranks[0]["eval_recal"] == ranks[1]["eval_recal"]
    single = _train(tmp_path, sync_bn=False)
    assert ranks[0]["history"][0]["train_loss"] != pytest.approx(
        single["history"][0]["train_loss"], rel=1e-5
    )  # shares of a batch normalise by their own statistics


# -- the real command under torchrun --------------------------------------------------------
TINY = [
    "model=resnet20",
    "dataset.image_size=16",
    "dataset.limit_train=64",  # 2 global batches of 32 per epoch
    "dataset.limit_test=32",
    "dataset.batch_size=32",
    "teacher.epochs=2",
    "kd.epochs=2",
    "slice.repair_epochs=1",
    "score.probe_samples=32",
    "prune.bn_recal_batches=1",
    "profile.latency_repeats=1",
    "profile.latency_warmup=0",
    "perf.sync_bn=true",
    "use_cache=false",
]
TRAINED = ("teacher", "distill", "slice")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def _torchrun(run_dir: Path, command: str = "run") -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "m2mdc", command, *TINY, f"cache_dir={run_dir.parent / 'cache'}",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def _metrics(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "metrics.json").read_text())


def _numbers(m: dict) -> dict:
    """A training stage's top1 and its epochs' (or repairs') losses and accuracies."""
    rows = m.get("epochs") or [r for s in m.get("steps", []) for r in s["repair"]]
    keys = ("train_loss", "train_top1", "test_loss", "test_top1")
    return {"top1": m["top1"], "rows": [{k: r[k] for k in keys} for r in rows]}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """`torchrun --nproc_per_node=2 -m m2mdc run` of a shrunk quickstart on gloo."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    proc = _ok(
        subprocess.run(_torchrun(run_dir), capture_output=True, text=True, env=_env(), timeout=600)
    )
    assert "torch threads: 1" in proc.stdout + proc.stderr  # 2 cores / 2 ranks on this machine
    return run_dir


@pytest.mark.slow
def test_torchrun_run_equals_one_process_with_the_same_global_batch(ddp_run, tmp_path):
    single = tmp_path / "single"
    cmd = [
        sys.executable,
        "-m",
        "m2mdc",
        "run",
        *TINY,
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={single}",
    ]
    _ok(subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600))
    for stage in TRAINED:  # summation order differs (all-reduces): float rounding, which the
        # training steps amplify to about 1e-3 of a loss; an argmax near a tie may flip
        ddp, one = _numbers(_metrics(ddp_run, stage)), _numbers(_metrics(single, stage))
        assert ddp["top1"] == pytest.approx(one["top1"], abs=100 / 32 + 1e-9), stage
        for r, q in zip(ddp["rows"], one["rows"], strict=True):
            for split, n in (("train", 64), ("test", 32)):
                assert r[f"{split}_loss"] == pytest.approx(q[f"{split}_loss"], rel=3e-3), stage
                assert r[f"{split}_top1"] == pytest.approx(q[f"{split}_top1"], abs=100 / n + 1e-9)
    for stage, key in (("prune", "keep_cfg"), ("slice", "widths")):  # the same decisions
        plans = [json.loads((d / stage / "plan.json").read_text())[key] for d in (ddp_run, single)]
        assert plans[0] == plans[1], stage
    # rank 0 alone wrote the run directory: one log, each stage logged once
    log = (ddp_run / "m2mdc.log").read_text()
    assert log.count("[teacher] running") == 1 and log.count("[slice] done") == 1
    assert not list(ddp_run.rglob("state.pt"))


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of rank ``rank`` among the children of the torchrun process ``launcher``."""
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
    return None


@pytest.mark.slow
def test_kill_9_of_one_rank_then_rerun_resumes_to_the_same_metrics(ddp_run, tmp_path):
    """The teacher's training (the run's first stage, the same settings) killed after its
    first epoch; the same command again continues from rank 0's state to the teacher of the
    uninterrupted run."""
    run_dir, cmd = tmp_path / "run", _torchrun(tmp_path / "run", "finetune-teacher")
    launcher = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    state = run_dir / "teacher" / "state.pt"
    deadline = time.monotonic() + 300
    while not state.is_file() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = _rank_pid(launcher.pid, 1)
    assert state.is_file() and victim is not None, "the teacher's first epoch never finished"
    os.kill(victim, signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0  # torchrun stops the other rank and fails
    assert not (run_dir / "teacher" / "done.json").is_file()

    _ok(subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600))
    teacher = _metrics(run_dir, "teacher")
    assert teacher["resumed_from_epoch"] == 1
    _close(_numbers(teacher), _numbers(_metrics(ddp_run, "teacher")), 1e-6)
