"""Shared pass machinery: the pass base class and fake-tensor metadata for new nodes."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.passes.infra.pass_base import PassBase, PassResult


__all__ = ["GraphPass", "PassResult", "downstream", "first_user", "new_node", "nodes_between", "upstream"]


class GraphPass(PassBase):
    """A pass over a flat captured graph, linted after it runs.

    Passes change ``graph_module.graph`` only; call ``graph_module.recompile()``
    once after the last of a sequence (regenerating the code of a graph with
    thousands of nodes after every pass would dominate the build time).
    """

    def ensures(self, graph_module: fx.GraphModule) -> None:
        graph_module.graph.lint()


def new_node(graph: fx.Graph, target: Any, args: tuple, like: fx.Node | None = None,
             kwargs: dict | None = None) -> fx.Node:
    """Create ``target(*args, **kwargs)`` at the graph's insertion point, with ``meta["val"]`` and the
    provenance of ``like``.

    The value is computed on fake tensors (in the fake mode of the tensor arguments, or of ``like``'s value
    for a factory with none), so shapes and dtypes are exactly what the operator produces; the node inherits
    ``like``'s module stack and stack trace, so it reads as part of the code it replaces.
    """
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    vals = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    leaves = [v for v in torch.utils._pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)]
    if not leaves and like is not None and isinstance(like.meta.get("val"), torch.Tensor):
        leaves = [like.meta["val"]]  # a factory (rand, zeros): its value must live in the graph's fake mode
    with detect_fake_mode(leaves) or torch._subclasses.FakeTensorMode():
        node.meta["val"] = target(*vals[0], **vals[1])
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    return node


def first_user(node: fx.Node) -> fx.Node | None:
    """The user of ``node`` that comes first in the graph (``None`` if it has none).

    Walks forward from ``node`` (users always come after it): linear in the distance, with no list of the
    graph's nodes.
    """
    users = set(node.users)
    cur = node.next
    while users and cur.op != "root":
        if cur in users:
            return cur
        cur = cur.next
    return None


def upstream(roots, stop=()) -> set[fx.Node]:
    """``roots`` and every node they are computed from, not walking past the ``stop`` nodes (which are
    included where reached): what the roots depend on once the stop nodes become inputs."""
    out: set[fx.Node] = set()
    stack, stop = list(roots), set(stop)
    while stack:
        node = stack.pop()
        if node not in out:
            out.add(node)
            if node not in stop:
                stack.extend(node.all_input_nodes)
    return out


def downstream(roots, within=None) -> set[fx.Node]:
    """``roots`` and every node computed from them (only through the nodes of ``within``, if given)."""
    out, stack = set(roots), list(roots)
    while stack:
        for user in stack.pop().users:
            if user not in out and (within is None or user in within):
                out.add(user)
                stack.append(user)
    return out


def nodes_between(source: fx.Node, target: fx.Node) -> list[fx.Node]:
    """The nodes on a path from ``source`` to ``target`` (``source`` excluded, ``target`` included), in graph order.

    Raises:
        ValueError: if ``target`` is not computed from ``source``.
    """
    below = downstream(source.users)
    if target not in below:
        raise ValueError(f"{target.name} is not computed from {source.name}: no region to restrict")
    above = upstream([target])
    return [n for n in target.graph.nodes if n in below and n in above]
