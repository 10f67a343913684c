"""Remove every computation whose result nothing reads, and the parameters it held.

``Graph.eliminate_dead_code`` keeps random ops alive, and the export IR marks
dropout and scaled-dot-product attention as random even at ``p=0``; this pass
treats them as the pure functions they are at inference. Operators that
mutate their inputs or have side effects stay. Placeholders stay too (see
:class:`RemoveUnusedInputs`). Afterwards, submodules and parameters that no
remaining ``get_attr`` reads are deleted from the ``GraphModule`` (captured
graphs hold their parameters directly, under flat names): a variant holds
only the weights it uses. Guarantees: outputs are unchanged.
"""

from __future__ import annotations

import torch.fx as fx

from .base import GraphPass, PassResult


def _keep(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    return node.op == "call_function" and node.is_impure(impure_random=False)


class EliminateDeadCode(GraphPass):
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        before = len(graph_module.graph.nodes)
        graph_module.graph.eliminate_dead_code(is_impure_node=lambda n: _keep(n))
        graph_module.delete_all_unused_submodules()
        read = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
        for name in [*graph_module._parameters, *graph_module._buffers]:
            if name not in read:
                delattr(graph_module, name)
        return PassResult(graph_module, len(graph_module.graph.nodes) != before)
