#!/usr/bin/env python
"""m2mdc performance benchmarks; every figure is a ratio of two things timed side by side.

    python scripts/bench.py [--quick] --out bench.json

Each figure compares our implementation with a reference measured in the same process (the
KD-loop, resize and latency figures interleave the two sides repetition by repetition), so a
change in machine load during the run hits both sides and mostly cancels in the ratio. The
figures (top-level keys of the JSON) and their methods are described in BENCHMARKS.md; the
raw timings, the machine and the targets are written alongside them.

``--quick`` (the default of nothing: the full run just repeats every measurement more often)
finishes in a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from m2mdc.arch import SlicePlan, get_adapter  # noqa: E402
from m2mdc.arch.zoo import create_model  # noqa: E402
from m2mdc.data.datasets import ImageData, load_split  # noqa: E402
from m2mdc.data.loader import IMAGENET_MEAN, IMAGENET_STD, Batches, preprocess  # noqa: E402
from m2mdc.distill.losses import Term  # noqa: E402
from m2mdc.distill.repair import kd_repair  # noqa: E402
from m2mdc.profiling import count_macs, measure_latencies  # noqa: E402
from m2mdc.scoring.activations import collect_pooled  # noqa: E402
from m2mdc.scoring.mi import binned_mi  # noqa: E402

# the quickstart's pruned student (README: layer1.0 and layer2.1 removed, 2 of 5 free blocks)
QUICKSTART_KEEP = {"layer1": [1], "layer2": [0], "layer3": [0, 1], "layer4": [0, 1]}
TARGETS = {
    "mi_speedup_vs_sklearn": (">=", 20.0),
    "mi_over_forward": ("<=", 0.10),
    "kd_throughput_vs_bare": (">=", 0.95),
    "resize_speedup": (">=", 3.0),
    "latency_speedup_over_mac_ratio_block_kd": (">=", 0.8),
    "int8_latency_speedup_inner_slice": (">=", 1.0),
    "parallel_sweep_speedup": (">=", 1.1),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Seconds of each function, ``reps`` times, alternating the order every repetition."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else reversed(names):
            out[n].append(timed(fns[n]))
    return out


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def machine() -> dict[str, Any]:
    import torchvision

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.is_available(),
        "load_average_at_start": list(os.getloadavg()),
    }


# ---- 1. MI: ours vs a per-channel sklearn loop; MI vs the probe forward ---------------------
def synthetic_images(n: int, side: int, classes: int = 10, seed: int = 0) -> ImageData:
    """uint8 images whose brightness and colour depend weakly on the class (so the labels
    carry some information about the activations), plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    base = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.int16)
    shift = (labels.view(n, 1, 1, 1) * 7 - 35) * torch.tensor([1, -1, 1]).view(1, 3, 1, 1)
    img = (base // 2 + 64 + shift).clamp(0, 255).to(torch.uint8)
    return ImageData(img, labels, [str(i) for i in range(classes)])


def sklearn_block_mi(z: np.ndarray, y: np.ndarray, bins: int) -> np.ndarray:
    """The reference: per channel, quantile edges, binning, sklearn's mutual_info_score."""
    from sklearn.metrics import mutual_info_score

    q = np.arange(1, bins) / bins
    out = np.empty(z.shape[1])
    for c in range(z.shape[1]):
        col = z[:, c].astype(np.float64)
        edges = np.quantile(col, q)
        codes = np.searchsorted(edges, col, side="left")  # edges strictly below: (e_j, e_j+1]
        out[c] = mutual_info_score(y, codes)
    return out


def bench_mi(quick: bool) -> dict[str, Any]:
    n, bins = 5000, 10
    torch.manual_seed(0)
    model = create_model("resnet18", 10).eval()
    adapter = get_adapter(model)
    modules = {b.name: adapter.block_module(model, b.name) for b in adapter.blocks(model)}
    data = synthetic_images(n, 32)
    probe = Batches(data, 64, 32, order=torch.arange(n))  # the score stage's probe batches
    fwd_times, pooled, labels = [], {}, torch.empty(0)
    for _ in range(1 if quick else 2):
        t0 = time.perf_counter()
        pooled, labels = collect_pooled(model, modules, probe.epoch(0), n)
        fwd_times.append(time.perf_counter() - t0)
    log(f"mi: probe forward {med(fwd_times):.2f}s for {n} samples")

    def ours() -> dict[str, torch.Tensor]:
        return {k: binned_mi(z, labels, bins=bins, num_classes=10) for k, z in pooled.items()}

    zs = {k: v.numpy() for k, v in pooled.items()}
    y = labels.numpy()

    def reference() -> dict[str, np.ndarray]:
        return {k: sklearn_block_mi(z, y, bins) for k, z in zs.items()}

    ours()  # warm-up (first call allocates)
    t = interleaved({"ours": ours, "sklearn": reference}, 3 if quick else 5)
    ours_mi, ref_mi = ours(), reference()
    max_diff = max(float(np.abs(ours_mi[k].numpy() - ref_mi[k]).max()) for k in zs)
    channels = sum(z.shape[1] for z in zs.values())
    log(f"mi: ours {med(t['ours']) * 1e3:.1f} ms, sklearn loop {med(t['sklearn']):.2f}s")
    return {
        "mi_speedup_vs_sklearn": med(t["sklearn"]) / med(t["ours"]),
        "mi_over_forward": med(t["ours"]) / med(fwd_times),
        "raw": {
            "activations": "real: pooled block outputs of an untrained ResNet-18 (10 classes) "
            f"over {n} synthetic class-dependent 32x32 uint8 images",
            "samples": n,
            "blocks": len(zs),
            "channels": channels,
            "bins": bins,
            "ours_s": t["ours"],
            "sklearn_loop_s": t["sklearn"],
            "probe_forward_s": fwd_times,
            "max_abs_mi_difference_nats": max_diff,
        },
    }


# ---- 2. KD epoch: kd_repair vs a bare hand-written loop ---------------------------------------
def bare_resnet_features(m: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    f = torch.flatten(m.avgpool(x), 1)
    return f, m.fc(f)


def bench_kd(quick: bool, tmp: Path) -> dict[str, Any]:
    # the quickstart's own distill epoch: every digits training image, the whole test split
    # (a smaller epoch would weigh the fixed per-epoch costs, setup, evaluation and the
    # resumable-state save, more than any real run does)
    bs, lr, clip, alpha, beta = 64, 5e-4, 1.0, 0.1, 0.1
    train_data, test_data = load_split_digits("train"), load_split_digits("test")
    n = len(train_data)
    torch.manual_seed(0)
    teacher = create_model("resnet18", 10).eval()
    student0 = get_adapter(teacher).keep(teacher, QUICKSTART_KEEP)
    # constant weights: with one epoch the paper's ramp would weight both alignment terms 0
    terms = [
        Term("ce", 1.0, ramped=False),
        Term("logit_cosine", alpha, ramped=False, log_as="logit_align"),
        Term("feature_cosine", beta, ramped=False, log_as="feat_align"),
    ]
    train = Batches(train_data, bs, 32, train=True, seed=0)
    test = Batches(test_data, 256, 32)
    # the bare loop gets its inputs already resized and normalised, once
    x_all = preprocess(train_data.images, 32)
    y_all = train_data.labels
    fit_seconds: dict[str, list[float]] = {}

    def ours(perf: dict[str, Any] | None = None) -> None:
        student = copy.deepcopy(student0)
        state = tmp / "kd_state.pt"
        res = kd_repair(
            student,
            teacher,
            train,
            test,
            terms=terms,
            epochs=1,
            lr=lr,
            grad_clip=clip,
            temperature=4.0,
            state_path=state,
            fingerprint="bench",
            desc="bench kd",
            perf=perf,
        )
        fit_seconds.setdefault("ours_loop_adam" if perf else "ours", []).append(res.seconds)
        state.unlink(missing_ok=True)

    def bare() -> None:
        student = copy.deepcopy(student0).train()
        params = list(student.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            x, y = x_all[idx], y_all[idx]
            with torch.no_grad():
                tf, tl = bare_resnet_features(teacher, x)
            sf, sl = bare_resnet_features(student, x)
            loss = (
                F.cross_entropy(sl, y)
                + alpha * (1 - F.cosine_similarity(sl, tl, dim=1)).mean()
                + beta * (1 - F.cosine_similarity(sf, tf, dim=1)).mean()
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()

    # time what an epoch of ours does besides training: the epoch-end test evaluation and
    # the resumable-state save (wrapping the loop module's references; instrumentation only)
    import m2mdc.train.loop as loop_mod

    spent = {"evaluate": 0.0, "save": 0.0}

    def timing(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t0

        return wrapped

    loop_mod.evaluate = timing("evaluate", loop_mod.evaluate)  # type: ignore[assignment]
    loop_mod.torch_save_atomic = timing("save", loop_mod.torch_save_atomic)  # type: ignore[assignment]

    bare()  # warm-up both paths (allocator, oneDNN primitives)
    ours()
    fit_seconds.clear()
    spent.update(evaluate=0.0, save=0.0)
    reps = 5 if quick else 7
    # ours with its defaults (fused Adam) and with PyTorch's per-parameter Adam, which is what
    # the bare loop uses: the second isolates what the loop machinery costs
    no_fused = {"fused_adam": False}
    t = interleaved({"bare": bare, "ours": ours, "ours_loop_adam": lambda: ours(no_fused)}, reps)
    ours_ips = [n / s for s in t["ours"]]
    loop_ips = [n / s for s in t["ours_loop_adam"]]
    bare_ips = [n / s for s in t["bare"]]
    calls = 2 * reps  # both variants of ours evaluate and save once per epoch
    eval_s, save_s = spent["evaluate"] / calls, spent["save"] / calls
    train_only = n / (med(t["ours"]) - eval_s - save_s)
    log(
        f"kd: ours {med(ours_ips):.0f} img/s, with per-parameter Adam {med(loop_ips):.0f} img/s "
        f"(evaluation {eval_s:.2f}s, state save {save_s:.2f}s per epoch), bare "
        f"{med(bare_ips):.0f} img/s"
    )
    return {
        "kd_throughput_vs_bare": med(ours_ips) / med(bare_ips),
        "raw": {
            "ours_evaluate_s_per_epoch": eval_s,
            "ours_state_save_s_per_epoch": save_s,
            "train_part_throughput_vs_bare": train_only / med(bare_ips),
            "per_parameter_adam_throughput_vs_bare": med(loop_ips) / med(bare_ips),
            "train_images": n,
            "test_images": len(test_data),
            "batch_size": bs,
            "student": f"resnet18 keep {QUICKSTART_KEEP}",
            "ours": "kd_repair(epochs=1), default perf (fused Adam): setup, train epoch, "
            "epoch-end evaluation on the test images, resumable-state save",
            "ours_loop_adam": "the same with perf.fused_adam=false (PyTorch's default Adam)",
            "bare": "pre-normalised tensors, randperm batches, same forward, CE + 0.1 cosine "
            "logit + 0.1 cosine feature, Adam (PyTorch's default: the per-parameter loop on a "
            "CPU), clip 1.0; no evaluation, no state",
            "ours_s": t["ours"],
            "ours_loop_adam_s": t["ours_loop_adam"],
            "ours_fit_s": fit_seconds.get("ours", []),
            "ours_loop_adam_fit_s": fit_seconds.get("ours_loop_adam", []),
            "bare_s": t["bare"],
            "ours_images_per_s": ours_ips,
            "bare_images_per_s": bare_ips,
        },
    }


def bench_sparsity(quick: bool) -> dict[str, Any]:
    """What ``kd.sparsity`` adds to a KD training step: the step of the quickstart's pruned
    student (batch 64, 32x32, CE + cosine logit and feature terms against the teacher, Adam,
    clip) without the penalty, with ``bn_l1`` and with ``group_lasso`` on the groups the
    default slicing ranks (planes and mid at 0.5 on layer2-4), timed interleaved."""
    from m2mdc.distill.sparsity import Sparsity
    from m2mdc.slicing import slice_groups

    torch.manual_seed(0)
    teacher = create_model("resnet18", 10).eval()
    student0 = get_adapter(teacher).keep(teacher, QUICKSTART_KEEP)
    stages = ["layer2", "layer3", "layer4"]
    groups = [g.producers for g in slice_groups(student0, 0.5, 0.5, stages=stages)]
    x = preprocess(synthetic_images(64, 32).images, 32)
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0))
    steps = 3 if quick else 8

    def train(kind: str | None) -> Callable[[], None]:
        student = copy.deepcopy(student0).train()
        params = list(student.parameters())
        opt = torch.optim.Adam(params, lr=5e-4)
        own = [g.producers for g in slice_groups(student, 0.5, 0.5, stages=stages)]
        pen = None if kind is None else Sparsity(own, weight=1e-4, kind=kind)

        def run() -> None:
            for _ in range(steps):
                with torch.no_grad():
                    tf, tl = bare_resnet_features(teacher, x)
                sf, sl = bare_resnet_features(student, x)
                loss = (
                    F.cross_entropy(sl, y)
                    + 0.1 * (1 - F.cosine_similarity(sl, tl, dim=1)).mean()
                    + 0.1 * (1 - F.cosine_similarity(sf, tf, dim=1)).mean()
                )
                if pen is not None:
                    loss = loss + pen.weight * pen.penalty()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()

        return run

    fns = {"off": train(None), "bn_l1": train("bn_l1"), "group_lasso": train("group_lasso")}
    for fn in fns.values():  # warm-up
        fn()
    t = interleaved(fns, 5 if quick else 9)
    per_step = {k: med(v) / steps * 1e3 for k, v in t.items()}
    log(
        "sparsity: ms per KD step "
        + ", ".join(f"{k} {v:.1f}" for k, v in per_step.items())
        + f" ({sum(len(g) for g in groups)} producer convs in {len(groups)} groups)"
    )
    return {
        "sparsity_bn_l1_step_cost": per_step["bn_l1"] / per_step["off"],
        "sparsity_group_lasso_step_cost": per_step["group_lasso"] / per_step["off"],
        "raw": {
            "ms_per_step": per_step,
            "steps_per_repetition": steps,
            "groups": len(groups),
            "producers": sum(len(g) for g in groups),
            "batch_size": 64,
            "student": f"resnet18 keep {QUICKSTART_KEEP}",
            "seconds": t,
        },
    }


def load_split_digits(split: str) -> ImageData:
    from omegaconf import OmegaConf

    ds = OmegaConf.create({"name": "digits", "num_classes": None, "limit_train": None,
                           "limit_test": None})  # fmt: skip
    return load_split(ds, split)


# ---- 3. 224 input pipeline: Batches vs per-image torchvision ---------------------------------
def bench_resize(quick: bool) -> dict[str, Any]:
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    n, bs, size, workers = (512 if quick else 2048), 64, 224, 0
    data = synthetic_images(n, 32, seed=1)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in data.images]
    tf = T.Compose(
        [
            T.Resize(size),  # bilinear, antialias on (torchvision's default for PIL images)
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    class PerImage(Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return tf(pil[i]), int(data.labels[i])

    loader = DataLoader(PerImage(), batch_size=bs, shuffle=True, num_workers=workers)
    batches = Batches(data, bs, size, train=True, seed=0)
    epoch = {"e": 0}

    def ours() -> None:
        epoch["e"] += 1
        for x, _ in batches.epoch(epoch["e"]):
            assert x.shape[-1] == size

    def torchvision_path() -> None:
        for x, _ in loader:
            assert x.shape[-1] == size

    ours()
    torchvision_path()
    t = interleaved({"ours": ours, "torchvision": torchvision_path}, 3 if quick else 5)
    ours_ips, tv_ips = [n / s for s in t["ours"]], [n / s for s in t["torchvision"]]
    log(f"resize: ours {med(ours_ips):.0f} img/s, torchvision {med(tv_ips):.0f} img/s")
    # the same at one intra-op thread: the per-image path runs many tiny torch ops whose
    # thread-pool barriers suffer most when another process holds a core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t1 = interleaved({"ours": ours, "torchvision": torchvision_path}, 3 if quick else 5)
    finally:
        torch.set_num_threads(threads)
    ours1, tv1 = [n / s for s in t1["ours"]], [n / s for s in t1["torchvision"]]
    log(f"resize, 1 thread: ours {med(ours1):.0f} img/s, torchvision {med(tv1):.0f} img/s")
    return {
        "resize_speedup": med(ours_ips) / med(tv_ips),
        "raw": {
            "resize_speedup_1_thread": med(ours1) / med(tv1),
            "ours_images_per_s_1_thread": ours1,
            "torchvision_images_per_s_1_thread": tv1,
            "images": n,
            "source_size": 32,
            "output_size": size,
            "batch_size": bs,
            "dataloader_workers": workers,
            "torch_threads": torch.get_num_threads(),
            "ours": "Batches(image_size=224, train=True): uint8 batch -> float, bilinear "
            "F.interpolate, batch flips, normalise",
            "torchvision": "DataLoader(num_workers=0) over PIL images: Resize(224) -> "
            "RandomHorizontalFlip -> ToTensor -> Normalize, default collate",
            "ours_s": t["ours"],
            "torchvision_s": t["torchvision"],
            "ours_images_per_s": ours_ips,
            "torchvision_images_per_s": tv_ips,
        },
    }


# ---- 4. realised latency speedup vs MAC reduction ---------------------------------------------
def sliced_student(block_kd: nn.Module, keep: float = 0.5) -> nn.Module:
    """inner_slice: planes and mid at ``keep`` on layer2-4, stage by stage like the slice
    stage (which channels does not matter for latency: the first ones)."""
    adapter = get_adapter(block_kd)
    model = block_kd
    for stage in adapter.plane_stages(model):
        c = adapter.plane_producers(model, stage)[0][0].out_channels
        planes = {stage: list(range(int(c * keep)))}
        mids = {}
        for b in adapter.blocks(model):
            prod = adapter.mid_producers(model, b.name) if b.stage == stage else None
            if prod is not None:
                mids[b.name] = list(range(int(prod[0].out_channels * keep)))
        model = adapter.slice(model, SlicePlan(planes=planes, mid=mids))
    return model


def stage_macs(model: nn.Module) -> dict[str, int]:
    """MACs of the stem conv, each stage and the fc at 32x32 (from the conv/linear shapes)."""
    out: dict[str, int] = {}
    hooks = []

    def add(label: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: Any, o: torch.Tensor) -> None:
            if isinstance(mod, nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
                out[label] = out.get(label, 0) + k * o.numel()
            elif isinstance(mod, nn.Linear):
                out[label] = out.get(label, 0) + mod.in_features * o.numel()

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d | nn.Linear):
            top = name.split(".")[0]
            label = top if top.startswith("layer") else ("head" if top == "fc" else "stem")
            hooks.append(mod.register_forward_hook(add(label)))
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return out


def stage_latencies(models: dict[str, nn.Module], reps: int) -> dict[str, dict[str, float]]:
    """Median batch-1 latency (ms) of the stem, each stage and the head of ResNets, timed on
    their real inputs, the models interleaved round by round."""
    x = torch.randn(1, 3, 32, 32)
    parts: dict[str, list[tuple[str, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]]] = {}
    with torch.inference_mode():
        for name, m in models.items():
            mm: Any = m
            steps: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
                ("stem", lambda z, mm=mm: mm.maxpool(mm.relu(mm.bn1(mm.conv1(z))))),
                *((s, getattr(mm, s)) for s in ("layer1", "layer2", "layer3", "layer4")),
                ("head", lambda z, mm=mm: mm.fc(torch.flatten(mm.avgpool(z), 1))),
            ]
            h, parts[name] = x, []
            for label, fn in steps:
                parts[name].append((label, fn, h))
                h = fn(h)
        times: dict[str, dict[str, list[float]]] = {
            n: {label: [] for label, _, _ in ps} for n, ps in parts.items()
        }
        for r in range(reps + 5):
            for name in parts if r % 2 == 0 else reversed(list(parts)):
                for label, fn, inp in parts[name]:
                    t0 = time.perf_counter()
                    fn(inp)
                    if r >= 5:
                        times[name][label].append((time.perf_counter() - t0) * 1e3)
    return {n: {label: med(ts) for label, ts in d.items()} for n, d in times.items()}


def bench_latency(quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    teacher = create_model("resnet18", 10).eval()
    block_kd = get_adapter(teacher).keep(teacher, QUICKSTART_KEEP).eval()
    inner = sliced_student(block_kd).eval()
    models = {"teacher": teacher, "block_kd": block_kd, "inner_slice": inner}
    macs = {k: count_macs(m, 32)["macs"] for k, m in models.items()}
    reps = 60 if quick else 200
    out: dict[str, Any] = {"macs": macs, "repeats": reps}
    for bs in (1, 64):
        lat = measure_latencies(models, 32, batch_size=bs, warmup=10, repeats=reps if bs == 1
                                else max(10, reps // 6))  # fmt: skip
        out[f"latency_ms_b{bs}"] = {k: v["latency_ms"] for k, v in lat.items()}
    figures = {}
    for k in ("block_kd", "inner_slice"):
        speedup = out["latency_ms_b1"]["teacher"] / out["latency_ms_b1"][k]
        mac_ratio = macs["teacher"] / macs[k]
        out[k] = {
            "mac_ratio": mac_ratio,
            "latency_speedup": speedup,
            "latency_speedup_b64": out["latency_ms_b64"]["teacher"] / out["latency_ms_b64"][k],
        }
        figures[f"latency_speedup_over_mac_ratio_{k}"] = speedup / mac_ratio
        log(f"latency {k}: speedup {speedup:.2f}x at batch 1, MAC ratio {mac_ratio:.2f}x")
    out["stage_latency_ms_b1"] = stage_latencies(models, reps)
    out["stage_macs"] = {k: stage_macs(m) for k, m in models.items()}
    out["threads"] = torch.get_num_threads()
    out["input_size"] = 32
    return {**figures, "raw": out}


# ---- 4b. INT8 in ONNX Runtime: the inner_slice student, FP32 vs INT8 -------------------------
def bench_int8(quick: bool, tmp: Path) -> dict[str, Any]:
    """FP32 over INT8 ONNX Runtime latency of the inner_slice-sized student (as in
    :func:`bench_latency`), exported and quantized as the quantize stage does (m2mdc.int8:
    QDQ, per-channel weights, calibrated on synthetic images), both sessions on torch's thread
    count and timed interleaved in this process at batch 1 and 64."""
    from m2mdc import int8
    from m2mdc.profiling import batch_schedule
    from m2mdc.stages.export import EXPORTERS

    torch.manual_seed(0)
    teacher = create_model("resnet18", 10).eval()
    inner = sliced_student(get_adapter(teacher).keep(teacher, QUICKSTART_KEEP)).eval()
    calib = Batches(synthetic_images(128, 32), 64, 32)
    fp32, q8 = tmp / "inner_slice_fp32.onnx", tmp / "inner_slice_int8.onnx"
    EXPORTERS["onnx"](inner, next(iter(calib))[0][:4], fp32)
    int8.quantize(fp32, q8, calib)
    threads = torch.get_num_threads()
    sessions = {"fp32": int8.session(fp32, threads), "int8": int8.session(q8, threads)}
    out: dict[str, Any] = {"threads": threads, "onnxruntime_version": int8.version()}
    out |= {"fp32_bytes": fp32.stat().st_size, "int8_bytes": q8.stat().st_size, "input_size": 32}
    figures = {}
    for bs in (1, 64):
        repeats, warmup = batch_schedule(bs, 60 if quick else 200, 10)
        t = int8.latencies(sessions, 32, bs, warmup, repeats)
        speedup = med(t["fp32"]) / med(t["int8"])
        figures["int8_latency_speedup_inner_slice" + ("" if bs == 1 else f"_b{bs}")] = speedup
        out[f"b{bs}"] = {
            "repeats": repeats,
            "warmup": warmup,
            "fp32_ms": med(t["fp32"]),
            "int8_ms": med(t["int8"]),
            "per_round_ratio_median": med(
                [f / q for f, q in zip(t["fp32"], t["int8"], strict=True)]
            ),
        }
        log(f"int8 inner_slice batch {bs}: FP32/INT8 {speedup:.2f}x ({threads} threads)")
    return {**figures, "raw": out}


# ---- 5. sweep: teacher trainings with and without the cache ---------------------------------
SWEEP_ARGS = [
    "-m",
    "seed=1,2",
    "prune.ratio=0.25,0.5",
    "dataset.limit_train=160",
    "dataset.limit_test=80",
    "dataset.batch_size=32",
    "teacher.epochs=1",
    "kd.epochs=1",
    "slice=none",
    "score.probe_samples=160",
    "prune.bn_recal_batches=2",
    "profile.latency=false",
]


def bench_sweep(tmp: Path) -> dict[str, Any]:
    from m2mdc.cache import count_entries

    exe = Path(sys.executable).parent / "m2mdc"
    out: dict[str, Any] = {"args": SWEEP_ARGS}
    for use_cache in (True, False):
        name = "with_cache" if use_cache else "without_cache"
        cache_dir, sweep_dir = tmp / f"cache_{name}", tmp / f"sweep_{name}"
        args = [
            *SWEEP_ARGS,
            f"use_cache={str(use_cache).lower()}",
            f"cache_dir={cache_dir}",
            f"hydra.sweep.dir={sweep_dir}",
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(exe), "run", *args],
            cwd=tmp,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
            timeout=1800,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"sweep ({name}) failed:\n{proc.stderr[-3000:]}")
        logs = "".join(p.read_text() for p in sorted(sweep_dir.rglob("m2mdc.log")))
        text = logs or proc.stdout + proc.stderr
        out[name] = {
            "wall_s": wall,
            "jobs": len(list(sweep_dir.rglob("summary.json"))),
            "teacher_running": len(re.findall(r"\[teacher\] running", text)),
            "teacher_reused": len(re.findall(r"\[teacher\] reused from cache", text)),
            "teacher_cache_entries": count_entries(cache_dir, "teacher"),
        }
        log(f"sweep {name}: {out[name]}")
    return {
        "sweep_teacher_trainings_with_cache": out["with_cache"]["teacher_running"],
        "sweep_teacher_trainings_without_cache": out["without_cache"]["teacher_running"],
        "sweep_wall_s_with_cache": out["with_cache"]["wall_s"],
        "sweep_wall_s_without_cache": out["without_cache"]["wall_s"],
        "raw": out,
    }


# ---- 6. a 2-job local sweep: one after the other, at once with torch's default threads, and at
# once with perf.threads' default (the cores divided among the jobs) -------------------------
PARALLEL_ARGS = [
    "-m",
    "seed=1,2",
    "dataset.limit_train=640",
    "dataset.limit_test=64",
    "dataset.batch_size=64",
    "teacher.epochs=3",
    "kd.epochs=0",
    "slice=none",
    "score.probe_samples=64",
    "prune.bn_recal_batches=2",
    "profile.latency=false",
    "use_cache=false",
]


def bench_parallel_sweep(tmp: Path) -> dict[str, Any]:
    exe = Path(sys.executable).parent / "m2mdc"
    cores = len(os.sched_getaffinity(0))
    variants = {
        "sequential": [],
        "parallel_default_threads": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                     f"perf.threads={cores}"],
        "parallel_with_fix": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(2):
        for name, extra in variants.items():
            d = tmp / f"par-{name}-{rep}"
            t0 = time.perf_counter()
            subprocess.run(
                [str(exe), "run", *PARALLEL_ARGS, *extra, f"hydra.sweep.dir={d}"],
                cwd=tmp, env=env, check=True, capture_output=True,
            )  # fmt: skip
            wall[name].append(time.perf_counter() - t0)
            shutil.rmtree(d, ignore_errors=True)
    w = {k: med(v) for k, v in wall.items()}
    log("parallel sweep: " + ", ".join(f"{k} {v:.1f}s" for k, v in w.items()))
    return {
        "parallel_sweep_speedup": w["sequential"] / w["parallel_with_fix"],
        "raw": {
            "wall_s": wall,
            "cores": cores,
            "args": PARALLEL_ARGS,
            "default_threads_slowdown_vs_sequential": w["parallel_default_threads"]
            / w["sequential"],
        },
    }


# ---- 7. streamed JPEGs: m2mdc's streaming path vs torchvision's ImageFolder + DataLoader ------
def jpeg_tree(root: Path, n: int, side: int, classes: int = 10) -> Path:
    """``root/train/<class>/<i>.JPEG``: ``n`` synthetic ``side`` x ``side`` images (quality 90)."""
    from PIL import Image

    data = synthetic_images(n, side, classes, seed=2)
    for i, (img, label) in enumerate(zip(data.images, data.labels.tolist(), strict=True)):
        path = root / "train" / f"c{label:02d}" / f"{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, "JPEG", quality=90)
    (root / "test").symlink_to(root / "train")  # an image tree needs one; never read here
    return root


def bench_stream(quick: bool, tmp: Path, n: int | None = None) -> dict[str, Any]:
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    n = n or (512 if quick else 2000)
    side, bs, workers = 64, 64, 2
    root = jpeg_tree(tmp / "jpegs", n, side)
    ds = OmegaConf.create({
        "name": "imagefolder", "root": str(root), "image_size": side, "num_classes": None,
        "limit_train": None, "limit_test": None, "val_fraction": 0.0, "num_workers": workers,
        "in_memory": "false", "augment": "imagenet",
    })  # fmt: skip
    t0 = time.perf_counter()
    split = load_split(ds, "train")  # lists the files and reads their headers, decodes none
    ours_setup = time.perf_counter() - t0
    batches = Batches(split, bs, side, train=True, seed=0, augment="imagenet")
    tf = T.Compose(
        [
            T.RandomResizedCrop(side),  # bilinear, antialiased: the imagenet preset's crop
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    t0 = time.perf_counter()
    folder = datasets.ImageFolder(str(root / "train"), transform=tf)
    tv_setup = time.perf_counter() - t0
    loader = DataLoader(folder, batch_size=bs, shuffle=True, num_workers=workers)
    epoch = {"e": 0}

    def ours() -> None:
        epoch["e"] += 1
        for x, _ in batches.epoch(epoch["e"]):
            assert x.shape[-1] == side

    def torchvision_path() -> None:
        for x, _ in loader:
            assert x.shape[-1] == side

    assert batches.num_examples == len(folder) == n
    ours()  # warm-up: the files in the page cache for both sides
    torchvision_path()
    t = interleaved({"ours": ours, "torchvision": torchvision_path}, 3 if quick else 5)
    ours_ips, tv_ips = [n / s for s in t["ours"]], [n / s for s in t["torchvision"]]
    log(f"stream: ours {med(ours_ips):.0f} img/s, torchvision {med(tv_ips):.0f} img/s")
    return {
        "stream_vs_memory_throughput": med(ours_ips) / med(tv_ips),
        "raw": {
            "images": n,
            "side": side,
            "batch_size": bs,
            "dataloader_workers": workers,
            "torch_threads": torch.get_num_threads(),
            "ours": "load_split(dataset.in_memory=false) -> Batches(augment=imagenet, "
            "train=True): PIL decode and batch stacking in 2 DataLoader workers, then the batch's "
            "RandomResizedCrop boxes, flips and normalisation in the main process",
            "torchvision": "ImageFolder + DataLoader(num_workers=2, shuffle=True): PIL decode, "
            "RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize per image in workers",
            "ours_setup_s": ours_setup,
            "torchvision_setup_s": tv_setup,
            "ours_s": t["ours"],
            "torchvision_s": t["torchvision"],
            "ours_images_per_s": ours_ips,
            "torchvision_images_per_s": tv_ips,
        },
    }


def check_targets(result: dict[str, Any]) -> dict[str, bool]:
    ok = {}
    for key, (op, bound) in TARGETS.items():
        v = result.get(key)
        ok[key] = v is not None and (v >= bound if op == ">=" else v <= bound)
    return ok


BENCHES: dict[str, Callable[[Path, bool], dict[str, Any]]] = {
    "mi": lambda tmp, quick: bench_mi(quick),
    "kd": lambda tmp, quick: bench_kd(quick, tmp),
    "resize": lambda tmp, quick: bench_resize(quick),
    "latency": lambda tmp, quick: bench_latency(quick),
    "int8": lambda tmp, quick: bench_int8(quick, tmp),
    "sparsity": lambda tmp, quick: bench_sparsity(quick),
    "sweep": lambda tmp, quick: bench_sweep(tmp),
    "parallel": lambda tmp, quick: bench_parallel_sweep(tmp),
    "stream": lambda tmp, quick: bench_stream(quick, tmp),
}
"""``--only`` name -> the figures it measures (in a scratch dir, quick or not), in run order."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a few minutes)")
    ap.add_argument("--out", default="bench.json", help="where to write the JSON results")
    ap.add_argument(
        "--only",
        default=",".join(BENCHES),
        help=f"comma-separated subset of: {', '.join(BENCHES)}",
    )
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    if unknown := only - set(BENCHES):
        ap.error(f"--only: unknown {', '.join(sorted(unknown))}; choices: {', '.join(BENCHES)}")
    t_start = time.perf_counter()
    result: dict[str, Any] = {"quick": args.quick, "machine": machine(), "raw": {}}
    tmp = Path(tempfile.mkdtemp(prefix="m2mdc-bench-"))
    try:
        for name, fn in BENCHES.items():
            if name not in only:
                continue
            log(f"{name} ...")
            t0 = time.perf_counter()
            got = fn(tmp, args.quick)
            result["raw"][name] = got.pop("raw")
            result["raw"][name]["bench_seconds"] = time.perf_counter() - t0
            result.update(got)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["targets"] = {k: f"{op} {b}" for k, (op, b) in TARGETS.items()}
    result["meets_targets"] = check_targets(result)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["total_seconds"] = time.perf_counter() - t_start
    order = [k for k in result if k not in ("machine", "raw", "targets", "meets_targets")]
    ordered = {k: result[k] for k in order}
    ordered.update({k: result[k] for k in ("targets", "meets_targets", "machine", "raw")})
    Path(args.out).write_text(json.dumps(ordered, indent=2) + "\n")
    log(f"wrote {args.out} in {result['total_seconds']:.0f}s")
    for k, v in ordered.items():
        if isinstance(v, float | int) and not isinstance(v, bool):
            print(f"  {k:45s} {v:.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
