"""Regional compilation of graph variants: each distinct block is compiled once, for every variant.

A plan's graph variants (5-6 per plan) differ in a few blocks and share the
rest; compiling each variant's flat graph whole pays for every shared block
again. :class:`RegionalCompiler` instead

1. splits a variant's graph into *regions*: maximal runs of consecutive nodes
   that belong to the same block according to their ``nn_module_stack``
   (see :func:`region_of`: a UNet's resnets, attentions, samplers, a
   transformer's blocks, the top-level modules); cache reads and writes stay
   wherever the variant's graph puts them;
2. turns each region into a *pure function*: a ``GraphModule`` whose inputs
   (the parameters included) are placeholders and whose node names are
   derived from its ops only, so that the same block in two variants, or two
   identical blocks of one model, have the same code;
3. keys a region by that code and its inputs' shapes, strides and dtypes, and
   compiles each key once with the user's compiler; every site calls the
   shared compiled function with its own parameters;
4. runs the rest (the few ops between regions, and regions too small to be
   worth a compile) eagerly, from a top-level ``GraphModule`` that calls the
   regions in graph order.

It is exact by construction: a region is a contiguous slice of the variant's
graph, so the same aten ops run in the same order, and a compiled function
is a function of its inputs alone (dynamo's guards on them stay in force, so
a call it was not compiled for recompiles instead of running wrong code). A
graph it cannot slice this way (a node that is not a plain aten call, an
attribute that is not a tensor) is compiled whole, as without this option,
and the reason is kept in :attr:`RegionalCompiler.fallbacks`.

Example::

    compiler = RegionalCompiler(functools.partial(torch.compile, fullgraph=True))
    run = compiler(variant.graph_module)          # the variant, with its regions compiled once
    outputs = run(*inputs)
    compiler.stats()                              # regions, sites, compiled keys, eager nodes
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .captured import attribute_of

__all__ = ["RegionalCompiler", "region_of", "split_regions"]

# Regions with fewer compute nodes than this run eagerly: a compile costs far more than running them.
MIN_REGION_NODES = 4


def region_of(node: fx.Node) -> str | None:
    """The block a node belongs to, from its innermost ``nn_module_stack`` path; ``None`` for the top level.

    A block is an element of a module list (a path component that is an
    index), the unit that repeats across a model and across variants. The
    path is cut after its first index, and after a second one if a list
    directly follows the first (``down_blocks.0.resnets.1``,
    ``up_blocks.2.attentions.0``, ``mid_block.attentions.0.transformer_blocks.0``,
    but ``transformer_blocks.7`` for ``transformer_blocks.7.ff.net.0``:
    lists deeper inside a block, such as ``to_out`` or ``ff.net``, are parts
    of it); without an index, at its first name (``conv_in``,
    ``time_embedding``).
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    if not path:
        return None
    parts = path.split(".")
    first = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if first is None:
        return parts[0]
    cut = first + 2 if first + 2 < len(parts) and parts[first + 2].isdigit() else first
    return ".".join(parts[:cut + 1])


@dataclass
class Region:
    """A run of consecutive nodes of one block.

    Attributes:
        label: The block (:func:`region_of`), ``None`` for the top level.
        nodes: The run's nodes, in graph order.
        inputs: Values defined before the run (placeholders, attributes, nodes) that it reads, in order of first use.
        outputs: The run's nodes read after it, in graph order.
    """

    label: str | None
    nodes: list[fx.Node]
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)

    @property
    def compute_nodes(self) -> int:
        return sum(1 for n in self.nodes if n.target is not operator.getitem)


def _unsupported(gm: fx.GraphModule) -> str | None:
    """Why ``gm`` cannot be sliced into pure regions, or ``None``."""
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_method"):
            return f"node {node.name} is a {node.op}, not a plain function call"
        if node.op == "get_attr" and not isinstance(attribute_of(gm, node.target), torch.Tensor):
            return f"attribute {node.target} is a {type(attribute_of(gm, node.target)).__name__}, not a tensor"
    return None


def split_regions(graph: fx.Graph) -> list[Region]:
    """The graph's compute nodes as runs of consecutive nodes of one block (see :func:`region_of`).

    A ``getitem`` joins the run of the node it reads, when that node ends
    the run just before it: multi-output ops stay whole in one region.
    """
    runs: list[Region] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        label = region_of(node)
        if node.target is operator.getitem and runs and isinstance(node.args[0], fx.Node) \
                and node.args[0] in runs[-1].nodes:
            label = runs[-1].label
        if runs and runs[-1].label == label:
            runs[-1].nodes.append(node)
        else:
            runs.append(Region(label, [node]))
    for region in runs:
        inside = set(region.nodes)
        seen: dict[fx.Node, None] = {}
        for node in region.nodes:
            for arg in node.all_input_nodes:
                if arg not in inside:
                    seen.setdefault(arg, None)
        region.inputs = list(seen)
        region.outputs = [n for n in region.nodes if any(u not in inside for u in n.users)]
    return runs


def _example(node: fx.Node, gm: fx.GraphModule) -> Any:
    return attribute_of(gm, node.target) if node.op == "get_attr" else node.meta.get("val")


def _describe(value: Any) -> Any:
    """What a compiled region is specialised on for an input value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device.type,
                value.requires_grad)
    return ("value", repr(value))


def _pure_function(region: Region) -> fx.GraphModule:
    """The region as a ``GraphModule`` of its inputs alone, with node names made from its ops."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(region.inputs):
        env[node] = graph.placeholder(f"in_{i}")
        if "val" in node.meta:
            env[node].meta["val"] = node.meta["val"]
    for node in region.nodes:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        env[node] = graph.create_node("call_function", node.target, args, kwargs)  # named by its target
        if "val" in node.meta:
            env[node].meta["val"] = node.meta["val"]
    graph.output(tuple(env[n] for n in region.outputs))
    return fx.GraphModule(torch.nn.Module(), graph, class_name="Region")


class _RegionCall(torch.nn.Module):
    """A site of a region: calls the compiled function shared by every site of its key."""

    def __init__(self, function: Callable, key: str):
        super().__init__()
        self.function = function
        self.key = key

    def forward(self, *args):
        return self.function(*args)

    def extra_repr(self) -> str:
        return f"key={self.key[:12]}"


@dataclass
class _Compiled:
    function: Callable
    code: str
    sites: int = 0


class RegionalCompiler:
    """Compiles graph variants region by region, each distinct region once (see the module docstring).

    Args:
        compiler: ``compiler(fn)`` returns the compiled ``fn``, e.g.
            ``functools.partial(torch.compile, fullgraph=True)`` or a dynamo
            context; it is applied to each distinct region, and to a whole
            graph that cannot be split.
        min_region_nodes: Regions with fewer compute nodes run eagerly.

    A compiled region is a pure function of its inputs and is never stale:
    it stays shared across variants, captures and recaptures of a runtime.
    """

    def __init__(self, compiler: Callable, min_region_nodes: int = MIN_REGION_NODES):
        self.compiler = compiler
        self.min_region_nodes = min_region_nodes
        self.compiled: dict[str, _Compiled] = {}
        self.fallbacks: list[str] = []
        self.graphs = 0
        self.eager_nodes = 0

    def __call__(self, gm: fx.GraphModule) -> Callable:
        """``gm`` (a flat aten graph with tensor attributes) as a callable whose regions are compiled."""
        reason = _unsupported(gm)
        if reason is not None:
            self.fallbacks.append(reason)
            return self.compiler(gm.forward)
        self.graphs += 1
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        owners: dict[str, Any] = {}
        sites = 0
        regions = {id(n): r for r in split_regions(gm.graph) for n in r.nodes}
        done: set[int] = set()
        for node in gm.graph.nodes:
            if node.op == "call_function":
                region = regions[id(node)]
                if id(region) in done:
                    continue
                done.add(id(region))
                if region.label is None or region.compute_nodes < self.min_region_nodes or not region.outputs:
                    self.eager_nodes += len(region.nodes)
                    for n in region.nodes:
                        env[n] = graph.node_copy(n, lambda a: env[a])
                    continue
                name, sites = f"region_{sites}", sites + 1
                owners[name] = _RegionCall(*self._function(region, gm))
                call = graph.call_module(name, tuple(env[n] for n in region.inputs))
                for i, out in enumerate(region.outputs):
                    env[out] = graph.call_function(operator.getitem, (call, i))
                    if "val" in out.meta:
                        env[out].meta["val"] = out.meta["val"]
            else:
                env[node] = graph.node_copy(node, lambda a: env[a])
                if node.op == "get_attr":
                    owners[node.target] = attribute_of(gm, node.target)  # the same tensor: no weight is copied
        return fx.GraphModule(owners, graph, class_name="RegionalVariant")

    def _function(self, region: Region, gm: fx.GraphModule) -> tuple[Callable, str]:
        pure = _pure_function(region)
        code = "\n".join(line for line in pure.code.splitlines() if not line.strip().startswith("#"))
        signature = repr([_describe(_example(n, gm)) for n in region.inputs])
        key = hashlib.sha256((code + signature).encode()).hexdigest()
        entry = self.compiled.get(key)
        if entry is None:
            # A GraphModule of its own per key: dynamo keeps compiled code per code object, and
            # two keys sharing one would make it recompile with dynamic shapes.
            entry = self.compiled[key] = _Compiled(self.compiler(pure.forward), code)
        entry.sites += 1
        return entry.function, key

    def stats(self) -> dict[str, int]:
        """Graphs split, region sites, distinct regions compiled, nodes run eagerly, graphs compiled whole."""
        return {"graphs": self.graphs, "sites": sum(c.sites for c in self.compiled.values()),
                "regions": len(self.compiled), "eager_nodes": self.eager_nodes, "whole": len(self.fallbacks)}
