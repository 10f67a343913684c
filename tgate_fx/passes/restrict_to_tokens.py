"""Run a token-wise region of a graph on chosen tokens only: gather the rows, copy the region for k rows.

Takes, per region, its *source* (a ``(B, N, C)`` value), its *output* (a
``(B, N, ...)`` value computed from the source) and an *index* node
``(B, k)`` of int64 token positions, ``0 < k < N``. The region is every node
on a path from the source to the output. Assumes the region is token-wise:
row ``n`` of the output depends only on row ``n`` of the source (and on
values that have no token dimension, such as text keys, a mask, weights),
e.g. a cross-attention whose queries come from the source, or an MLP with
its norm. Values with a token dimension that the region reads but that do
not depend on the source (a cached attention output next to an MLP branch)
must be named as the region's *gathered* values. Inserts
``gather(source, 1, index)`` (and of each gathered value) and a copy of the
region on those ``k`` rows, right before the output's first user; other
values of the region that do not depend on the source are shared, not
copied. Shape arguments
(``view``/``reshape``/``expand``) that name the token count are rewritten
for ``k`` (``ValueError`` if the token dimension cannot be told apart).
Guarantees: the original region is untouched; new nodes carry
``meta["val"]`` and the provenance (and region tag, without ``value``) of the
node they copy; :attr:`RestrictToTokens.copies` maps each region node to its
copy, per region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.fx as fx

from ..core.meta import TAG
from ..core.graph_passes import GraphPass, PassResult, first_user, new_node, nodes_between

__all__ = ["RestrictToTokens", "TokenRegion"]

aten = torch.ops.aten
_SHAPED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


class TokenRegion(NamedTuple):
    """A token-wise region: its source ``(B, N, C)``, its output, and the ``(B, k)`` token index to run it on.

    ``gathered``: other ``(B, N, C)`` values the region reads row by row (e.g. a cached attention output
    concatenated with the source's MLP branch); the copy reads their rows at the index too.
    """

    source: fx.Node
    output: fx.Node
    index: fx.Node
    gathered: tuple[fx.Node, ...] = ()


def _shape(node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def _token_shape(shape: list, old_in: tuple[int, ...], dim: int, n: int, k: int, where: str) -> list:
    """``shape`` (a view's target) with the token dimension of an input of shape ``old_in`` (token dim ``dim``) set to k."""
    if -1 in shape:
        return list(shape)
    outer = math.prod(old_in[:dim])
    hits = [i for i in range(len(shape)) if math.prod(shape[:i]) == outer and shape[i] == n]
    if len(hits) != 1:
        raise ValueError(f"cannot tell the token dimension of {where}'s shape {list(shape)} (input {list(old_in)}, "
                         f"{n} tokens at dim {dim}); the region is not restrictable")
    out = list(shape)
    out[hits[0]] = k
    return out


def _changed_dim(old: tuple[int, ...], new: tuple[int, ...], where: str) -> int | None:
    if len(old) != len(new):
        raise ValueError(f"{where} changed rank when restricted ({old} -> {new})")
    dims = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
    if len(dims) > 1:
        raise ValueError(f"{where} changed more than one dimension when restricted ({old} -> {new})")
    return dims[0] if dims else None


class RestrictToTokens(GraphPass):
    def __init__(self, regions: Sequence[TokenRegion]):
        self.regions = [TokenRegion(*r) for r in regions]
        self.copies: list[dict[fx.Node, fx.Node]] = []

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        self.copies = []
        for source, output, index, gathered in self.regions:
            for node in (source, output, index, *gathered):
                if node.graph is not graph:
                    raise ValueError(f"node {node.name} is not in the graph this pass runs on")
            b, n = _shape(source)[:2]
            k = _shape(index)[1]
            if len(_shape(source)) != 3 or _shape(index)[0] != b or not 0 < k < n:
                raise ValueError(f"restricting {source.name} {_shape(source)} to index {index.name} "
                                 f"{_shape(index)}: need a (B, N, C) source and a (B, k) index with 0 < k < N")
            for side in gathered:
                if len(_shape(side)) != 3 or _shape(side)[:2] != (b, n):
                    raise ValueError(f"gathered value {side.name} {_shape(side)} is not (B, N, C) with the "
                                     f"source's B = {b} and N = {n}")
            region = nodes_between(source, output)
            anchor = first_user(output)
            ctx = graph.inserting_before(anchor) if anchor is not None else graph.inserting_after(output)
            with ctx:
                env: dict[fx.Node, fx.Node] = {}
                token_dim: dict[fx.Node, int] = {}
                for value in (source, *gathered):
                    wide = new_node(graph, aten.unsqueeze.default, (index, -1), like=value)
                    wide = new_node(graph, aten.expand.default, (wide, [b, k, _shape(value)[2]]), like=value)
                    env[value] = new_node(graph, aten.gather.default, (value, 1, wide), like=value)
                    token_dim[env[value]] = 1
                for node in region:
                    if node.op != "call_function":
                        raise ValueError(f"cannot restrict {node.op} node {node.name}")
                    args = fx.node.map_arg(node.args, lambda a: env.get(a, a))
                    if node.target in _SHAPED or node.target is aten.expand.default:
                        inp = node.args[0]
                        dim = token_dim.get(env[inp]) if inp in env else None
                        if dim is not None:
                            if node.target is aten.expand.default:
                                shape = list(args[1])
                                out_dim = dim + len(shape) - len(_shape(inp))
                                if shape[out_dim] == n:
                                    shape[out_dim] = k
                            else:
                                shape = _token_shape(list(args[1]), _shape(inp), dim, n, k, node.name)
                            args = (args[0], shape, *args[2:])
                    kwargs = fx.node.map_arg(node.kwargs, lambda a: env.get(a, a))
                    new = new_node(graph, node.target, args, like=node, kwargs=kwargs)
                    if TAG in node.meta:
                        new.meta[TAG] = {key: v for key, v in node.meta[TAG].items() if key != "value"}
                    if isinstance(new.meta["val"], torch.Tensor):
                        dim = _changed_dim(_shape(node), _shape(new), node.name)
                        if dim is not None:
                            token_dim[new] = dim
                    env[node] = new
            self.copies.append(env)
        return PassResult(graph_module, bool(self.regions))
