"""Remove every computation whose result nothing reads, and the parameters it held.

``Graph.eliminate_dead_code`` keeps random ops alive, and the export IR marks
dropout and scaled-dot-product attention as random even at ``p=0``; this pass
treats them as the pure functions they are at inference. It also keeps every
in-place op alive, and with it everything the op reads. An in-place write into
a tensor the graph itself allocated (``empty_like`` and the like, written
through views: Wan's rotary embedding fills ``out[..., 0::2]`` and
``out[..., 1::2]`` of an ``empty_like``) only matters if something reads that
tensor: here such a write lives exactly as long as its tensor, or a view of
it, has a reader that lives. Other operators that mutate their inputs or have
side effects stay. Placeholders stay too (see :class:`RemoveUnusedInputs`).
Afterwards, submodules and parameters that no remaining ``get_attr`` reads are
deleted from the ``GraphModule`` (captured graphs hold their parameters
directly, under flat names): a variant holds only the weights it uses.
Guarantees: outputs are unchanged.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import GraphPass, PassResult

aten = torch.ops.aten

# Operators that allocate a fresh tensor (nothing outside the graph can see its storage).
_ALLOCATIONS = frozenset({aten.empty_like.default, aten.empty.memory_format, aten.empty_strided.default,
                          aten.zeros_like.default, aten.zeros.default, aten.ones_like.default, aten.full_like.default,
                          aten.new_empty.default, aten.new_zeros.default, aten.clone.default})
# Operators whose output is a view of their first argument (the writes through it reach that tensor's storage).
_VIEWS = frozenset({aten.slice.Tensor, aten.select.int, aten.view.default, aten.alias.default,
                    aten.as_strided.default, aten.transpose.int, aten.permute.default, aten.unsqueeze.default,
                    aten.squeeze.dim, aten.squeeze.default, aten.expand.default, aten.unflatten.int,
                    aten.diagonal.default, aten.t.default})


def _keep(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    return node.op == "call_function" and node.is_impure(impure_random=False)


def _storage_root(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in _VIEWS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _local_write(node: fx.Node) -> fx.Node | None:
    """The graph-allocated tensor ``node`` writes in place (through views), if that is all it writes."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    written = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    if written != [0] or node.kwargs.get("out") is not None:
        return None
    root = _storage_root(node.args[0])
    return root if root.op == "call_function" and root.target in _ALLOCATIONS else None


class EliminateDeadCode(GraphPass):
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        before = len(graph.nodes)
        writes: dict[fx.Node, list[fx.Node]] = {}  # allocated tensor -> the in-place writes into it
        for node in graph.nodes:
            root = _local_write(node)
            if root is not None:
                writes.setdefault(root, []).append(node)
        local = {w for ws in writes.values() for w in ws}
        live: set[fx.Node] = set()
        stack = [n for n in graph.nodes if _keep(n) and n not in local]
        while stack:
            node = stack.pop()
            if node in live:
                continue
            live.add(node)
            stack.extend(node.all_input_nodes)
            if node.op == "call_function":  # read: the writes into its storage must run before
                stack.extend(writes.get(_storage_root(node), ()))
        for node in reversed(list(graph.nodes)):
            if node not in live and node.op not in ("placeholder", "output"):
                graph.erase_node(node)
        graph_module.delete_all_unused_submodules()
        read = {n.target for n in graph.nodes if n.op == "get_attr"}
        for name in [*graph_module._parameters, *graph_module._buffers]:
            if name not in read:
                delattr(graph_module, name)
        return PassResult(graph_module, len(graph.nodes) != before)
