"""Data-parallel training: one process per device under ``torchrun`` (or the tasks of a SLURM
job started by submitit), with PyTorch's :class:`~torch.nn.parallel.DistributedDataParallel`.

Every rank runs the same command on the same run directory. The training stages run on every
rank: :func:`m2mdc.train.loop.fit` gives each rank its share of every global batch (the same
seeded order as a single process, :meth:`m2mdc.data.loader.Batches.shard`), averages the
gradients through DDP, and evaluates each rank's share of the evaluation batches with the sums
all-reduced. Only rank 0 writes (checkpoints, metrics, states, logs); the other stages (score,
prune, profile, ...) run on rank 0 alone (:func:`solo`) while the others wait at a barrier.

In one process (no ``WORLD_SIZE`` above 1 in the environment) every function here is a no-op
and :func:`active` is False.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from m2mdc.errors import M2MError

_solo = False  # inside solo(): rank 0 runs alone, collectives are off

WAIT = timedelta(hours=12)
"""How long a collective may wait: the other ranks wait for the stages rank 0 runs alone (block
scoring, profiling) at one, longer than PyTorch's default timeout (10 minutes on NCCL). A rank
that dies is noticed by torchrun, which stops the others, not by this timeout."""


def _from_submitit() -> None:
    """The tasks of a SLURM job launched by submitit (``hydra.launcher.tasks_per_node``): the
    env:// variables from SLURM's, as submitit's own helper sets them."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def launched() -> bool:
    """Whether this process is one of several ranks (torchrun, or submitit's SLURM tasks)."""
    _from_submitit()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_world_size() -> int:
    """The ranks on this machine (they share its cores)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched() else 1


def init() -> None:
    """Join the process group of a launched run: gloo for CPU tensors, and nccl for CUDA
    tensors where there is CUDA (each rank on the device of its local rank). A no-op in one
    process or once joined."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise M2MError("several ranks were started but this torch has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=WAIT)
    else:
        dist.init_process_group("gloo", timeout=WAIT)


def shared_run_dir(overrides: list[str], default: str) -> list[str]:
    """``overrides`` with a ``hydra.run.dir`` every rank shares: Hydra's default names the
    directory by each process's own clock, so rank 0's time is given to all (``default``: the
    directory pattern with ``{now}`` for that time). Unchanged when one is given."""
    if not active() or any(o.startswith("hydra.run.dir=") for o in overrides):
        return overrides
    from datetime import datetime

    now = broadcast_object(datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    return [*overrides, "hydra.run.dir=" + default.replace("{now}", now)]


def active() -> bool:
    """Whether collectives run: several ranks joined, and not inside :func:`solo`."""
    return not _solo and dist.is_available() and dist.is_initialized() and world() > 1


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def solo() -> Iterator[None]:
    """Rank 0 runs the block alone (its evaluations and recalibrations do not shard or
    all-reduce); the caller keeps the other ranks at a :func:`barrier`."""
    global _solo
    old, _solo = _solo, True
    try:
        yield
    finally:
        _solo = old


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (in place; ``t`` itself in one process)."""
    if active():
        dist.all_reduce(t)
    return t


def agree(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (a stop signal that reached one)."""
    if not active():
        return flag
    return bool(all_sum(torch.tensor(float(flag), device=device)) > 0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_state(module: nn.Module) -> None:
    """Rank 0's parameters and buffers into every rank's ``module`` (in place)."""
    if not active():
        return
    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor):
            dist.broadcast(t, src=0)


def wrap(module: nn.Module) -> nn.Module:
    """``module`` under DistributedDataParallel (``module`` itself in one process).

    ``find_unused_parameters``: a loss may leave a trainable module out for some epochs (a KD
    term whose weight is 0 and is then not computed)."""
    if not active():
        return module
    cuda = next((p.device.type == "cuda" for p in module.parameters()), False)
    ids = [torch.cuda.current_device()] if cuda else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


class _SyncBN(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm that also synchronises on the CPU (gloo), where PyTorch's kernel refuses
    to: there the global batch mean and variance come from differentiable all-reduces of the
    per-rank sums (:func:`torch.distributed.nn.functional.all_reduce`), so the backward pass
    is synchronised too. On CUDA, PyTorch's own kernel (:class:`torch.nn.SyncBatchNorm`'s
    forward; not its class, which DDP refuses on the CPU)."""

    process_group: Any = None
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()) or input.device.type == "cuda":
            return nn.SyncBatchNorm.forward(self, input)  # type: ignore[arg-type]
        from torch.distributed.nn.functional import all_reduce

        dims = [d for d in range(input.dim()) if d != 1]
        count = all_sum(torch.tensor(float(input.numel() // input.shape[1])))
        mean = all_reduce(input.sum(dims)) / count
        shape = [1, -1] + [1] * (input.dim() - 2)
        centred = input - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None:
            self._update_running(mean.detach(), var.detach(), float(count))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        """The running statistics as :func:`torch.nn.functional.batch_norm` keeps them: the
        unbiased variance, momentum or (``momentum=None``) the cumulative average."""
        assert self.num_batches_tracked is not None
        assert self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked.add_(1)
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - m).add_(m * mean)
        self.running_var.mul_(1 - m).add_(m * var * n / max(n - 1, 1))


@contextmanager
def sync_batchnorm(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """``model`` with its BatchNorm layers synchronised across the ranks for the block (the
    batch statistics of the global batch), the same parameter and buffer tensors; the original
    layers are put back afterwards, so surgery and checkpoints see plain BatchNorm."""
    if not (enabled and active()):
        yield model
        return
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
                child, _SyncBN
            ):
                sync = _SyncBN(child.num_features, child.eps, child.momentum, child.affine)
                sync._parameters, sync._buffers = child._parameters, child._buffers
                sync.track_running_stats = child.track_running_stats
                sync.train(child.training)
                setattr(parent, name, sync)
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            sync = getattr(parent, name)
            child._parameters, child._buffers = sync._parameters, sync._buffers
            child.train(sync.training)
            setattr(parent, name, child)
