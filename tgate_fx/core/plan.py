"""The step plan: which graph variant runs at each denoising step, composed from every method.

A :class:`Plan` is plain data. It is derived from the methods, the number of
steps of a generation and whether that generation runs classifier-free
guidance (CFG). Each step's variant is the union of every method's rewrites
for that step; steps whose union is the same share one variant. It says
nothing about graphs or tensors: the runtime turns each :class:`VariantSpec`
into a graph.

Example::

    >>> from tgate_fx import Plan, TGateConfig, DeepCacheConfig
    >>> plan = Plan(25, TGateConfig(gate_step=10), cfg=True)
    >>> plan.steps[3].variant.name
    'sp_reuse'
    >>> plan = Plan(25, [TGateConfig(gate_step=10), DeepCacheConfig(cache_interval=3)], cfg=True)
    >>> plan.steps[1].variant.name
    'sp_compute+dc_partial'
    >>> print(plan)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .method import RECORD, REUSE, Method, MethodStep, Rewrite, ScheduleContext, as_methods

__all__ = ["Plan", "PlannedChoice", "StepPlan", "VariantSpec"]


@dataclass(frozen=True)
class VariantSpec:
    """The rewrites of a graph variant (the union of every method's for a step).

    Attributes:
        name: Stable, human-readable name (the methods' labels joined by ``+``).
        rewrites: What the variant records and reuses.
        head: For the head of a choice step, the method that chooses (else ``""``): the graph computes only
            what that method records there (its prediction output is ``None``); the other methods'
            rewrites apply to what that computes.
        chooser: For an alternative of a choice step, the method that chose it (else ``""``): its reads of
            the head's values stand for the other methods' reads of the same nodes (the head ran their
            rewrites, so it holds what they read).
    """

    name: str
    rewrites: frozenset[Rewrite] = frozenset()
    head: str = ""
    chooser: str = ""

    def groups(self, action: str) -> tuple[str, ...]:
        """``method:group`` of the rewrites with ``action``, sorted."""
        return tuple(sorted(f"{r.method}:{r.group}" for r in self.rewrites if r.action == action))


@dataclass(frozen=True)
class PlannedChoice:
    """A choice step's graphs (see :class:`~tgate_fx.core.method.Choice`), each with the other methods'
    rewrites of the step.

    Attributes:
        method: The method that decides.
        head: The head variant, run first.
        alternatives: Label -> variant, in the method's order (the first computes everything).
    """

    method: str
    head: VariantSpec
    alternatives: tuple[tuple[str, VariantSpec], ...]

    def alternative(self, label: str) -> VariantSpec:
        for name, spec in self.alternatives:
            if name == label:
                return spec
        raise ValueError(f"method {self.method!r} chose {label!r}; its alternatives are "
                         f"{[name for name, _ in self.alternatives]}")


@dataclass(frozen=True)
class StepPlan:
    """One denoising step: its variant, CFG state, and what each method does.

    Attributes:
        step: 0-based index in the generation.
        variant: The composed variant.
        cfg: Whether the step's graph runs the CFG batch (``False`` after a
            method dropped the unconditional half, or without CFG).
        drops_uncond: The generation runs CFG but this step runs only the
            unconditional half.
        methods: Method name -> its :class:`MethodStep`.
        choice: For a step whose graph is chosen at run time, its head and alternatives
            (``variant`` is then the first alternative: the one that computes everything).
    """

    step: int
    variant: VariantSpec
    cfg: bool
    drops_uncond: bool
    methods: dict[str, MethodStep]
    choice: PlannedChoice | None = None

    @property
    def phase(self) -> str:
        phases = [m.phase for m in self.methods.values() if m.phase]
        return "/".join(phases) or "-"


def _timesteps(timesteps: Any, num_steps: Any) -> tuple[float, ...] | None:
    if timesteps is None or isinstance(num_steps, bool) or not isinstance(num_steps, int):
        return None
    try:
        values = tuple(float(t) for t in timesteps)
    except (TypeError, ValueError):
        raise ValueError(f"timesteps must be a sequence of numbers (one per step) or None, got {timesteps!r}") from None
    if len(values) != num_steps:
        raise ValueError(f"timesteps must have one value per step ({num_steps}), got {len(values)}: {values}")
    return values


class Plan:
    """Maps each step of a generation to a graph variant, CFG on/off, cache reads and writes.

    Args:
        num_steps: Denoiser calls in the generation.
        methods: A method config (``TGateConfig(...)``), a :class:`Method`, or
            a sequence of them.
        cfg: Whether the generation runs classifier-free guidance.
        timesteps: The timestep of each step (what the pipeline passes to the
            denoiser; the runtime reads them from the scheduler), or ``None``
            if unknown. Methods read them from the
            :class:`~tgate_fx.core.method.ScheduleContext` (ToDo's ``skip_timestep_zero``); each
            documents what it assumes without them.
        split: CFG runs as two denoiser calls a step, not one batch (see
            :attr:`~tgate_fx.core.method.ScheduleContext.split`).

    Every method is scheduled with one :class:`~tgate_fx.core.method.ScheduleContext`
    holding the *other* methods' barriers and the steps where they drop the
    unconditional half (read off their schedules first).

    Raises:
        ValueError: if a method cannot serve the generation (e.g. T-GATE's
            ``gate_step`` beyond ``num_steps``), or ``timesteps`` is not one
            number per step.
    """

    def __init__(self, num_steps: int, methods: Any, cfg: bool, timesteps: Sequence[float] | None = None, *,
                 split: bool = False):
        base = ScheduleContext(num_steps, bool(cfg), _timesteps(timesteps, num_steps), split=bool(split))
        self.num_steps, self.cfg, self.timesteps, self.split = num_steps, base.cfg, base.timesteps, base.split
        self.methods: list[Method] = as_methods(methods)
        for method in self.methods:
            method.validate(base)
        own = {m.name: frozenset(m.barriers(base)) for m in self.methods}

        def others(name: str, sets: dict[str, frozenset[int]]) -> frozenset[int]:
            return frozenset().union(*(v for k, v in sets.items() if k != name))

        def schedules(drops: dict[str, frozenset[int]]) -> dict[str, list[MethodStep]]:
            out = {}
            for m in self.methods:
                ctx = ScheduleContext(num_steps, self.cfg, self.timesteps, others(m.name, own), others(m.name, drops),
                                      self.split)
                out[m.name] = m.schedule(ctx)
                if len(out[m.name]) != num_steps:
                    raise RuntimeError(f"method {m.name!r} scheduled {len(out[m.name])} steps for {num_steps}")
            return out

        def dropped(per: dict[str, list[MethodStep]]) -> dict[str, frozenset[int]]:
            return {name: frozenset(i for i, s in enumerate(steps) if s.drops_uncond) for name, steps in per.items()}

        # which steps each method drops the unconditional half at, then every schedule knowing the others'
        first = schedules({m.name: frozenset() for m in self.methods})
        drops = dropped(first)
        per_method = schedules(drops)
        if dropped(per_method) != drops:
            raise RuntimeError("the methods' dropped CFG halves depend on each other's; they cannot be planned")
        self.steps = [self._step(i, {name: s[i] for name, s in per_method.items()}) for i in range(num_steps)]

    def _step(self, i: int, methods: dict[str, MethodStep]) -> StepPlan:
        rewrites = frozenset().union(*(m.rewrites for m in methods.values()))
        name = "+".join(m.label for m in methods.values()) or "full"
        drops = self.cfg and any(m.drops_uncond for m in methods.values())
        choosers = [n for n, m in methods.items() if m.choice is not None]
        if len(choosers) > 1:
            raise ValueError(f"methods {choosers} each choose step {i}'s graph at run time; only one method "
                             "of a plan may")
        choice = None
        if choosers:
            chooser = choosers[0]
            made = methods[chooser].choice
            choice = PlannedChoice(chooser, VariantSpec(name + "~head", rewrites | made.head, head=chooser),
                                   tuple((label, VariantSpec(name + "~" + label, rewrites | alt, chooser=chooser))
                                         for label, alt in made.alternatives))
            return StepPlan(i, choice.alternatives[0][1], self.cfg and not drops, drops, methods, choice)
        return StepPlan(i, VariantSpec(name, rewrites), self.cfg and not drops, drops, methods)

    @property
    def config(self):
        """The config of the only method (for a single-method plan)."""
        if len(self.methods) != 1:
            raise AttributeError(f"this plan composes {len(self.methods)} methods; read plan.methods")
        return self.methods[0].config

    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"no method {name!r} in this plan (it has {[m.name for m in self.methods]})")

    @property
    def variants(self) -> dict[str, VariantSpec]:
        """The distinct variants this plan uses, in order of first use (a choice step's head and
        alternatives included)."""
        out: dict[str, VariantSpec] = {}
        for s in self.steps:
            specs = [s.variant] if s.choice is None else [s.choice.head, *(v for _, v in s.choice.alternatives)]
            for spec in specs:
                if out.setdefault(spec.name, spec) != spec:
                    raise RuntimeError(f"two different variants are named {spec.name!r}")
        return out

    @property
    def chooses(self) -> bool:
        """Whether some step's graph is chosen at run time (from data) rather than by the plan."""
        return any(s.choice is not None for s in self.steps)

    def reads(self, step: int) -> tuple[str, ...]:
        """``method:group`` of the caches the step reads."""
        return self.steps[step].variant.groups(REUSE)

    def writes(self, step: int) -> tuple[str, ...]:
        """``method:group`` of the caches the step writes."""
        return self.steps[step].variant.groups(RECORD)

    def to_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "cfg": self.cfg,
            **({"split": True} if self.split else {}),
            "timesteps": list(self.timesteps) if self.timesteps is not None else None,
            "methods": {m.name: m.config.to_dict() for m in self.methods},
            "steps": [
                {"step": s.step, "phase": s.phase, "variant": s.variant.name, "cfg": s.cfg,
                 "drops_uncond": s.drops_uncond,
                 "methods": {name: m.label for name, m in s.methods.items()},
                 "rewrites": sorted([r.method, r.group, r.action, r.reduce] for r in s.variant.rewrites),
                 **({"choice": {"method": s.choice.method, "head": s.choice.head.name,
                                "alternatives": [spec.name for _, spec in s.choice.alternatives]}}
                    if s.choice is not None else {})}
                for s in self.steps
            ],
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        settings = ", ".join(m.describe() for m in self.methods)
        split = ", split=True" if self.split else ""
        return f"Plan(num_steps={self.num_steps}, {settings}, cfg={self.cfg}{split})"

    def __str__(self) -> str:
        short = len(self.methods) == 1

        def groups(rewrites: Sequence[Rewrite]) -> str:
            names = sorted({r.group if short else f"{r.method}:{r.group}" for r in rewrites})
            text = ",".join(names) or "-"
            reduced = sorted({r.method for r in rewrites if r.reduce})
            if reduced:
                text += " (CFG mean)" if short else f" (CFG mean: {','.join(reduced)})"
            return text

        method_headers = [h for m in self.steps[0].methods.values() for h, _ in m.columns]
        header = ("step", "phase", "variant", "CFG", *method_headers, "reads", "writes")
        rows = [header]
        for s in self.steps:
            cells = [v for m in s.methods.values() for _, v in m.columns]
            rewrites = sorted(s.variant.rewrites, key=str)
            variant = s.variant.name if s.choice is None else \
                f"{s.choice.head.name}, then {' | '.join(label for label, _ in s.choice.alternatives)}"
            rows.append((str(s.step), s.phase, variant, "on" if s.cfg else "off", *cells,
                         groups([r for r in rewrites if r.action == REUSE]),
                         groups([r for r in rewrites if r.action == RECORD])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [repr(self)]
        for k, r in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)
