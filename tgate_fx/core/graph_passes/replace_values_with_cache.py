"""Replace chosen values of a graph by new inputs (the cache reads).

Takes ``(node, input name)`` pairs of the graph it runs on. Guarantees: each
node gets a new placeholder with that name, placed after the existing ones
and carrying the node's ``meta["val"]`` and region tag; every use of the node
now reads the placeholder. Whatever computed the value is left without users
(unless something else reads it); :class:`EliminateDeadCode` removes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx

from ..meta import TAG
from .base import GraphPass, PassResult


class ReplaceValuesWithCache(GraphPass):
    def __init__(self, replacements: Sequence[tuple[fx.Node, str]]):
        self.replacements = list(replacements)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        taken = {n.name for n in placeholders}
        last_input = placeholders[-1]
        for value, name in self.replacements:
            if value.graph is not graph:
                raise ValueError(f"node {value.name} is not in the graph this pass runs on")
            if name in taken:
                raise ValueError(f"the graph already has an input named {name!r}")
            with graph.inserting_after(last_input):
                cache = graph.placeholder(name)
            if cache.name != name:
                raise ValueError(f"input name {name!r} clashes with a node of the graph")
            cache.meta["val"] = value.meta["val"]
            if TAG in value.meta:
                cache.meta[TAG] = {**{k: v for k, v in value.meta[TAG].items() if k != "value"}, "read": True}
            value.replace_all_uses_with(cache)
            taken.add(name)
            last_input = cache
        return PassResult(graph_module, bool(self.replacements))
