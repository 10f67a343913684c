"""Insert a torch function into a graph, traced: passes write their math as Python, not as aten nodes.

:func:`call_traced` traces ``fn`` with ``make_fx`` on the fake values of its
node arguments (in the graph's own fake mode) and copies the traced aten
nodes into the graph at its insertion point. The new nodes carry
``meta["val"]`` and the provenance of ``like`` (its module stack and stack
trace), so the rewritten graph reads as part of the code it extends. Any
argument that is not an ``fx.Node`` (numbers, shapes, flags) is a constant of
the trace; ``fn`` must not create tensor constants (``ValueError``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

__all__ = ["call_traced"]

_PROVENANCE = ("nn_module_stack", "stack_trace", "source_fn_stack")


def call_traced(graph: fx.Graph, fn: Callable[..., Any], *args: Any, like: fx.Node, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` as nodes of ``graph`` at its insertion point (use ``inserting_before``: under
    ``inserting_after`` fx would insert the nodes in reverse order); returns the output node(s).

    ``args`` may mix ``fx.Node`` s of ``graph`` (traced as tensors of their ``meta["val"]``) and constants;
    ``kwargs`` are constants. The result has ``fn``'s output structure (a node, or a tuple of nodes).
    """
    positions = [i for i, a in enumerate(args) if isinstance(a, fx.Node)]
    vals = [args[i].meta["val"] for i in positions]
    mode = detect_fake_mode(vals) or detect_fake_mode([like.meta.get("val")])
    if mode is None:
        raise ValueError(f"call_traced({getattr(fn, '__name__', fn)}) needs fake values in the graph (meta['val'])")

    def traced(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        return fn(*full, **kwargs)

    with mode:
        # pre-dispatch: the ops as written (aten.to, argsort), not their decompositions (_to_copy, sort), which
        # some ONNX exporters do not know
        sub = make_fx(traced, tracing_mode="fake", pre_dispatch=True)(*vals)
    env: dict[fx.Node, Any] = {}
    placeholders = iter(args[i] for i in positions)
    result = None
    for node in sub.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "call_function":
            new = graph.call_function(node.target, fx.node.map_arg(node.args, env.__getitem__),
                                      fx.node.map_arg(node.kwargs, env.__getitem__))
            new.meta["val"] = node.meta["val"]
            for key in _PROVENANCE:
                if key in like.meta:
                    new.meta[key] = like.meta[key]
            env[node] = new
        elif node.op == "output":
            result = pytree.tree_map(lambda n: env[n] if isinstance(n, fx.Node) else n, node.args[0])
        else:
            raise ValueError(f"call_traced({getattr(fn, '__name__', fn)}): the trace holds a {node.op} node "
                             f"({node.target}); pass tensors as arguments instead of creating constants")
    if isinstance(result, (list, tuple)) and len(result) == 1:
        return result[0]
    return tuple(result) if isinstance(result, list) else result
