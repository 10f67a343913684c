"""Build graph variants: a captured graph specialised by the passes for one step's rewrites.

A step's :class:`~tgate_fx.core.plan.VariantSpec` names rewrites by method
and group; here they meet a concrete graph. :func:`resolve` expands each
rewrite to the nodes its method tagged, and settles how the rewrites of
several methods combine, the way the eager reference code behaves:

* two methods rewriting the same node (other than both recording it) is a
  conflict: ``ValueError`` naming both methods and the site;
* a read of a cache that no earlier step of the generation wrote is not
  made: the value is computed (the reference's processors fall back to
  computing when their cache is empty);
* a record or read of a value that the step's other reads leave dead (e.g. an
  attention site inside the UNet blocks DeepCache skips) is not made: the
  value is not computed at that step, so nothing is recorded; a transform of
  such a value is not made either;
* a value one method records while another method reads it from its own
  cache at that step is recorded as read (it is what the step uses there).

A transform's pass may also read and write caches: :func:`build_variant`
hands :meth:`~tgate_fx.core.method.Method.transform_pass` the variant's
:class:`CacheIO`. A read is a new input named after its
key (or, if an earlier transform of the same graph wrote that key, that
value); each write becomes an output after the records. The method must
make sure a cache its transforms read exists when the step runs (the
runtime does not fall back to computing it).

:func:`build_variant` then runs the passes on a copy of the graph (sharing
its parameters): :class:`~tgate_fx.core.graph_passes.ExposeValues` for the records,
:class:`~tgate_fx.core.graph_passes.ReplaceValuesWithCache` for the reads,
:class:`~tgate_fx.core.graph_passes.EliminateDeadCode` and
:class:`~tgate_fx.core.graph_passes.RemoveUnusedInputs`. A variant's calling convention:
inputs by placeholder name (the call's tensors, then cache reads
``cache_<method>_<site>_<slot>``); outputs ``(prediction, *writes)`` in
:attr:`Variant.records` order (the head of a choice step: ``(None, *writes)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from .graph_passes import DropPrediction, EliminateDeadCode, ExposeValues, RemoveUnusedInputs, ReplaceValuesWithCache
from .graph_passes import upstream
from .analysis import Regions, analyze
from .captured import Capture
from .method import CFG_MEAN, RECORD, REUSE, TRANSFORM, CacheKey, Method, Rewrite, tagged_nodes
from .plan import Plan, StepPlan, VariantSpec

__all__ = ["CacheIO", "CapturedGraphs", "Resolved", "Variant", "build_variant", "copy_graph_module", "resolve",
           "walk_plan"]


@dataclass(frozen=True)
class Resolved:
    """A spec's rewrites on one graph: the nodes to expose and to replace, by cache key.

    Attributes:
        spec: The step's spec.
        records: ``(cache key, cfg_mean)`` of each write, in graph order (a transform's writes after the
            records; for them ``cfg_mean`` is :meth:`CacheIO.write`'s ``mean``: averaged by the runtime
            across the calls of a split-CFG step, not in the graph).
        reads: Cache keys read, in graph order.
        skipped: ``(cache key, reason)`` of each rewrite not made.
        transforms: ``(method, option, keys of the nodes)`` of each transform, keys in graph order.
    """

    spec: VariantSpec
    records: tuple[tuple[CacheKey, bool], ...]
    reads: tuple[CacheKey, ...]
    skipped: tuple[tuple[CacheKey, str], ...] = ()
    transforms: tuple[tuple[str, Any, tuple[CacheKey, ...]], ...] = ()

    def alternative_name(self) -> str:
        """``<spec name>~<digest>``: the name of a second resolution of one spec in one capture."""
        digest = hashlib.sha1(repr((self.records, self.reads)).encode()).hexdigest()[:6]
        return f"{self.spec.name}~{digest}"


def _live(graph: fx.Graph, cut: set[fx.Node], roots: list[fx.Node] | None = None) -> set[fx.Node]:
    """Nodes the graph's outputs (or ``roots``) depend on when the ``cut`` nodes become inputs (cut nodes
    included)."""
    return upstream(graph.output_node().all_input_nodes if roots is None else roots, stop=cut)


def _targets(graph: fx.Graph, spec: VariantSpec) -> list[tuple[fx.Node, CacheKey, Rewrite]]:
    targets: dict[tuple[fx.Node, Rewrite], CacheKey] = {}
    owner: dict[fx.Node, tuple[CacheKey, Rewrite]] = {}
    for rewrite in sorted(spec.rewrites, key=str):
        for node, key in tagged_nodes(graph, rewrite.method, rewrite.group):
            if node in owner:
                other_key, other = owner[node]
                pair = {other.action, rewrite.action}
                if pair == {REUSE} and spec.chooser in (other.method, rewrite.method) and other.method != rewrite.method:
                    # an alternative of a choice step: the chooser's read of the head's value stands
                    if rewrite.method == spec.chooser:
                        del targets[node, other]
                        owner[node] = (key, rewrite)
                        targets[node, rewrite] = key
                    continue
                if other.method != rewrite.method and pair not in ({RECORD}, {RECORD, REUSE}):
                    raise ValueError(
                        f"methods {other.method!r} and {rewrite.method!r} cannot be composed: both rewrite node "
                        f"{node.name} ({other.action} of {other_key.site!r} vs {rewrite.action} of {key.site!r})")
            owner.setdefault(node, (key, rewrite))
            targets[node, rewrite] = key
    return [(node, key, rewrite) for (node, rewrite), key in targets.items()]


def resolve(graph: fx.Graph, spec: VariantSpec, available: Iterable[CacheKey] | None = None) -> Resolved:
    """Settle ``spec`` on a tagged ``graph``, given the caches written so far (``None``: all)."""
    targets = _targets(graph, spec)
    order = {n: i for i, n in enumerate(graph.nodes)}
    available = None if available is None else set(available)
    skipped = []
    reads = []
    for node, key, rewrite in targets:
        if rewrite.action == REUSE:
            if available is None or key in available:
                reads.append((node, key))
            else:
                skipped.append((key, "not written yet: computed"))
    # The head of a choice step computes only what its method records there.
    roots = [n for n, _, r in targets if r.method == spec.head and r.action == RECORD] if spec.head else None
    live = _live(graph, {n for n, _ in reads}, roots)
    for node, key in list(reads):
        if node not in live:
            reads.remove((node, key))
            skipped.append((key, "read: value not needed at this step"))
    cut = {n for n, _ in reads}
    readers = {n: k.method for n, k in reads}
    records = []
    for node, key, rewrite in targets:
        if rewrite.action != RECORD:
            continue
        if node in live and (node not in cut or readers[node] != key.method):
            records.append((node, key, rewrite.reduce == CFG_MEAN))
        else:
            skipped.append((key, "record: value not computed at this step"))
    transforms: dict[tuple[str, Any], list[tuple[fx.Node, CacheKey]]] = {}
    for node, key, rewrite in targets:
        if rewrite.action != TRANSFORM:
            continue
        if node in live and node not in cut:
            transforms.setdefault((rewrite.method, rewrite.option), []).append((node, key))
        else:
            skipped.append((key, "transform: value not computed at this step"))
    records.sort(key=lambda t: order[t[0]])
    reads.sort(key=lambda t: order[t[0]])
    return Resolved(spec, tuple((k, mean) for _, k, mean in records), tuple(k for _, k in reads),
                    tuple(sorted(set(skipped))),
                    tuple((m, opt, tuple(k for _, k in sorted(nodes, key=lambda t: order[t[0]])))
                          for (m, opt), nodes in transforms.items()))


@dataclass(eq=False)
class Variant:
    """A specialised graph and how to call it.

    Attributes:
        spec: The step spec it was built for.
        resolved: How the spec's rewrites landed on the graph.
        graph_module: The rewritten graph; ``print(variant.graph_module.code)`` reads as Python.
        input_names: Placeholder names, in order.
        call_means: Cache keys a transform wrote as one call's part of a mean over the two calls of a
            split-CFG step (:meth:`CacheIO.write`); the runtime averages them.
    """

    spec: VariantSpec
    resolved: Resolved
    graph_module: fx.GraphModule
    input_names: list[str]
    input_meta: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    name: str = ""
    call_means: frozenset[CacheKey] = frozenset()

    def __post_init__(self) -> None:
        self.name = self.name or self.spec.name

    @property
    def reads(self) -> list[CacheKey]:
        """Cache keys read, each from input ``key.input_name()``."""
        return list(self.resolved.reads)

    @property
    def records(self) -> list[CacheKey]:
        """Cache keys written, as outputs 1..n in this order."""
        return [k for k, _ in self.resolved.records]

    @property
    def cache_inputs(self) -> dict[CacheKey, str]:
        """Cache key -> placeholder name of its read."""
        return {key: key.input_name() for key in self.resolved.reads}

    def __call__(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.graph_module(*(inputs[name] for name in self.input_names))

    def node_count(self) -> int:
        return sum(1 for n in self.graph_module.graph.nodes if n.op == "call_function")


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new ``GraphModule`` over a copy of ``gm``'s graph, sharing its parameters.

    Its Python code is generated lazily (at its first call, or by
    ``_LazyGraphModule.force_recompile``): passes change the graph first, and
    generating the code of a graph of thousands of nodes twice would double
    a variant's build time.
    """
    graph = fx.Graph()
    outputs = graph.graph_copy(gm.graph, {})
    graph.output(outputs)
    return _LazyGraphModule(gm, graph, class_name=type(gm).__name__)


def _find(graph: fx.Graph, keys: Iterable[CacheKey]) -> dict[CacheKey, fx.Node]:
    wanted = set(keys)
    found = {}
    for node in graph.nodes:
        for k, tag in node.meta.items():
            if k.startswith("tgate_fx.") and isinstance(tag, dict) and "group" in tag:
                key = CacheKey(k[len("tgate_fx."):], tag["site"], tag["slot"])
                if key in wanted:
                    found[key] = node
    missing = wanted - set(found)
    if missing:
        raise ValueError(f"no tagged node for caches {sorted(map(str, missing))}; annotate the graph first")
    return found


class CacheIO:
    """The cache reads and writes the transforms of one variant make (see the module docstring).

    Attributes:
        reads: Cache key -> the input node that reads it, in order of first read.
        writes: Cache key -> the node whose value is written, in order of first write.
    """

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.reads: dict[CacheKey, fx.Node] = {}
        self.writes: dict[CacheKey, fx.Node] = {}
        self.means: set[CacheKey] = set()

    def read(self, key: CacheKey, val: torch.Tensor) -> fx.Node:
        """The value of cache ``key`` (``val``: its fake value, shape and dtype) at this point of the graph."""
        if key in self.writes:
            return self.writes[key]
        if key not in self.reads:
            placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
            with self.graph.inserting_after(placeholders[-1]):
                node = self.graph.placeholder(key.input_name())
            if node.name != key.input_name():
                raise ValueError(f"cache input name {key.input_name()!r} clashes with a node of the graph")
            node.meta["val"] = val
            self.reads[key] = node
        return self.reads[key]

    def write(self, key: CacheKey, node: fx.Node, mean: bool = False) -> None:
        """Write ``node``'s value to cache ``key`` (a later write of the same key replaces it).

        ``mean``: the value is one call's part of a value shared by the two calls of a split-CFG step
        (:attr:`~tgate_fx.core.method.ScheduleContext.split`); the runtime stores the mean of the two calls'
        values for both. A graph that runs outside split CFG must not write such a value.
        """
        self.writes[key] = node
        (self.means.add if mean else self.means.discard)(key)


def build_variant(base: fx.GraphModule, resolved: Resolved, methods: Iterable[Method] = ()) -> Variant:
    """Specialise ``base`` (a tagged capture graph) as ``resolved`` says; ``base`` is not modified.

    ``methods`` provide the passes of ``resolved``'s transforms; they run
    first, then the records and reads.
    """
    gm = copy_graph_module(base)
    keys = [k for k, _ in resolved.records] + list(resolved.reads) + [k for *_, ks in resolved.transforms for k in ks]
    nodes = _find(gm.graph, keys)
    by_name = {m.name: m for m in methods}
    io = CacheIO(gm.graph)
    for method, option, transform_keys in resolved.transforms:
        if method not in by_name:
            raise ValueError(f"variant {resolved.spec.name!r} transforms nodes of method {method!r}, which is not given")
        graph_pass = by_name[method].transform_pass([nodes[k] for k in transform_keys], option, io)
        gm = graph_pass(gm).graph_module
    passes = []
    exposed = [nodes[k] for k, _ in resolved.records] + list(io.writes.values())
    if exposed:
        passes.append(ExposeValues(exposed, cfg_mean=[nodes[k] for k, mean in resolved.records if mean]))
    if resolved.reads:
        passes.append(ReplaceValuesWithCache([(nodes[k], k.input_name()) for k in resolved.reads]))
    if resolved.spec.head:
        passes.append(DropPrediction())
    passes += [EliminateDeadCode(), RemoveUnusedInputs()]
    for graph_pass in passes:
        gm = graph_pass(gm).graph_module
    gm.recompile()
    _LazyGraphModule.force_recompile(gm)  # the code now, at build time, not at the first step that runs it
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kept = {n.name for n in placeholders}
    if io.reads or io.writes or any(k.input_name() not in kept for k in resolved.reads):
        # the calling convention: the transforms' caches too, and no read a transform left unused
        resolved = Resolved(resolved.spec, resolved.records + tuple((k, k in io.means) for k in io.writes),
                            tuple(k for k in resolved.reads if k.input_name() in kept)
                            + tuple(k for k in io.reads if k.input_name() in kept),
                            resolved.skipped, resolved.transforms)
    return Variant(resolved.spec, resolved, gm, [n.name for n in placeholders],
                   {n.name: n.meta["val"] for n in placeholders}, call_means=frozenset(io.means))


def _method_tag(key: str) -> bool:
    return key.startswith("tgate_fx.")


@dataclass
class CapturedGraphs:
    """One capture, its regions, the methods' tags on it, and the variants built from it so far."""

    capture: Capture
    regions: Regions
    variants: dict[Resolved, Variant] = field(default_factory=dict)
    _annotated: tuple = ()
    _resolved: dict = field(default_factory=dict, repr=False)
    _methods: list = field(default_factory=list, repr=False)

    @classmethod
    def from_capture(cls, capture: Capture, methods: list[Method] = ()) -> "CapturedGraphs":
        graphs = cls(capture, analyze(capture.graph_module))
        graphs.annotate(methods)
        return graphs

    @property
    def sites(self):
        """The attention sites of the capture."""
        return self.regions.attention

    def annotate(self, methods: list[Method]) -> None:
        """Tag the graph for ``methods`` (again, if they changed; variants built for others are dropped)."""
        signature = tuple((m.name, m.config) for m in methods)
        if signature == self._annotated:
            return
        for node in self.capture.graph_module.graph.nodes:
            for key in [k for k in node.meta if _method_tag(k)]:
                del node.meta[key]
        self.variants.clear()
        self._resolved.clear()
        self._annotated = ()  # until every method has tagged: a failed annotation is redone, not kept
        for method in methods:
            method.annotate(self.capture.graph_module, self.regions)
        self._annotated = signature
        self._methods = list(methods)

    def resolution(self, spec: VariantSpec, available: Iterable[CacheKey] | None = None) -> Resolved:
        """How ``spec`` lands on this graph given the caches written so far (``None``: all); nothing is built."""
        graph = self.capture.graph_module.graph
        reads = self._resolved.get(spec)
        if reads is None:  # the cache keys the spec may read: resolve once per spec and availability
            reads = self._resolved[spec] = frozenset(
                k for r in spec.rewrites if r.action == REUSE for _, k in tagged_nodes(graph, r.method, r.group))
        have = reads if available is None else reads.intersection(available)
        resolved = self._resolved.get((spec, have))
        if resolved is None:
            resolved = self._resolved[spec, have] = resolve(graph, spec, have)
        return resolved

    def variant(self, spec: VariantSpec, available: Iterable[CacheKey] | None = None) -> Variant:
        """The variant for ``spec`` given the caches written so far (``None``: all), built on first use."""
        resolved = self.resolution(spec, available)
        if resolved not in self.variants:
            variant = build_variant(self.capture.graph_module, resolved, self._methods)
            if any(v.name == variant.name for v in self.variants.values()):
                variant.name = resolved.alternative_name()  # the same spec, resolved otherwise before
            self.variants[resolved] = variant
        return self.variants[resolved]

    def mean_keys(self, spec: VariantSpec) -> frozenset[CacheKey]:
        """The cache keys ``spec`` records as the mean of the CFG halves."""
        return frozenset(k for r in spec.rewrites if r.reduce == CFG_MEAN for k in self.keys(r.method, r.group))

    def keys(self, method: str, group: str) -> list[CacheKey]:
        return [k for _, k in tagged_nodes(self.capture.graph_module.graph, method, group)]


def walk_plan(plan: Plan, graphs_for: Callable[[StepPlan], CapturedGraphs],
              spec_of: Callable[[VariantSpec], VariantSpec] = lambda spec: spec) -> list[tuple[CapturedGraphs, Variant]]:
    """Each step's capture and variant, as the runtime runs them (caches written step by step; ``spec_of``
    gives the spec a step's calls run, e.g. a split-CFG call's).

    A choice step (its graph chosen at run time) builds its head and its alternatives, given what the
    head writes (an alternative that reads a cache nothing has written yet is left for the runtime to build
    if it ever runs); its entry is the first alternative (the one that computes everything), and the caches
    the built ones write count as written after it."""
    written: set[CacheKey] = set()
    out = []
    for step in plan.steps:
        graphs = graphs_for(step)
        if step.choice is None:
            variant = graphs.variant(spec_of(step.variant), written)
            written.update(variant.records)
        else:
            head = graphs.variant(spec_of(step.choice.head), written)
            after = written | set(head.records)
            variant = graphs.variant(spec_of(step.choice.alternatives[0][1]), after)
            built = [variant]
            for _, spec in step.choice.alternatives[1:]:  # an alternative that could not run yet is not built
                if not any(reason.startswith("not written") for _, reason in graphs.resolution(spec_of(spec), after).skipped):
                    built.append(graphs.variant(spec_of(spec), after))
            written = after.union(*(v.records for v in built))
        out.append((graphs, variant))
    return out

