"""Inspect what the methods rewrite: attention sites, the step plan, and every graph variant of the plan.

An :class:`Inspection` captures a denoiser (a full-size architecture on the
``meta`` device, or the denoiser of a pipeline, rebuilt on ``meta`` from its
config), builds each variant its plan uses exactly as the runtime would, and
reports per variant the number of operators, the MACs, and which attention
sites it computes, reuses from a cache, or records into one. A variant's
code reads as Python (:meth:`Inspection.graph_code`), and two variants can
be compared node by node (:func:`diff_variants`): variants are copies of the
same capture, so a node keeps its name, target and module path in each.

Example::

    >>> from tgate_fx.accounting.inspection import inspect_arch
    >>> report = inspect_arch("sdxl")               # doctest: +SKIP
    >>> print(report)                               # doctest: +SKIP
    >>> print(report.diff("sp_compute", "fi_record"))  # doctest: +SKIP
    >>> print(report.graph_code("fi_reuse"))        # doctest: +SKIP
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch.fx as fx

from ..core.analysis import AttentionSite
from ..core.meta import ATTR_PATH, TAG
from ..core.method import CacheKey
from ..core.plan import Plan
from ..core.variants import Variant
from ._format import roles_summary, sites_table, table
from .macs import MacCount, format_macs, plan_macs

__all__ = ["Inspection", "computed_sites", "NodeKey", "VariantDiff", "VariantInfo", "diff_variants", "inspect_arch",
           "inspect_pipeline"]


class NodeKey(NamedTuple):
    """How a node is recognised across variants: its name, its target and the module it belongs to."""

    name: str
    target: str
    module: str

    @staticmethod
    def of(node: fx.Node, sites: frozenset[str] = frozenset()) -> "NodeKey":
        """The key of ``node``; a parameter read inside one of ``sites`` belongs to that site."""
        return NodeKey(node.name, _target_name(node), _module_path(node, sites))


def _target_name(node: fx.Node) -> str:
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    # aten.linear.default -> linear
    if hasattr(target, "overloadpacket"):
        name = target.overloadpacket.__name__
    return name


def _module_path(node: fx.Node, sites: frozenset[str]) -> str:
    tag = node.meta.get(TAG)
    if tag:
        return tag["site"]
    if node.op == "get_attr":
        # Parameter reads carry no module stack: their owner is in the attribute path.
        owner = str(node.meta.get(ATTR_PATH, node.target)).rpartition(".")[0]
        return next((s for s in sites if owner == s or owner.startswith(s + ".")), owner)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return list(stack.values())[-1][0]
    return ""


@dataclass(frozen=True)
class VariantDiff:
    """Nodes one variant has and the other lacks.

    Attributes:
        a, b: Labels of the two variants.
        only_a: Nodes of ``a`` with no node of the same name, target and module in ``b``.
        only_b: The converse.
        roles: Attention-site path -> role, for labelling groups.
    """

    a: str
    b: str
    only_a: tuple[NodeKey, ...]
    only_b: tuple[NodeKey, ...]
    roles: dict[str, str]

    def _side(self, label: str, keys: tuple[NodeKey, ...], verbose: bool) -> list[str]:
        if not keys:
            return [f"only in {label}: nothing"]
        groups: dict[str, list[NodeKey]] = {}
        for k in keys:
            groups.setdefault(k.module or "(graph level)", []).append(k)
        lines = [f"only in {label}: {len(keys)} nodes in {len(groups)} modules"]
        rows = [("module", "role", "nodes", "targets")]
        for module, ks in groups.items():
            targets = Counter(k.target for k in ks)
            rows.append((module, self.roles.get(module, "-"), str(len(ks)),
                         ", ".join(f"{t} x{n}" if n > 1 else t for t, n in targets.most_common())))
        lines += ["  " + line for line in table(rows)]
        if verbose:
            lines += ["", f"  nodes only in {label}:"]
            lines += ["  " + line for line in table([("name", "target", "module")] + [tuple(k) for k in keys])]
        return lines

    def format(self, verbose: bool = False) -> str:
        """The diff, grouped by module (attention site); ``verbose`` also lists every node."""
        lines = [f"{self.a} vs {self.b}: {len(self.only_a)} nodes only in {self.a}, "
                 f"{len(self.only_b)} only in {self.b}", ""]
        lines += self._side(self.a, self.only_a, verbose) + [""] + self._side(self.b, self.only_b, verbose)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _graph_of(g: Any) -> fx.Graph:
    if isinstance(g, Variant):
        return g.graph_module.graph
    if isinstance(g, fx.GraphModule):
        return g.graph
    if isinstance(g, fx.Graph):
        return g
    raise TypeError(f"expected a Variant, fx.GraphModule or fx.Graph, got {type(g).__name__}")


def diff_variants(a: Any, b: Any, labels: tuple[str, str] = ("a", "b")) -> VariantDiff:
    """Compare two graphs (variants of one capture) node by node: name, target and module path.

    Example::

        d = diff_variants(graphs.variant(spec_a), graphs.variant(spec_b), ("sp_compute", "fi_reuse"))
        print(d.format(verbose=True))
    """
    nodes_a, nodes_b = list(_graph_of(a).nodes), list(_graph_of(b).nodes)
    roles = {}
    for n in nodes_a + nodes_b:
        tag = n.meta.get(TAG)
        if tag:
            roles[tag["site"]] = tag["role"]
    sites = frozenset(roles)
    keys_a = [NodeKey.of(n, sites) for n in nodes_a]
    keys_b = [NodeKey.of(n, sites) for n in nodes_b]
    set_a, set_b = set(keys_a), set(keys_b)
    return VariantDiff(labels[0], labels[1], tuple(k for k in keys_a if k not in set_b),
                       tuple(k for k in keys_b if k not in set_a), roles)


@dataclass(frozen=True)
class VariantInfo:
    """One variant of a plan, at the batch it runs at.

    Attributes:
        name: Variant name (``sp_compute``, ``fi_reuse``, ...).
        batch: The batch it runs at.
        steps: Steps that run it.
        variant: The built variant (graph, inputs, cache reads and writes).
        macs: Its MACs per call.
        computed: Attention-site paths it computes.
        reused, recorded: Cache keys it reads and writes (recorded values are also computed).
    """

    name: str
    batch: int
    steps: tuple[int, ...]
    variant: Variant
    macs: MacCount
    computed: tuple[str, ...]
    reused: tuple[CacheKey, ...]
    recorded: tuple[CacheKey, ...]


def _spans(steps: tuple[int, ...]) -> str:
    runs: list[list[int]] = []
    for s in steps:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def computed_sites(variant: Variant) -> tuple[str, ...]:
    """Attention-site paths whose output ``variant`` still computes."""
    return tuple(dict.fromkeys(n.meta[TAG]["site"] for n in variant.graph_module.graph.nodes
                               if n.op == "call_function" and n.meta.get(TAG, {}).get("value")))


class Inspection:
    """A plan's graph variants, built and counted, for reading and comparing.

    Args:
        title: First line of the report (what was captured).
        graphs: A callable ``batch_size -> CapturedGraphs`` (e.g. an
            :class:`~tgate_fx.archs.ArchGraphs`).
        plan: The step plan.
        batch_size: Images per generation; CFG steps run at twice this.
        include_attention: Count the SDPA core in the MACs too.
    """

    def __init__(self, title: str, graphs, plan: Plan, *, batch_size: int = 1, include_attention: bool = False):
        self.title = title
        self.plan = plan
        self.batch_size = batch_size
        self.macs = plan_macs(graphs, plan, batch_size=batch_size, include_attention=include_attention)
        self.variants: dict[str, VariantInfo] = {}
        built = {v.name: v for b in {vm.batch for vm in self.macs.variants.values()}
                 for v in graphs(b).variants.values()}
        for name, vm in self.macs.variants.items():
            variant = built[name]
            self.variants[name] = VariantInfo(
                name, vm.batch, vm.steps, variant, vm.count, computed=computed_sites(variant),
                reused=tuple(variant.reads), recorded=tuple(variant.records))
        first = plan.steps[0]
        captured = graphs(2 * batch_size if first.cfg else batch_size)
        self.sites: list[AttentionSite] = captured.sites
        self.capture = captured.capture

    def variant(self, name: str) -> Variant:
        """The built variant ``name``.

        Raises:
            ValueError: naming the variants this plan has.
        """
        if name not in self.variants:
            raise ValueError(f"this plan has no variant {name!r}; its variants are {', '.join(self.variants)}")
        return self.variants[name].variant

    def graph_code(self, name: str) -> str:
        """The Python code of variant ``name``'s graph."""
        return self.variant(name).graph_module.code

    def diff(self, a: str, b: str) -> VariantDiff:
        """Nodes variant ``a`` has that ``b`` lacks, and the converse."""
        va, vb = self.variant(a), self.variant(b)
        label = {n: f"{n} (batch {self.variants[n].batch})" for n in (a, b)}
        return diff_variants(va, vb, (label[a], label[b]))

    def __str__(self) -> str:
        cap = self.capture
        lines = [self.title, f"capture: {cap.signature.describe()}",
                 f"  {len(cap.graph_module.graph.nodes)} nodes, {len(self.sites)} attention sites "
                 f"({roles_summary(self.sites, [s.path for s in self.sites])})", ""]
        lines += sites_table(self.sites) + [""]
        lines += [str(self.plan), ""]
        rows = [("variant", "batch", "steps", "ops", "params", "MACs", "computed", "reused", "recorded")]
        for v in self.variants.values():
            rows.append((v.name, str(v.batch), _spans(v.steps), str(v.variant.node_count()),
                         str(sum(1 for _ in v.variant.graph_module.parameters())), format_macs(v.macs.total),
                         roles_summary(self.sites, list(v.computed)), roles_summary(self.sites, list(v.reused)),
                         roles_summary(self.sites, list(v.recorded))))
        lines += table(rows) + [""]
        m = self.macs
        label = " + ".join(meth.title for meth in self.plan.methods)
        lines.append(f"MACs ({'with' if m.include_attention else 'without'} SDPA core): baseline "
                     f"{format_macs(m.baseline)}, {label} {format_macs(m.total)}, saved {m.saving:.1%}")
        return "\n".join(lines)


def inspect_arch(arch: Any, plan: Plan | None = None, *, batch_size: int = 1, include_attention: bool = False,
                 graphs=None) -> Inspection:
    """Inspect a full-size architecture (a name from :data:`tgate_fx.archs.ARCHS` or an ``Arch``) on ``meta``.

    ``plan`` defaults to the architecture's published setting; ``graphs``
    (an :class:`~tgate_fx.archs.ArchGraphs` of the same arch) reuses captures.
    """
    from ..archs import Arch, ArchGraphs, get_arch

    arch = get_arch(arch) if isinstance(arch, str) else arch
    if not isinstance(arch, Arch):
        raise TypeError(f"arch must be an architecture name or an Arch, got {type(arch).__name__}")
    if plan is None and arch.tgate is None:
        raise ValueError(f"{arch.name} has no published T-GATE setting to inspect by default; pass a plan")
    plan = plan if plan is not None else Plan(arch.num_steps, arch.tgate, cfg=arch.cfg)
    graphs = graphs if graphs is not None else ArchGraphs(arch)
    return Inspection(f"{arch.describe()}\nconfig: {arch.source}", graphs, plan, batch_size=batch_size,
                      include_attention=include_attention)


def inspect_pipeline(pipe: Any, plan: Plan | None = None, *, height: int | None = None, width: int | None = None,
                     batch_size: int = 1, include_attention: bool = False) -> Inspection:
    """Inspect a diffusers pipeline's denoiser, rebuilt on ``meta`` from its config (its weights are not read).

    Sizes and T-GATE defaults are those of :func:`tgate_fx.archs.arch_from_pipeline`.
    """
    from ..archs import arch_from_pipeline

    return inspect_arch(arch_from_pipeline(pipe, height=height, width=width), plan, batch_size=batch_size,
                        include_attention=include_attention)
