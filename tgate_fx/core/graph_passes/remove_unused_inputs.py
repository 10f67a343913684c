"""Remove placeholders that nothing reads.

After the gate, cross-attention is a cache read, so ``encoder_hidden_states``
(and, for PixArt, the text mask) may have no users left; dropping the input
makes that visible in the graph's signature and in exported models.
Guarantees: the remaining placeholders keep their names and order; callers
must feed inputs by those names.
"""

from __future__ import annotations

import torch.fx as fx

from .base import GraphPass, PassResult


class RemoveUnusedInputs(GraphPass):
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        unused = [n for n in graph_module.graph.nodes if n.op == "placeholder" and not n.users]
        for node in unused:
            graph_module.graph.erase_node(node)
        return PassResult(graph_module, bool(unused))
