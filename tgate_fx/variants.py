"""Build a graph variant: a captured graph specialised by the passes for one :class:`VariantSpec`.

A variant is a copy of the capture's graph (sharing its parameters) on which
the passes run in order:

1. :class:`~tgate_fx.passes.ExposeAttentionOutputs` for the recorded sites,
2. :class:`~tgate_fx.passes.ReplaceAttentionWithCache` for the reused sites,
3. :class:`~tgate_fx.passes.EliminateDeadCode`,
4. :class:`~tgate_fx.passes.RemoveUnusedInputs`.

Its calling convention: inputs by placeholder name (the call's tensors, then
``cache_<site>`` reads); outputs ``(prediction, *writes)`` with one write per
recorded site, in :attr:`Variant.records` order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .analysis import AttentionSite
from .passes import (
    EliminateDeadCode,
    ExposeAttentionOutputs,
    RemoveUnusedInputs,
    ReplaceAttentionWithCache,
    cache_input_name,
)
from .plan import VariantSpec

__all__ = ["Variant", "build_variant", "copy_graph_module"]


@dataclass(eq=False)
class Variant:
    """A specialised graph and how to call it.

    Attributes:
        spec: What the variant does per role.
        graph_module: The rewritten graph; ``print(variant.graph_module.code)`` reads as Python.
        input_names: Placeholder names, in order.
        reads: Site paths whose values are cache inputs (``cache_<site>``).
        records: Site paths whose values are outputs 1..n.
    """

    spec: VariantSpec
    graph_module: fx.GraphModule
    input_names: list[str]
    reads: list[str]
    records: list[str]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cache_inputs(self) -> dict[str, str]:
        """Site path -> placeholder name of its cache read."""
        return {site: cache_input_name(site) for site in self.reads}

    def __call__(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.graph_module(*(inputs[name] for name in self.input_names))

    def node_count(self) -> int:
        return sum(1 for n in self.graph_module.graph.nodes if n.op == "call_function")


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new ``GraphModule`` over a copy of ``gm``'s graph, sharing its parameters."""
    graph = fx.Graph()
    outputs = graph.graph_copy(gm.graph, {})
    graph.output(outputs)
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def build_variant(base: fx.GraphModule, sites: list[AttentionSite], spec: VariantSpec) -> Variant:
    """Specialise ``base`` (a tagged capture graph) for ``spec``; ``base`` is not modified."""
    records = [s.path for s in sites if s.role in spec.record]
    reads = [s.path for s in sites if s.role in spec.reuse]
    passes = []
    if records:
        passes.append(ExposeAttentionOutputs(records, cfg_mean=spec.cfg_mean))
    if reads:
        passes.append(ReplaceAttentionWithCache(reads))
    passes += [EliminateDeadCode(), RemoveUnusedInputs()]
    gm = copy_graph_module(base)
    for graph_pass in passes:
        gm = graph_pass(gm).graph_module
    gm.recompile()
    input_names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return Variant(spec, gm, input_names, reads, records)
