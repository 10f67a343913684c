"""Run an attention core on one part of its queries: the rows one input of the queries' join gives.

A joint attention (SD3's, FLUX's, Qwen-Image's) joins the text and the image
queries along the token dimension (``aten.cat``), may apply row-wise ops to
the joined queries (a rotary embedding, layout changes), attends over the
joined keys, and splits the output rows back into the streams. When only the
rows of one part are read afterwards (the other stream's output comes from a
cache), the other part's queries, and everything computing them, are dead
weight that dead-code elimination cannot remove: the core reads them.

Takes, per site, the core (an ``aten.scaled_dot_product_attention`` node), the
*join* (an ``aten.cat`` of the query parts, upstream of the core's query) and
which part to *keep*. Inserts a copy of the ops from the join to the query
with the kept part in place of the join (other operands that have the token
dimension, such as the rotary embedding's ``cos``/``sin``, sliced to the kept
rows; shape arguments rewritten), a copy of the core on those queries (a mask
with a query dimension sliced too; keys and values are untouched), and a copy
of the layout ops between the core and the split of its output (a
``slice`` or ``split_with_sizes`` along the token dimension). What read the
kept rows of the split now reads the copy; the original core is left for the
rows of the other part (dead, and removed by dead-code elimination, when
nothing reads them). Each output row of an attention depends only on its
own query, so the kept rows are the same values (bit for bit on the CPU's
kernels; within rounding on any kernel that blocks queries otherwise).

Raises ``ValueError`` when an op between the join and the query, or between
the core and the split, is not one the pass can restrict (its token
dimension cannot be told, or it mixes rows).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.fx as fx

from ..core.graph_passes import GraphPass, PassResult, new_node, nodes_between

__all__ = ["QueryRows", "RestrictQueries"]

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_SHAPED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# Ops whose other tensor operands broadcast against the rows (a rotary embedding's cos and sin).
_ELEMENTWISE = {aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.addcmul.default,
                aten.where.self}
# Layout and dtype ops that move rows without mixing them (between the core and the split of its output).
_LAYOUT = {aten.permute.default, aten.transpose.int, aten.flatten.using_ints, aten.unflatten.int, aten.clone.default,
           aten.contiguous.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.alias.default,
           *_SHAPED}
_BIG = 2 ** 62


class QueryRows(NamedTuple):
    """A joint attention to run on one part of its queries: the ``core``, the ``join`` (an ``aten.cat`` of
    the query parts along the token dimension) and ``keep``, the index of the part to keep in the join."""

    core: fx.Node
    join: fx.Node
    keep: int


def _shape(node) -> tuple[int, ...]:
    val = node.meta["val"] if isinstance(node, fx.Node) else node
    return tuple(val.shape)


def _first(val):
    return val[0] if isinstance(val, (tuple, list)) else val


def _rows_shape(shape: list, in_shape: tuple[int, ...], dim: int, total: int, length: int, where: str) -> list:
    """A view's target ``shape`` with the token dimension of its input (``dim`` of ``in_shape``) set to ``length``."""
    outer = math.prod(in_shape[:dim])
    hits, prefix = [], 1
    for i, s in enumerate(shape):
        if prefix == outer and s in (total, -1):
            hits.append(i)
        if s == -1:
            break
        prefix *= s
    if len(hits) != 1:
        raise ValueError(f"cannot tell the token dimension of {where}'s shape {list(shape)} (input {list(in_shape)}, "
                         f"{total} tokens at dim {dim})")
    out = list(shape)
    if out[hits[0]] != -1:
        out[hits[0]] = length
    return out


def _changed_dim(old: tuple[int, ...], new: tuple[int, ...], total: int, length: int, where: str) -> int:
    dims = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
    if len(old) != len(new) or len(dims) != 1 or (old[dims[0]], new[dims[0]]) != (total, length):
        raise ValueError(f"{where} did not keep its rows apart when restricted ({list(old)} -> {list(new)}, "
                         f"{total} -> {length} tokens)")
    return dims[0]


class _Rows:
    """The copy of one site's row-wise ops on the kept rows: node -> copy, and each copy's token dimension."""

    def __init__(self, graph: fx.Graph, start: int, length: int, total: int):
        self.graph, self.start, self.length, self.total = graph, start, length, total
        self.env: dict[fx.Node, fx.Node] = {}
        self.dim: dict[fx.Node, int] = {}

    def slice(self, node: fx.Node, dim: int, like: fx.Node) -> fx.Node:
        return new_node(self.graph, aten.slice.Tensor, (node, dim, self.start, self.start + self.length), like=like)

    def copy(self, node: fx.Node) -> fx.Node:
        if node.op != "call_function":
            raise ValueError(f"cannot restrict the rows of {node.op} node {node.name}")
        inner = [a for a in node.all_input_nodes if a in self.env]
        dims = {self.dim[self.env[a]] + len(_shape(_first(node.meta["val"]))) - len(_shape(_first(a.meta["val"])))
                for a in inner if node.target in _ELEMENTWISE}
        out_dim = dims.pop() if len(dims) == 1 else None

        def operand(a):
            if a in self.env:
                return self.env[a]
            val = a.meta.get("val")
            if not isinstance(val, torch.Tensor) or out_dim is None:
                return a
            aligned = out_dim - (len(_shape(_first(node.meta["val"]))) - val.ndim)
            if aligned >= 0 and val.shape[aligned] == self.total:
                return self.slice(a, aligned, a)
            return a

        args = fx.node.map_arg(node.args, operand)
        if node.target in _SHAPED:
            src = node.args[0]
            args = (args[0], _rows_shape(list(args[1]), _shape(src), self.dim[self.env[src]], self.total,
                                         self.length, node.name), *args[2:])
        elif node.target is aten.expand.default:
            raise ValueError(f"cannot restrict the rows of {node.name}: an expand")
        kwargs = fx.node.map_arg(node.kwargs, operand)
        new = new_node(self.graph, node.target, args, like=node, kwargs=kwargs)
        if node.target is operator.getitem and node.args[0] in self.env:
            self.dim[new] = self.dim[self.env[node.args[0]]]
        else:
            self.dim[new] = _changed_dim(_shape(_first(node.meta["val"])), _shape(_first(new.meta["val"])),
                                         self.total, self.length, node.name)
        self.env[node] = new
        return new


def _kept(node: fx.Node, dim: int, start: int, length: int, total: int) -> bool | None:
    """For a ``slice`` along ``dim``: whether it selects exactly the kept rows (``True``), rows outside them
    (``False``) or a mix (``None``)."""
    lo = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    hi = node.args[3] if len(node.args) > 3 and node.args[3] is not None else _BIG
    lo, hi = (x + total if x < 0 else min(x, total) for x in (lo, hi))
    if (lo, hi) == (start, start + length):
        return True
    if hi <= start or lo >= start + length:
        return False
    return None


class RestrictQueries(GraphPass):
    """See the module docstring. :attr:`cores` maps each site's core to its restricted copy after a run."""

    def __init__(self, sites: Sequence[QueryRows]):
        self.sites = [QueryRows(*s) for s in sites]
        self.cores: dict[fx.Node, fx.Node] = {}

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        self.cores = {}
        for core, join, keep in self.sites:
            if core.target is not SDPA or join.target is not aten.cat.default:
                raise ValueError(f"restricting queries needs an attention core and a cat of the queries, got "
                                 f"{core.target} and {join.target}")
            parts = list(join.args[0])
            rank = len(_shape(join))
            dim = (join.args[1] if len(join.args) > 1 else join.kwargs.get("dim", 0)) % rank
            sizes = [_shape(p)[dim] for p in parts]
            if not 0 <= keep < len(parts):
                raise ValueError(f"{join.name} joins {len(parts)} parts; cannot keep part {keep}")
            start, length, total = sum(sizes[:keep]), sizes[keep], sum(sizes)
            query = core.args[0]
            region = [] if query is join else nodes_between(join, query)
            rows = _Rows(graph, start, length, total)
            rows.env[join], rows.dim[parts[keep]] = parts[keep], dim
            with graph.inserting_before(core):
                for node in region:
                    rows.copy(node)
                q = rows.env[query]
                args = list(core.args)
                kwargs = dict(core.kwargs)
                mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
                if isinstance(mask, fx.Node) and _shape(mask)[-2] == total:
                    mask = rows.slice(mask, len(_shape(mask)) - 2, mask)
                    if len(args) > 3:
                        args[3] = mask
                    else:
                        kwargs["attn_mask"] = mask
                new_core = new_node(graph, SDPA, (q, *args[1:]), like=core, kwargs=kwargs)
            rows.env[core], rows.dim[new_core] = new_core, rows.dim[q]
            self.cores[core] = new_core
            if not self._rewire(core, rows):
                raise ValueError(f"no read of the kept rows of {core.name}'s output found (a slice or a split "
                                 "of its rows after layout ops)")
        return PassResult(graph_module, bool(self.sites))

    def _rewire(self, node: fx.Node, rows: _Rows) -> bool:
        """Point what reads the kept rows of ``node`` (downstream of the core) at their copy; whether any did."""
        copy = rows.env[node]
        dim = rows.dim[copy]
        found = False
        for user in list(node.users):
            if user.target is aten.slice.Tensor and user.args[1] % len(_shape(node)) == dim:
                kept = _kept(user, dim, rows.start, rows.length, rows.total)
                if kept is None:
                    raise ValueError(f"{user.name} reads rows of both parts of {node.name}")
                if kept:
                    user.replace_all_uses_with(copy)
                    found = True
            elif user.target is aten.split_with_sizes.default and user.args[2] % len(_shape(node)) == dim:
                bounds = [0]
                for s in user.args[1]:
                    bounds.append(bounds[-1] + s)
                for item in list(user.users):
                    lo, hi = bounds[item.args[1]], bounds[item.args[1] + 1]
                    if (lo, hi) == (rows.start, rows.start + rows.length):
                        item.replace_all_uses_with(copy)
                        found = True
                    elif not (hi <= rows.start or lo >= rows.start + rows.length):
                        raise ValueError(f"{item.name} reads rows of both parts of {node.name}")
            elif user.target in _LAYOUT and user.args[0] is node:
                with rows.graph.inserting_after(user):
                    rows.copy(user)
                found = self._rewire(user, rows) or found
            else:
                raise ValueError(f"{node.name}'s rows reach {user.name} ({user.target}) before they are split")
        return found
