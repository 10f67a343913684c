"""Downsample the key/value input of self-attention sites on its 2-D token grid (ToDo).

Takes, per site, the nodes that read the key/value input (the ``to_k`` and
``to_v`` projections), the site's token grid ``(h, w)`` and an integer
factor ``f``, and one mode. Assumes every consumer of a site reads the same
``(B, N, C)`` input as its first argument, with ``N == h * w`` tokens in
row-major grid order, and that ``f`` divides ``h`` and ``w`` (else
``ValueError`` naming the grid and factor: no silent change of shape).
Inserts, once per site and right after that input, what the official
``merge.py: up_or_downsample`` computes: reshape to ``(B, h, w, C)``,
permute to ``(B, C, h, w)``, then ``upsample_nearest2d`` /
``_upsample_nearest_exact2d`` to ``(h // f, w // f)`` (modes ``"nearest"``,
``"nearest-exact"``, what ``F.interpolate`` calls) or ``max_pool2d`` /
``avg_pool2d`` with kernel = stride = ``f``, permute back and reshape to
``(B, N / f^2, C)``; the consumers read that instead. Queries, and every
other reader of the input, keep all N tokens. Guarantees: new nodes carry
``meta["val"]``, the provenance and region tag of the site's first
consumer; ``meta["val"]`` of every node downstream whose shape changes
(keys, values, up to the attention core, whose output keeps N tokens) is
recomputed; a factor of 1 leaves the site untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..core.meta import TAG
from ..core.graph_passes import GraphPass, PassResult, new_node

__all__ = ["DownsampleKeyValues", "KeyValueSite", "MODES"]

aten = torch.ops.aten
MODES = ("nearest", "nearest-exact", "avg_pool", "max_pool")


class KeyValueSite(NamedTuple):
    """One site to downsample: the nodes reading its key/value input, its token grid ``(h, w)`` and factor."""

    consumers: tuple[fx.Node, ...]
    grid: tuple[int, int]
    factor: int


def _downsample(graph: fx.Graph, src: fx.Node, grid: tuple[int, int], f: int, mode: str,
                like: fx.Node) -> list[fx.Node]:
    batch = src.meta["val"].shape[0]
    h, w = grid
    new = []

    def add(target, *args):
        node = new_node(graph, target, args, like=like)
        new.append(node)
        return node

    with graph.inserting_after(src):
        x = add(aten.reshape.default, src, [batch, h, w, -1])
    with graph.inserting_after(x):
        x = add(aten.permute.default, x, [0, 3, 1, 2])
    with graph.inserting_after(x):
        if mode == "nearest":
            x = add(aten.upsample_nearest2d.vec, x, [h // f, w // f], None)
        elif mode == "nearest-exact":
            x = add(aten._upsample_nearest_exact2d.vec, x, [h // f, w // f], None)
        elif mode == "max_pool":
            x = add(aten.max_pool2d.default, x, [f, f], [f, f])
        else:
            x = add(aten.avg_pool2d.default, x, [f, f], [f, f])
    with graph.inserting_after(x):
        x = add(aten.permute.default, x, [0, 2, 3, 1])
    with graph.inserting_after(x):
        x = add(aten.reshape.default, x, [batch, (h // f) * (w // f), -1])
    return new


def _propagate_shapes(graph: fx.Graph, changed: set[fx.Node]) -> None:
    """Recompute ``meta["val"]`` of the nodes whose inputs changed shape, as far as shapes keep changing."""
    for node in graph.nodes:
        if node.op != "call_function" or node in changed or not any(i in changed for i in node.all_input_nodes):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
        old = node.meta.get("val")
        leaves = [v for v in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
        with detect_fake_mode(leaves) or torch._subclasses.FakeTensorMode():
            node.meta["val"] = node.target(*args, **kwargs)
        shapes = lambda v: [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(v) if isinstance(t, torch.Tensor)]
        if shapes(node.meta["val"]) != shapes(old):
            changed.add(node)


class DownsampleKeyValues(GraphPass):
    def __init__(self, sites: Sequence[KeyValueSite], mode: str = "nearest"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.sites = [KeyValueSite(tuple(s.consumers), tuple(s.grid), s.factor) for s in sites]
        self.mode = mode

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        changed: set[fx.Node] = set()
        for consumers, (h, w), f in self.sites:
            if isinstance(f, bool) or not isinstance(f, int) or f < 1:
                raise ValueError(f"factor must be an int >= 1, got {f!r}")
            if not consumers:
                raise ValueError("a key/value site needs at least one consumer node")
            for node in consumers:
                if node.graph is not graph:
                    raise ValueError(f"node {node.name} is not in the graph this pass runs on")
            sources = {node.args[0] for node in consumers}
            if len(sources) != 1:
                raise ValueError(f"the key/value consumers {[n.name for n in consumers]} read different inputs "
                                 f"{sorted(getattr(s, 'name', str(s)) for s in sources)}; expected one")
            src = sources.pop()
            shape = tuple(src.meta["val"].shape)
            if len(shape) != 3 or shape[1] != h * w:
                raise ValueError(f"key/value input {src.name} of shape {shape} is not (B, {h}*{w}, C) tokens "
                                 f"of the grid {h}x{w}")
            if f == 1:
                continue
            if h % f or w % f:
                raise ValueError(f"the {h}x{w} token grid read by {[n.name for n in consumers]} is not divisible by "
                                 f"the downsampling factor {f}; choose a factor dividing both sides, or a resolution "
                                 f"whose grid it divides")
            new = _downsample(graph, src, (h, w), f, self.mode, like=consumers[0])
            if TAG in consumers[0].meta:
                for n in new:
                    n.meta[TAG] = {k: v for k, v in consumers[0].meta[TAG].items() if k != "value"}
            for node in consumers:
                node.replace_input_with(src, new[-1])
            changed.update(new)
        if changed:
            _propagate_shapes(graph, changed)
        return PassResult(graph_module, bool(changed))
