"""Graph rewrites that make a variant's graph exportable to ONNX, each keeping what it computes.

:func:`lowered_for_onnx` applies them all to a copy of a variant's ``GraphModule`` (sharing its
parameters):

* :func:`without_noop_squeezes`: squeezes of dimensions whose size is not 1 removed (torch returns
  the input; ONNX ``Squeeze`` rejects them);
* :func:`rms_norms_decomposed`: ``aten.rms_norm`` written out (opset 18 has no RMSNorm);
* :func:`pad_sequences_written_out`: ``aten.pad_sequence`` as pads and a stack (no ONNX op);
* :func:`complex_as_real`: complex tensors carried as real ones with a trailing dimension of 2
  (``view_as_real``), complex products written out (ONNX has no complex type; Z-Image's rotary
  embedding multiplies in complex64);
* :func:`view_writes_functionalized`: ``fill_`` through ``select`` / ``slice`` views of a tensor the
  graph made (Z-Image's attention masks for samples of different lengths, ``mask[i, :n] = 1``) as a
  ``where`` over a constant region (the legacy exporter loses such writes: the mask stays as it was
  made).

Shapes are static, so each rewrite reads them from the nodes' ``val`` metadata.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..core.captured import attribute_of
from ..core.variants import copy_graph_module

__all__ = ["complex_as_real", "lowered_for_onnx", "pad_sequences_written_out", "rms_norms_decomposed",
           "view_writes_functionalized", "without_noop_squeezes"]

aten = torch.ops.aten


def lowered_for_onnx(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its parameters) with every rewrite of this module applied."""
    gm = copy_graph_module(gm)
    for rewrite in (without_noop_squeezes, rms_norms_decomposed, complex_as_real, pad_sequences_written_out,
                    view_writes_functionalized):
        rewrite(gm)
    gm.recompile()
    return gm


def without_noop_squeezes(gm: fx.GraphModule) -> None:
    """Remove, in place, the squeezes of dimensions whose size is not 1.

    torch returns its input for those; ONNX ``Squeeze`` rejects them, and the
    dynamo exporter emits them as they are (PixArt's attention-mask handling
    squeezes a 64-wide dimension at these shapes).
    """
    squeezes = (aten.squeeze.dim, aten.squeeze.dims)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in squeezes:
            continue
        shape = node.args[0].meta["val"].shape
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        if all(shape[d] != 1 for d in dims):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def rms_norms_decomposed(gm: fx.GraphModule) -> None:
    """Write out, in place, each ``aten.rms_norm`` as ``x * rsqrt(mean(x^2) + eps) * weight`` over its
    normalized dimensions: opset 18 has no RMSNorm, and the legacy exporter refuses ``aten::rms_norm``
    (``torch.nn.RMSNorm``: FLUX.2's query/key norms). ``eps`` ``None`` is the dtype's machine epsilon,
    as torch takes it."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.rms_norm.default:
            continue
        names = ("input", "normalized_shape", "weight", "eps")
        bound = {**dict(zip(names, node.args)), **node.kwargs}
        x, shape = bound["input"], bound["normalized_shape"]
        eps = bound.get("eps")
        eps = torch.finfo(x.meta["val"].dtype).eps if eps is None else eps
        dims = list(range(-len(shape), 0))
        with gm.graph.inserting_before(node):
            square = gm.graph.call_function(aten.pow.Tensor_Scalar, (x, 2))
            mean = gm.graph.call_function(aten.mean.dim, (square, dims, True))
            shifted = gm.graph.call_function(aten.add.Scalar, (mean, eps))
            out = gm.graph.call_function(aten.mul.Tensor, (x, gm.graph.call_function(aten.rsqrt.default, (shifted,))))
            if bound.get("weight") is not None:
                out = gm.graph.call_function(aten.mul.Tensor, (out, bound["weight"]))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)


def pad_sequences_written_out(gm: fx.GraphModule) -> None:
    """Write out, in place, each ``aten.pad_sequence`` (``torch.nn.utils.rnn.pad_sequence``: Z-Image's batch of
    per-sample sequences) as each sequence padded to the longest along its first dimension, and a stack."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.pad_sequence.default:
            continue
        names = ("sequences", "batch_first", "padding_value", "padding_side")
        bound = {"batch_first": False, "padding_value": 0.0, "padding_side": "right",
                 **dict(zip(names, node.args)), **node.kwargs}
        sequences = list(bound["sequences"])
        lengths = [seq.meta["val"].shape[0] for seq in sequences]
        longest = max(lengths)
        padded = []
        with gm.graph.inserting_before(node):
            for seq, length in zip(sequences, lengths):
                if length == longest:
                    padded.append(seq)
                    continue
                rank = seq.meta["val"].dim()
                side = [0, longest - length] if bound["padding_side"] == "right" else [longest - length, 0]
                padded.append(gm.graph.call_function(aten.constant_pad_nd.default,
                                                     (seq, [0, 0] * (rank - 1) + side, bound["padding_value"])))
            out = gm.graph.call_function(aten.stack.default, (padded, 0 if bound["batch_first"] else 1))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)


_VIEWS = (aten.select.int, aten.slice.Tensor)
_FILLS = (aten.fill_.Tensor, aten.fill_.Scalar)


def view_writes_functionalized(gm: fx.GraphModule) -> None:
    """Rewrite, in place, each ``fill_`` through a chain of ``select`` / ``slice`` views of a tensor the graph
    computed as ``where(region, value, base)``: ``region`` a constant of the base's shape, true where the views
    reach (the same views, taken of it and filled), ``value`` the fill cast to the base's dtype. Every later
    reader of the base reads the result; the export has no scatter op and the legacy exporter loses a write
    through views (Z-Image's attention masks for samples of different lengths, ``mask[i, :n] = 1``).

    Raises ``NotImplementedError`` naming the op where a write through such views cannot be rewritten so (an
    op other than ``fill_``, a write into a graph input or parameter, a view read again after the write);
    in-place ops on anything but such a chain are left as they are."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if not (schema.is_mutable and schema.arguments and schema.arguments[0].alias_info is not None
                and schema.arguments[0].alias_info.is_write):
            continue
        chain, base = [], node.args[0]
        while isinstance(base, fx.Node) and base.op == "call_function" and base.target in _VIEWS:
            chain.append(base)
            base = base.args[0]
        if not chain:
            continue
        if node.target not in _FILLS or base.op != "call_function" or node.users:
            raise NotImplementedError(f"ONNX export: cannot write the in-place {node.target} ({node.name}) through "
                                      f"views of {base.name} out of place; the legacy exporter would lose it")
        order = {n: i for i, n in enumerate(graph.nodes)}
        stale = [u.name for v in chain for u in v.users if u is not node and u not in chain and order[u] > order[node]]
        if stale:
            raise NotImplementedError(f"ONNX export: {stale} read a view that {node.name} ({node.target}) wrote "
                                      "into; the write cannot be rewritten out of place")
        val = base.meta["val"]
        region = torch.zeros(val.shape, dtype=torch.bool, device=val.device)
        reached = region
        for view in reversed(chain):  # from the base out, as the graph takes them
            reached = view.target(reached, *view.args[1:])
        reached.fill_(True)
        fill = node.args[1]
        if isinstance(fill, fx.Node) and fill.target is aten.lift_fresh_copy.default:
            fill = fill.args[0]  # a copy of a constant (no ONNX op): the constant itself
        names = {"region": region}
        if not isinstance(fill, fx.Node):
            names["value"] = torch.tensor(fill, dtype=val.dtype, device=val.device)
        for kind, tensor in names.items():  # constants of the copy, not weights: nothing of the caller's
            gm.register_buffer(f"_{node.name}_{kind}", tensor, persistent=False)
        with graph.inserting_after(node):
            where = graph.get_attr(f"_{node.name}_region")
        with graph.inserting_after(where):
            value = graph.get_attr(f"_{node.name}_value") if "value" in names else \
                graph.call_function(aten.to.dtype, (fill, val.dtype))
        with graph.inserting_after(value):
            out = graph.call_function(aten.where.self, (where, value, base))
        out.meta = dict(base.meta)
        for user in [u for u in base.users if order.get(u, -1) > order[node]]:
            user.replace_input_with(base, out)
        fill = node.args[1]
        graph.erase_node(node)
        if isinstance(fill, fx.Node) and fill.target is aten.lift_fresh_copy.default and not fill.users:
            graph.erase_node(fill)


def _is_complex(value) -> bool:
    return isinstance(value, fx.Node) and isinstance(value.meta.get("val"), torch.Tensor) \
        and value.meta["val"].dtype.is_complex


def _real_dim(dim: int) -> int:
    """A dimension of a complex tensor as a dimension of its real view (one more trailing dimension)."""
    return dim - 1 if dim < 0 else dim


# Ops that act on a complex tensor's real view unchanged, given the position of their ``dim``
# argument (None: no dimension argument; the real view's extra trailing dimension is untouched).
_VIEW_OPS = {
    aten.alias.default: None,
    aten.clone.default: None,
    aten.index.Tensor: None,  # indices address leading dimensions only
    aten.pad_sequence.default: None,  # pads each sequence's first dimension
    aten.cat.default: 1,
    aten.split_with_sizes.default: 2,
    aten.split.Tensor: 2,
    aten.select.int: 1,
    aten.slice.Tensor: 1,
    aten.unsqueeze.default: 1,
}


def complex_as_real(gm: fx.GraphModule) -> None:
    """Carry every complex tensor of ``gm`` as its real view (``view_as_real``: a trailing dimension of 2), in place.

    A complex constant becomes a real buffer; ``view_as_complex(x)`` becomes ``x``, ``view_as_real(z)`` the
    real form of ``z``; the ops of ``_VIEW_OPS`` run on real forms with their dimension shifted past
    the trailing one; a complex product is written out: ``(a + bi)(c + di) = (ac - bd) + (ad + bc)i``.
    The rewrite stops at the first other op that takes or makes a complex tensor and raises
    ``NotImplementedError`` naming it, so nothing is exported half rewritten.

    Raises:
        NotImplementedError: an op on complex tensors this rewrite does not know.
    """
    real: dict[fx.Node, fx.Node] = {}  # complex node -> node of its real view
    graph = gm.graph

    def as_real(arg):
        if isinstance(arg, (list, tuple)):
            return type(arg)(as_real(a) for a in arg)
        return real.get(arg, arg) if isinstance(arg, fx.Node) else arg

    for node in list(graph.nodes):
        takes = any(_is_complex(a) for a in node.all_input_nodes)
        makes = _is_complex(node) or (node.op == "call_function" and node.target is operator.getitem
                                      and node.args[0] in real)
        if not (takes or makes):
            continue
        with graph.inserting_before(node):
            if node.op == "get_attr":
                value = attribute_of(gm, node.target)
                name = node.target.replace(".", "_") + "_as_real"
                gm.register_buffer(name, torch.view_as_real(value).contiguous(), persistent=False)
                new = graph.get_attr(name)
            elif node.target is aten.view_as_complex.default:
                new = node.args[0]
            elif node.target is aten.view_as_real.default:
                node.replace_all_uses_with(as_real(node.args[0]))
                graph.erase_node(node)
                continue
            elif node.target is operator.getitem:
                new = graph.call_function(operator.getitem, (real[node.args[0]], node.args[1]))
            elif node.target in _VIEW_OPS:
                args, kwargs = list(as_real(node.args)), dict(node.kwargs)
                pos = _VIEW_OPS[node.target]  # a missing dim is 0, the same dimension of the real view
                if pos is not None and len(args) > pos:
                    args[pos] = _real_dim(args[pos])
                elif pos is not None and "dim" in kwargs:
                    kwargs["dim"] = _real_dim(kwargs["dim"])
                new = graph.call_function(node.target, tuple(args), kwargs)
            elif node.target is aten.mul.Tensor and all(_is_complex(a) for a in node.args[:2]):
                new = _complex_product(graph, real[node.args[0]], real[node.args[1]])
            else:
                _unknown(node)
        new.meta = dict(node.meta)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype.is_complex:
            new.meta["val"] = torch.empty((*val.shape, 2), dtype=val.real.dtype, device="meta")
        real[node] = new
    for node in reversed(list(real)):  # complex nodes, last use first
        if not node.users:
            graph.erase_node(node)
    leftover = [n for n in graph.nodes if _is_complex(n)]
    if leftover:
        _unknown(leftover[0])


def _complex_product(graph: fx.Graph, a: fx.Node, b: fx.Node) -> fx.Node:
    """The real form of ``complex(a) * complex(b)`` from the real forms ``a`` and ``b``."""
    def part(x, i):
        return graph.call_function(aten.select.int, (x, -1, i))

    def mul(x, y):
        return graph.call_function(aten.mul.Tensor, (x, y))

    ar, ai, br, bi = part(a, 0), part(a, 1), part(b, 0), part(b, 1)
    re = graph.call_function(aten.sub.Tensor, (mul(ar, br), mul(ai, bi)))
    im = graph.call_function(aten.add.Tensor, (mul(ar, bi), mul(ai, br)))
    return graph.call_function(aten.stack.default, ([re, im], -1))


def _unknown(node: fx.Node):
    raise NotImplementedError(f"the ONNX export carries complex tensors as real ones, and does not know "
                              f"{node.target} on a complex tensor (node {node.name}); ONNX has no complex type")
