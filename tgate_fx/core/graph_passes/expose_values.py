"""Expose chosen values of a graph as extra outputs (the cache writes).

Assumes a flat graph whose output is a tuple, and nodes of that graph.
Guarantees: the original outputs come first and are unchanged; one output
per requested node follows, in the order given. For a node in ``cfg_mean``
the extra output is ``(u + c) / 2`` of the two halves ``u, c =
value.chunk(2)`` of the classifier-free-guidance batch (unconditional half
first), in the value's dtype and in that order of operations, as the
reference T-GATE code caches it at its gate step. Nothing is recomputed: the
outputs read the values the graph already produces. New nodes carry
``meta["val"]``, the provenance and the region tag of the value they read.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Sequence

import torch
import torch.fx as fx

from ..meta import TAG
from .base import GraphPass, PassResult, new_node

aten = torch.ops.aten


class ExposeValues(GraphPass):
    def __init__(self, nodes: Sequence[fx.Node], *, cfg_mean: Collection[fx.Node] = ()):
        self.nodes = list(nodes)
        self.cfg_mean = set(cfg_mean)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        output = graph.output_node()
        extra = []
        for value in self.nodes:
            if value.graph is not graph:
                raise ValueError(f"node {value.name} is not in the graph this pass runs on")
            out = value
            if value in self.cfg_mean:
                if value.meta["val"].shape[0] % 2:
                    raise ValueError(f"cfg_mean needs an even batch, {value.name} has {tuple(value.meta['val'].shape)}")
                with graph.inserting_after(value):
                    halves = new_node(graph, aten.chunk.default, (value, 2), like=value)
                with graph.inserting_after(halves):
                    uncond = new_node(graph, operator.getitem, (halves, 0), like=value)
                with graph.inserting_after(uncond):
                    cond = new_node(graph, operator.getitem, (halves, 1), like=value)
                with graph.inserting_after(cond):
                    total = new_node(graph, aten.add.Tensor, (uncond, cond), like=value)
                with graph.inserting_after(total):
                    out = new_node(graph, aten.div.Tensor, (total, 2), like=value)
                if TAG in value.meta:
                    for n in (halves, uncond, cond, total, out):
                        n.meta[TAG] = {k: v for k, v in value.meta[TAG].items() if k != "value"}
            extra.append(out)
        output.args = (tuple(output.args[0]) + tuple(extra),)
        return PassResult(graph_module, bool(extra))
