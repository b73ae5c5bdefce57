"""A model's blocks, stages and channel groups, read from one traced forward pass and from
Torch-Pruning's ``DependencyGraph`` (no class names, no per-family code).

Blocks:
    A *residual block* is a module whose output is ``g(x + f(x))`` for its own input ``x``: in
    the autograd graph of its output, walking back through parameter-free unary operations
    (``g``: ReLU, GELU, a scalar scale, ...) reaches an addition one of whose operands is the
    very tensor the module received. The test reads the graph the forward pass built, so it
    holds for every way of writing the skip (``out += identity``, ``x + self.conv(x)``, a
    stochastic-depth branch, a layer scale, an ``nn.Identity`` shortcut). A module that only
    wraps one residual block (same input, same output) is not a block itself; blocks inside a
    block are part of it. A *transition block* is a module of the same type as a residual
    block that is not residual itself (ResNet ``layer2.0``: a projection shortcut; MobileNetV2
    ``features.2``: stride 2): it changes width or resolution and is protected.

Stages:
    Maximal runs of consecutive blocks whose outputs have one shape (width and resolution).
    A stage is labelled by its blocks' common parent when that parent holds exactly this run
    (``layer2``, ``features.3``), else by its width (``c24``), else by its position.

Channel groups (Torch-Pruning's ``DependencyGraph`` on the traced model):
    The *planes* of a stage are the group holding the output channels of its blocks: everything
    coupled to them through the residual additions (the stem or downsample before it, every
    norm, the next stage's inputs, the classifier). A *mid* group is a group all of whose
    layers lie inside one block. A group is sliceable when at least one dense ``Conv2d`` feeding
    a ``BatchNorm2d`` produces its channels (m2mdc's selectors rank those pairs) and no grouped
    (non-depthwise) convolution reads or writes it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

ANALYSIS_SIZE = 64
"""Side of the dummy input the structure is read from (every stage keeps >= 1 pixel)."""


@dataclass
class Structure:
    """What the adapter needs to know about one model, by module path.

    Attributes:
        blocks: ``(path, stage, protected)`` of every block, in forward order.
        classifier: path of the final Linear layer.
        out_roots: block -> the last layer inside it whose output channels are its output's.
        planes: sliceable stage -> its ``(owner block or "", conv, bn)`` producers.
        mids: block -> its sliceable mid groups as ``(conv, bn)`` (the conv path is the key).
        unsliced: group label -> why it is not sliced.
    """

    blocks: list[tuple[str, str, bool]] = field(default_factory=list)
    classifier: str = ""
    out_roots: dict[str, str] = field(default_factory=dict)
    planes: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    mids: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    unsliced: dict[str, str] = field(default_factory=dict)
    input_size: int = ANALYSIS_SIZE

    def stage_blocks(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for path, stage, _ in self.blocks:
            out.setdefault(stage, []).append(path)
        return out


@dataclass
class _Call:
    module: nn.Module
    in_fn: Any
    out_fn: Any
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    order: int = 0


def _trace(model: nn.Module, x: torch.Tensor) -> dict[str, _Call]:
    """Path -> the first call of every submodule taking and returning one tensor."""
    calls: dict[str, _Call] = {}
    pending: dict[str, Any] = {}
    handles = []
    counter = [0]
    for path, module in model.named_modules():
        if not path:
            continue

        def pre(mod: nn.Module, args: tuple[Any, ...], path: str = path) -> None:
            if args and isinstance(args[0], torch.Tensor):
                pending.setdefault(path, (args[0].grad_fn, tuple(args[0].shape)))

        def post(mod: nn.Module, args: Any, out: Any, path: str = path) -> None:
            if path in calls or path not in pending or not isinstance(out, torch.Tensor):
                return
            in_fn, in_shape = pending[path]
            counter[0] += 1
            calls[path] = _Call(mod, in_fn, out.grad_fn, in_shape, tuple(out.shape), counter[0])

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def _adds_input(out_fn: Any, in_fn: Any) -> bool:
    """The output is ``g(x + ...)``: through parameter-free unary nodes to an addition one of
    whose operands is the input ``x`` (whose producing node is ``in_fn``)."""
    node = out_fn
    for _ in range(8):
        if node is None or in_fn is None:
            return False
        prev = [f for f, _ in node.next_functions if f is not None]
        if type(node).__name__.startswith("AddBackward"):
            return any(f is in_fn for f in prev)
        if len(prev) != 1 or type(prev[0]).__name__ == "AccumulateGrad":
            return False
        node = prev[0]
    return False


def _inside(path: str, parent: str) -> bool:
    return path.startswith(parent + ".")


def find_blocks(calls: dict[str, _Call]) -> list[tuple[str, bool]]:
    """``(path, protected)`` of every block, in forward order (see the module docstring)."""
    residual = [
        p for p, c in calls.items() if c.in_shape == c.out_shape and _adds_input(c.out_fn, c.in_fn)
    ]
    wrappers = {
        p
        for p in residual
        for q in residual
        if _inside(q, p) and (calls[q].in_fn, calls[q].out_fn) == (calls[p].in_fn, calls[p].out_fn)
    }
    residual = [p for p in residual if p not in wrappers]
    residual = [p for p in residual if not any(_inside(p, q) for q in residual)]
    types = {type(calls[p].module) for p in residual}
    blocks = [
        (p, p not in residual)
        for p, c in calls.items()
        if type(c.module) in types and not any(_inside(p, q) for q in residual if q != p)
    ]
    blocks = [(p, prot) for p, prot in blocks if not any(_inside(p, q) for q, _ in blocks)]
    return sorted(blocks, key=lambda b: calls[b[0]].order)


def label_stages(paths: list[str], shapes: list[tuple[int, ...]]) -> list[str]:
    """The stage label of every block (module docstring: maximal runs of one output shape)."""
    runs: list[list[int]] = []
    for i, shape in enumerate(shapes):
        if runs and shapes[runs[-1][-1]] == shape:
            runs[-1].append(i)
        else:
            runs.append([i])
    parents = [{paths[i].rpartition(".")[0] for i in run} for run in runs]
    by_parent = [next(iter(ps)) if len(ps) == 1 and ps != {""} else None for ps in parents]
    owned = [
        p is not None and sum(1 for q in paths if q.rpartition(".")[0] == p) == len(run)
        for p, run in zip(by_parent, runs, strict=True)
    ]
    widths = [f"c{shapes[run[0]][1]}" for run in runs]
    if all(owned) and len(set(by_parent)) == len(runs):
        labels = [str(p) for p in by_parent]
    elif len(set(widths)) == len(runs):
        labels = widths
    else:
        labels = [f"stage{k + 1}" for k in range(len(runs))]
    return [labels[k] for k, run in enumerate(runs) for _ in run]


def out_channels(module: nn.Module) -> int | None:
    """The output channel count of a layer Torch-Pruning prunes (None for anything else)."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[0])
    return None


def build_graph(model: nn.Module, input_size: int) -> Any:
    """Torch-Pruning's DependencyGraph of ``model`` (traced in eval mode; mode restored)."""
    training = model.training
    ref = next(model.parameters())
    example = torch.zeros(1, 3, input_size, input_size, device=ref.device, dtype=ref.dtype)
    model.eval()
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            # a parameter outside any layer (ConvNeXt's layer scale) is pruned on its last
            # non-singleton dimension, its channels: what m2mdc wants, so the notice is noise
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        model.train(training)


def out_group(graph: Any, module: nn.Module, idxs: list[int]) -> Any:
    """The DependencyGraph group that pruning output channels ``idxs`` of ``module`` cuts."""
    pruner = graph.get_pruner_of_module(module)
    return graph.get_pruning_group(module, pruner.prune_out_channels, idxs)


class NoResidualBlocks(ValueError):
    """The model has no module whose output is its input plus a branch."""


def analyse(model: nn.Module, input_size: int = ANALYSIS_SIZE) -> Structure:
    """The :class:`Structure` of ``model`` (a CPU model with fresh weights; left in eval mode).

    Raises:
        NoResidualBlocks: no residual block was found.
    """
    model.eval()
    x = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        calls = _trace(model, x)
    blocks = find_blocks(calls)
    if all(protected for _, protected in blocks):
        raise NoResidualBlocks("no module whose output is its input plus a branch")
    paths = [p for p, _ in blocks]
    stages = label_stages(paths, [calls[p].out_shape for p in paths])
    linears = [p for p, c in calls.items() if isinstance(c.module, nn.Linear)]
    if not linears:
        raise ValueError("no Linear classifier")
    st = Structure(
        blocks=[(p, s, prot) for (p, prot), s in zip(blocks, stages, strict=True)],
        classifier=max(linears, key=lambda p: calls[p].order),
        out_roots={p: _out_root(calls, p) for p in paths},
        input_size=input_size,
    )
    _channel_groups(model, st)
    return st


def _out_root(calls: dict[str, _Call], block: str) -> str:
    """The last layer inside ``block`` (in execution order) with the block's output width."""
    width = calls[block].out_shape[1]
    inside = [p for p, c in calls.items() if _inside(p, block) and out_channels(c.module) == width]
    if not inside:
        raise ValueError(f"{block}: no layer inside it produces its {width} output channels")
    return max(inside, key=lambda p: calls[p].order)


Member = tuple[str, nn.Module, bool]  # (path, module, prunes its output channels)


def _channel_groups(model: nn.Module, st: Structure) -> None:
    """Fill ``st.planes``, ``st.mids`` and ``st.unsliced`` from the DependencyGraph."""
    graph = build_graph(model, st.input_size)
    names = {m: p for p, m in model.named_modules()}
    order = {p: i for i, p in enumerate(names.values())}
    head = model.get_submodule(st.classifier)
    groups: list[list[Member]] = []
    for g in graph.get_all_groups(ignored_layers=[head], root_module_types=(nn.Conv2d, nn.Linear)):
        mem = [
            (
                names[dep.target.module],
                dep.target.module,
                graph.is_out_channel_pruning_fn(dep.handler),
            )
            for dep, _ in g
            if dep.target.module in names
        ]
        groups.append(sorted(mem, key=lambda m: order[m[0]]))
    where = {(p, out): i for i, mem in enumerate(groups) for p, _, out in mem}
    blocks = [p for p, _, _ in st.blocks]

    def owner(path: str) -> str:
        return next((b for b in blocks if path == b or _inside(path, b)), "")

    planes: set[int] = set()
    for stage, members in st.stage_blocks().items():
        found = {where.get((st.out_roots[b], True)) for b in members}
        gi = found.pop() if len(found) == 1 else None
        why = "its blocks' outputs are not one channel group" if gi is None else None
        if gi is not None:
            planes.add(gi)
            why = _unsliceable(graph, names, groups[gi])
        if why is None and gi is not None:
            pairs = _producers(graph, names, groups[gi])
            st.planes[stage] = [(owner(c), c, b) for c, b in pairs]
        else:
            st.unsliced[stage] = str(why)
    for gi, mem in enumerate(groups):
        owners = {owner(p) for p, _, _ in mem}
        if gi in planes or len(owners) != 1 or "" in owners:
            continue
        block = owners.pop()
        why = _unsliceable(graph, names, mem)
        if why is None:
            st.mids.setdefault(block, []).append(_producers(graph, names, mem)[0])
        else:
            st.unsliced[mem[0][0]] = why
    st.mids = {
        b: sorted(st.mids[b], key=lambda pair: order[pair[0]]) for b in blocks if b in st.mids
    }


def _producers(graph: Any, names: dict[nn.Module, str], mem: list[Member]) -> list[tuple[str, str]]:
    """``(conv, bn)`` paths of the dense convs of a group whose output feeds a BatchNorm2d of
    the same group."""
    bns = {m for _, m, out in mem if out and isinstance(m, nn.BatchNorm2d)}
    pairs = []
    for path, m, out in mem:
        if out and isinstance(m, nn.Conv2d) and m.groups == 1:
            nxt = [n.module for n in graph.module2node[m].outputs]
            bn = next((b for b in nxt if b in bns), None)
            if bn is not None:
                pairs.append((path, names[bn]))
    return pairs


def _unsliceable(graph: Any, names: dict[nn.Module, str], mem: list[Member]) -> str | None:
    """Why m2mdc does not slice a group (None: it does)."""
    for path, m, _ in mem:
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups != m.in_channels:
            return f"grouped conv {path} (groups={m.groups})"
    if not _producers(graph, names, mem):
        return "no Conv2d+BatchNorm2d producer (m2mdc's selectors rank those)"
    return None
