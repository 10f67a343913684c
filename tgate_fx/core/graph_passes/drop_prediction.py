"""Drop a graph's prediction output, keeping its other outputs (the head of a choice step).

Assumes a flat graph whose output is a tuple ``(prediction, *values)``.
Guarantees: the output becomes ``(None, *values)``; the values are
unchanged. What only the prediction needed is then dead code, removed by
:class:`~tgate_fx.core.graph_passes.EliminateDeadCode`.
"""

from __future__ import annotations

import torch.fx as fx

from .base import GraphPass, PassResult


class DropPrediction(GraphPass):
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        output = graph_module.graph.output_node()
        values = tuple(output.args[0])
        if not values:
            raise ValueError("the graph has no outputs to drop a prediction from")
        output.args = ((None, *values[1:]),)
        return PassResult(graph_module, values[0] is not None)
