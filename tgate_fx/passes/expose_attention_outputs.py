"""Expose chosen attention values as extra graph outputs (the cache writes).

Assumes the graph was tagged by :func:`tgate_fx.analysis.find_attention_sites`
and returns a flat tuple. Guarantees: the original outputs come first and are
unchanged; one output per requested site follows, in the order given. With
``cfg_mean=True`` each extra output is ``(u + c) / 2`` of the two halves
``u, c = value.chunk(2)`` of the classifier-free-guidance batch (unconditional
half first), in the value's dtype and in that order of operations, as the
reference T-GATE code caches it at the gate step. Nothing is recomputed: the
outputs read the values the graph already produces.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.fx as fx

from ..analysis import TAG
from ._infra import GraphPass, PassResult, new_node, site_values

aten = torch.ops.aten


class ExposeAttentionOutputs(GraphPass):
    def __init__(self, sites: Sequence[str], *, cfg_mean: bool = False):
        self.sites = list(sites)
        self.cfg_mean = cfg_mean

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        values = site_values(graph, self.sites)
        output = graph.output_node()
        extra = []
        for site in self.sites:
            value = values[site]
            out = value
            if self.cfg_mean:
                if value.meta["val"].shape[0] % 2:
                    raise ValueError(f"cfg_mean needs an even batch, site {site} has {tuple(value.meta['val'].shape)}")
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
                for n in (halves, uncond, cond, total):
                    n.meta[TAG] = {"site": site, "role": value.meta[TAG]["role"]}
            out.meta[TAG] = {**value.meta[TAG], "write": True}
            extra.append(out)
        output.args = (tuple(output.args[0]) + tuple(extra),)
        return PassResult(graph_module, bool(extra))
