"""Replace chosen attention values by cache inputs (the cache reads).

Assumes a tagged graph (:func:`tgate_fx.analysis.find_attention_sites`).
Guarantees: each requested site gets a new placeholder, placed after the
existing ones and carrying the value's ``meta["val"]``; every use of the
site's value now reads that placeholder. Whatever computed the value (norms
inside the module, q/k/v projections, SDPA, out-projection) is left without
users; :class:`EliminateDeadCode` removes it. What follows the value inside
the module (``/ rescale_output_factor``) still runs, as in the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx

from ..analysis import TAG
from ._infra import GraphPass, PassResult, site_values


def cache_input_name(site: str) -> str:
    """Placeholder name of the cache read for ``site``."""
    return "cache_" + site.replace(".", "_")


class ReplaceAttentionWithCache(GraphPass):
    def __init__(self, sites: Sequence[str]):
        self.sites = list(sites)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        values = site_values(graph, self.sites)
        last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
        for site in self.sites:
            value = values[site]
            with graph.inserting_after(last_input):
                cache = graph.placeholder(cache_input_name(site))
            cache.meta["val"] = value.meta["val"]
            cache.meta[TAG] = {"site": site, "role": value.meta[TAG]["role"], "read": True}
            value.replace_all_uses_with(cache)
            last_input = cache
        return PassResult(graph_module, bool(self.sites))
