"""Multiply-accumulate (MAC) accounting of captured graphs, graph variants and whole plans.

MACs are read from the graphs' fake-tensor metadata (``node.meta["val"]``),
so a graph captured on the ``meta`` device (see :mod:`tgate_fx.archs`) is
counted without weights or compute. Counted, per node (see
:func:`tgate_fx.core.cost.node_macs`): ``linear``, convolutions, the matmul
family, and with ``include_attention=True`` the scaled-dot-product-attention
core (``Q K^T`` and ``A V``). Without it the counts follow the convention of
the T-GATE paper's calflops figures: Linear and Conv layers only.

Example::

    >>> from tgate_fx.archs import get_arch
    >>> from tgate_fx.accounting.macs import count_macs, plan_macs, format_macs
    >>> from tgate_fx import Plan
    >>> arch = get_arch("sdxl")
    >>> format_macs(2988660490240)
    '2.989T'
    >>> graphs = arch.capture(batch_size=1)                       # doctest: +SKIP
    >>> format_macs(count_macs(graphs.capture.graph_module).total)  # doctest: +SKIP
    '2.989T'
    >>> result = plan_macs(arch, Plan(25, arch.tgate, cfg=True))  # doctest: +SKIP
    >>> format_macs(result.baseline), format_macs(result.total)   # doctest: +SKIP
    ('149.433T', '95.989T')
    >>> print(result)                                             # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch.fx as fx

from ..core.meta import TAG
from ..core.plan import Plan
from ..core.variants import CapturedGraphs, walk_plan
from ..core.cost import node_macs

__all__ = ["MacCount", "PhaseMacs", "PlanMacs", "StepMacs", "count_macs", "format_macs", "plan_macs"]

OUTSIDE = "outside"  # the by_role key of nodes that belong to no attention site


def format_macs(macs: float) -> str:
    """``2988660490240`` -> ``'2.989T'`` (T = 1e12, G = 1e9, M = 1e6)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(macs) >= scale:
            return f"{macs / scale:.3f}{unit}"
    return str(int(macs))


@dataclass(frozen=True)
class MacCount:
    """The MACs of one graph.

    Attributes:
        total: All counted MACs.
        by_node: Node name -> MACs, for the nodes that count any.
        by_site: Attention-site path -> MACs of the site's nodes. Sites are
            known from the tags :func:`~tgate_fx.analysis.find_attention_sites`
            leaves on nodes; a graph never analysed has none.
        by_role: ``"self"``, ``"cross"``, ``"other"`` (sites by role) and
            ``"outside"`` (nodes of no site) -> MACs.
        include_attention: Whether the SDPA core is counted.
    """

    total: int
    by_node: dict[str, int] = field(repr=False)
    by_site: dict[str, int] = field(repr=False)
    by_role: dict[str, int]
    include_attention: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_role": dict(self.by_role), "by_site": dict(self.by_site),
                "include_attention": self.include_attention}

    def __str__(self) -> str:
        parts = ", ".join(f"{role} {format_macs(m)}" for role, m in self.by_role.items())
        return f"{format_macs(self.total)} MACs ({parts})"


def _as_graph(graph: Any) -> fx.Graph:
    if isinstance(graph, fx.Graph):
        return graph
    if isinstance(graph, fx.GraphModule):
        return graph.graph
    inner = getattr(graph, "graph_module", None)  # Capture, Variant
    if isinstance(inner, fx.GraphModule):
        return inner.graph
    raise TypeError(f"count_macs takes an fx.Graph, an fx.GraphModule, or an object with a .graph_module "
                    f"(Capture, Variant); got {type(graph).__name__}")


def count_macs(graph: Any, include_attention: bool = False) -> MacCount:
    """Count the multiply-accumulates of ``graph`` from its fake-tensor metadata.

    Args:
        graph: An ``fx.Graph``/``GraphModule`` whose nodes carry ``meta["val"]``
            (any capture or variant), or a ``Capture``/``Variant``.
        include_attention: Also count the SDPA core (``Q K^T`` and ``A V``).

    Example::

        count = count_macs(variant.graph_module)
        count.total, count.by_role["cross"], count.by_site["mid_block.attentions.0.transformer_blocks.0.attn2"]
    """
    by_node: dict[str, int] = {}
    by_site: dict[str, int] = {}
    by_role: dict[str, int] = {}
    for node in _as_graph(graph).nodes:
        macs = node_macs(node, include_attention=include_attention)
        if not macs:
            continue
        by_node[node.name] = macs
        tag = node.meta.get(TAG)
        role = tag["role"] if tag else OUTSIDE
        by_role[role] = by_role.get(role, 0) + macs
        if tag:
            by_site[tag["site"]] = by_site.get(tag["site"], 0) + macs
    return MacCount(sum(by_node.values()), by_node, by_site, by_role, include_attention)


# --- whole plans ----------------------------------------------------------------------------

GraphSource = Callable[[int], CapturedGraphs]


@dataclass(frozen=True)
class StepMacs:
    """One denoising step: its variant, the batch it runs at, and its MACs."""

    step: int
    phase: str
    variant: str
    batch: int
    macs: int


@dataclass(frozen=True)
class VariantMacs:
    """A plan's variant at the batch it runs at, its MACs per call, and the steps that call it."""

    name: str
    batch: int
    count: MacCount
    steps: tuple[int, ...]


@dataclass(frozen=True)
class PhaseMacs:
    """A phase of the plan (semantics-planning, gate, fidelity-improving) and its MACs against the baseline."""

    phase: str
    steps: tuple[int, ...]
    macs: int
    baseline: int


@dataclass
class PlanMacs:
    """The MACs of a whole generation, step by step, with and without the plan's methods.

    The baseline runs the denoiser as captured (every attention site
    computed) at every step, at the CFG batch ``2 * batch_size`` when the
    plan runs classifier-free guidance; the plan runs each step's variant at
    the batch it runs at (``batch_size`` where a method drops the
    unconditional half, e.g. after T-GATE's gate).

    Attributes:
        plan: The plan counted.
        batch_size: Images per generation.
        include_attention: Whether the SDPA core is counted.
        steps: Per step.
        variants: Per variant of the plan.
        baseline_step: One full evaluation at the baseline's batch.
        per_eval: One full evaluation at ``batch_size``.
    """

    plan: Plan
    batch_size: int
    include_attention: bool
    steps: list[StepMacs]
    variants: dict[str, VariantMacs]
    baseline_step: MacCount
    per_eval: MacCount

    @property
    def total(self) -> int:
        """MACs of the generation with the plan's methods."""
        return sum(s.macs for s in self.steps)

    @property
    def baseline(self) -> int:
        """MACs of the generation without them."""
        return self.baseline_step.total * len(self.steps)

    @property
    def saving(self) -> float:
        """Fraction of the baseline's MACs the plan removes."""
        return 1.0 - self.total / self.baseline if self.baseline else 0.0

    def phases(self) -> list[PhaseMacs]:
        """Per phase, in plan order."""
        out: dict[str, list[StepMacs]] = {}
        for s in self.steps:
            out.setdefault(s.phase, []).append(s)
        return [PhaseMacs(phase, tuple(s.step for s in steps), sum(s.macs for s in steps),
                          self.baseline_step.total * len(steps)) for phase, steps in out.items()]

    def segments(self) -> list[tuple[list[StepMacs], StepMacs]]:
        """Runs of consecutive steps that share phase and variant: ``(steps, first step)``."""
        runs: list[list[StepMacs]] = []
        for s in self.steps:
            if runs and (runs[-1][-1].phase, runs[-1][-1].variant) == (s.phase, s.variant):
                runs[-1].append(s)
            else:
                runs.append([s])
        return [(run, run[0]) for run in runs]

    def to_dict(self) -> dict[str, Any]:
        methods = {m.name: m.config.to_dict() for m in self.plan.methods}
        return {
            "num_steps": self.plan.num_steps,
            "cfg": self.plan.cfg,
            "methods": methods,
            **({"config": next(iter(methods.values()))} if len(methods) == 1 else {}),
            "batch_size": self.batch_size,
            "include_attention": self.include_attention,
            "baseline_macs": self.baseline,
            "optimized_macs": self.total,
            # One method: also under "<method>_macs" ("tgate_macs"), as before methods composed.
            **({f"{next(iter(methods))}_macs": self.total} if len(methods) == 1 else {}),
            "saving": self.saving,
            "per_eval_macs": self.per_eval.total,
            "per_eval_by_role": dict(self.per_eval.by_role),
            "phases": [{"phase": p.phase, "steps": list(p.steps), "macs": p.macs, "baseline_macs": p.baseline}
                       for p in self.phases()],
            "variants": {v.name: {"batch": v.batch, "macs": v.count.total, "by_role": dict(v.count.by_role),
                                  "steps": list(v.steps)} for v in self.variants.values()},
            "steps": [{"step": s.step, "phase": s.phase, "variant": s.variant, "batch": s.batch, "macs": s.macs}
                      for s in self.steps],
        }

    def __str__(self) -> str:
        from ._format import table as _table

        counted = "Linear + Conv + SDPA core" if self.include_attention else "Linear + Conv (calflops convention)"
        cfg_batch = self.baseline_step_batch
        roles = self.per_eval.by_role
        lines = [
            repr(self.plan),
            f"batch {self.batch_size}; counted: {counted}; T = 1e12 MACs",
            f"one evaluation at batch {self.batch_size}: {format_macs(self.per_eval.total)} "
            f"(self-attention sites {format_macs(roles.get('self', 0))}, cross-attention sites "
            f"{format_macs(roles.get('cross', 0))}, elsewhere {format_macs(roles.get(OUTSIDE, 0))})",
            "",
        ]
        rows = [("steps", "phase", "variant", "batch", "MACs/step", "MACs", "baseline")]
        for run, first in self.segments():
            span = str(first.step) if len(run) == 1 else f"{first.step}-{run[-1].step}"
            rows.append((span, first.phase, first.variant, str(first.batch), format_macs(first.macs),
                         format_macs(sum(s.macs for s in run)), format_macs(self.baseline_step.total * len(run))))
        lines += _table(rows) + [""]
        rows = [("phase", "steps", "MACs", "baseline", "saved")]
        for p in self.phases():
            rows.append((p.phase, str(len(p.steps)), format_macs(p.macs), format_macs(p.baseline),
                         f"{1 - p.macs / p.baseline:.1%}" if p.baseline else "-"))
        lines += _table(rows) + [""]
        label = " + ".join(m.title for m in self.plan.methods)
        lines.append(f"baseline (batch {cfg_batch} every step): {format_macs(self.baseline)}   "
                     f"{label}: {format_macs(self.total)}   saved: {self.saving:.1%}")
        return "\n".join(lines)

    @property
    def baseline_step_batch(self) -> int:
        """The batch the baseline runs every step at."""
        return 2 * self.batch_size if self.plan.cfg else self.batch_size


def _chosen(choices: Any, step: int, default: str) -> str:
    if choices is None:
        return default
    if callable(choices):
        return choices(step) or default
    return choices.get(step, default)


def _graph_source(graphs: Any) -> GraphSource:
    from ..archs import Arch, ArchGraphs, get_arch

    if isinstance(graphs, str):
        return ArchGraphs(get_arch(graphs))
    if isinstance(graphs, Arch):
        return ArchGraphs(graphs)
    if isinstance(graphs, CapturedGraphs):
        batch = graphs.capture.signature.tensors[0][1][0]

        def only(b: int) -> CapturedGraphs:
            if b != batch:
                raise ValueError(f"this plan needs a capture at batch {b}, but only one at batch {batch} was "
                                 "given; pass an Arch, an arch name, or a callable batch_size -> CapturedGraphs")
            return graphs

        return only
    if callable(graphs):
        return graphs
    raise TypeError(f"graphs must be an arch name, an Arch, a CapturedGraphs or a callable batch_size -> "
                    f"CapturedGraphs; got {type(graphs).__name__}")


def plan_macs(graphs: Union[str, Any, CapturedGraphs, GraphSource], plan: Plan, *, batch_size: int = 1,
              include_attention: bool = False, choices: Any = None) -> PlanMacs:
    """Count a whole generation under ``plan``: every step's variant, at the batch it runs at.

    Args:
        graphs: Where the graphs come from: an architecture name or
            :class:`~tgate_fx.archs.Arch` (captured on the meta device, once per
            batch size), or a callable ``batch_size -> CapturedGraphs`` such as
            an :class:`~tgate_fx.archs.ArchGraphs` (reuse one to share captures
            between calls), or a single ``CapturedGraphs`` when every step runs
            at its batch.
        plan: The step plan (``Plan(num_steps, [TGateConfig(...), ...], cfg=...)``).
        batch_size: Images per generation; CFG steps run at twice this.
        include_attention: Also count the SDPA core.
        choices: For a plan whose steps choose their graph at run time (the block cache): the
            alternative each such step takes, as ``step -> label`` (a dict or a callable; a step it does
            not name takes the first alternative, the one that computes everything). Such a step costs
            its head plus that alternative; ``None``: every step computes everything (the upper bound).

    Variants are built step by step with :func:`~tgate_fx.core.variants.walk_plan`,
    the way the runtime builds them, and counted after their dead code is
    removed; the baseline and ``per_eval`` count the capture as exported.

    Example::

        graphs = ArchGraphs(get_arch("pixart_alpha"))
        result = plan_macs(graphs, Plan(25, TGateConfig(15, 3, 1, 2), cfg=True))
        result.baseline, result.total, result.to_dict()["phases"]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    source = _graph_source(graphs)

    def graphs_for(step) -> CapturedGraphs:
        captured = source(2 * batch_size if step.cfg else batch_size)
        captured.annotate(plan.methods)
        return captured

    counts: dict[int, MacCount] = {}

    def counted(variant) -> MacCount:
        if id(variant) not in counts:
            counts[id(variant)] = count_macs(variant.graph_module, include_attention)
        return counts[id(variant)]

    steps, variants = [], {}
    for s, (captured, variant) in zip(plan.steps, walk_plan(plan, graphs_for)):
        batch = 2 * batch_size if s.cfg else batch_size
        ran = [variant]
        if s.choice is not None:
            label = _chosen(choices, s.step, s.choice.alternatives[0][0])
            ran = [captured.variant(s.choice.head), captured.variant(s.choice.alternative(label))]
        for v in ran:
            prev = variants.get(v.name)
            variants[v.name] = VariantMacs(v.name, batch, counted(v), (prev.steps if prev else ()) + (s.step,))
        steps.append(StepMacs(s.step, s.phase, "+".join(v.name for v in ran), batch,
                              sum(counted(v).total for v in ran)))
    baseline_batch = 2 * batch_size if plan.cfg else batch_size
    baseline = count_macs(source(baseline_batch).capture.graph_module, include_attention)
    per_eval = count_macs(source(batch_size).capture.graph_module, include_attention)
    return PlanMacs(plan, batch_size, include_attention, steps, variants, baseline, per_eval)
