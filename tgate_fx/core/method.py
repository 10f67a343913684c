"""What a method is, to the core: tags on nodes, and per-step rewrites of the tagged nodes.

A *method* (T-GATE, DeepCache, ...) is data plus passes. The core knows it
only through this interface:

* :meth:`Method.bind` checks that the method applies to a denoiser and
  returns it resolved for that denoiser (settings derived from it filled in;
  the config is never mutated);
* :meth:`Method.annotate` tags the nodes of a captured graph that the method
  may rewrite, under its own namespace (:func:`tag_key`), each with a *group*
  (e.g. ``"cross"``: every cross-attention output), a *site* (a module path)
  and a *slot* (which value of the site);
* :meth:`Method.schedule` takes one :class:`ScheduleContext` (the steps,
  CFG, the timesteps, and what the *other* methods of the plan do: their
  barriers and the steps where they drop the unconditional half) and says,
  for every step, which groups it records (exposes as cache writes), reuses
  (replaces by cache reads) or transforms (its own pass,
  :meth:`Method.transform_pass`), as :class:`Rewrite`\\ s, and whether the step
  drops the unconditional half of a CFG batch;
* :meth:`Method.barriers` names steps at which every *other* method must
  refresh its caches (compute everything), e.g. because the batch changes
  there; :meth:`Method.validate` rejects a generation it cannot serve;
* :meth:`Method.compose` may adapt to, or refuse, the other methods of a plan;
* a step may be a *choice* (:class:`Choice`): its graph is picked at run
  time from data. A *head* variant runs first (its outputs are only the
  values it records); the method's :meth:`Method.decide` reads them with the
  generation's caches and names one of the step's *alternatives*, whose
  variant then runs. A block cache decides this way whether the blocks after
  the first run or their cached residual is reused.

The step index never comes from the timesteps: they only say what a step's
timestep is (``None`` where unknown: a plan made for accounting or a check,
without a scheduler).

Caches are keyed by :class:`CacheKey` ``(method, site, slot)``: two methods
never share one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch.fx as fx

from .meta import tag_key

__all__ = ["RECORD", "REUSE", "TRANSFORM", "CacheKey", "Choice", "InertMethodWarning", "Method", "MethodStep", "Rewrite",
           "ScheduleContext", "as_methods", "register_method", "registered_methods", "tag_key", "tagged_nodes"]

RECORD = "record"
REUSE = "reuse"
TRANSFORM = "transform"
CFG_MEAN = "cfg_mean"


class InertMethodWarning(UserWarning):
    """A method was applied with settings under which it rewrites nothing of this denoiser."""


class CacheKey(NamedTuple):
    """Where a cached tensor belongs: the method that owns it, the site and the value of the site."""

    method: str
    site: str
    slot: str

    def __str__(self) -> str:
        return f"{self.method}:{self.site}:{self.slot}"

    def input_name(self) -> str:
        """Graph input (placeholder) name of a read of this cache."""
        return "cache_" + _flat(self)

    def output_name(self) -> str:
        """Graph output name of a write of this cache (as exported models name it)."""
        return "record_" + _flat(self)


def _flat(key: CacheKey) -> str:
    return "_".join((key.method, key.site, key.slot)).replace(".", "_")


@dataclass(frozen=True)
class Rewrite:
    """One change a method asks of a step's graph.

    Attributes:
        method: The method's name (its tag namespace and cache-key prefix).
        group: Which of the method's tagged nodes (every node whose tag has this group).
        action: ``"record"`` (the value becomes an extra output, stored as a
            cache), ``"reuse"`` (the value is replaced by a cache read; what
            computed it becomes dead code) or ``"transform"`` (the method's
            own pass, :meth:`Method.transform_pass`, rewrites the nodes).
        reduce: For records: ``None`` (the value as is) or ``"cfg_mean"``
            (the mean of the two halves of a CFG batch, unconditional first).
        option: For transforms: a hashable parameter handed to the method's
            pass (e.g. a downsampling factor); two steps with different
            options get different variants.
    """

    method: str
    group: str
    action: str
    reduce: str | None = None
    option: Any = None

    def __post_init__(self) -> None:
        if self.action not in (RECORD, REUSE, TRANSFORM):
            raise ValueError(f"Rewrite.action must be {RECORD!r}, {REUSE!r} or {TRANSFORM!r}, got {self.action!r}")
        if self.reduce not in (None, CFG_MEAN) or (self.reduce and self.action != RECORD):
            raise ValueError(f"Rewrite.reduce must be None or {CFG_MEAN!r} (records only), got {self.reduce!r}")
        if self.option is not None and self.action != TRANSFORM:
            raise ValueError(f"Rewrite.option is for transforms only, got {self.option!r} for a {self.action}")

    def __str__(self) -> str:
        extra = self.reduce or (repr(self.option) if self.option is not None else "")
        return f"{self.action} {self.method}:{self.group}" + (f" ({extra})" if extra else "")


@dataclass(frozen=True)
class Choice:
    """A step whose graph is chosen at run time (see the module docstring).

    Attributes:
        head: The rewrites of the head variant. It computes only what its
            records need (its prediction output is ``None``); what it records
            is stored in the generation's caches before :meth:`Method.decide` runs.
        alternatives: ``(label, rewrites)`` of each graph the step may run after
            the head, the first being the one that computes everything
            (accounting counts it). The other methods' rewrites of the step are
            added to the head and to every alternative.
    """

    head: frozenset[Rewrite]
    alternatives: tuple[tuple[str, frozenset[Rewrite]], ...]

    def __post_init__(self) -> None:
        labels = [label for label, _ in self.alternatives]
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"a Choice needs alternatives with distinct labels, got {labels}")


@dataclass(frozen=True)
class MethodStep:
    """What one method does at one step.

    Attributes:
        label: Short name of the method's graph at this step (``"sp_reuse"``,
            ``"dc_partial"``); a step's variant is named after its methods' labels.
        rewrites: The rewrites the step needs.
        drops_uncond: The step runs only the unconditional half of a CFG batch
            (the prediction is returned for both halves).
        phase: Name of the method's phase at this step (``""`` if it has none).
        columns: ``(header, value)`` pairs the printed plan shows for this method.
        choice: If set, the step's graph is chosen at run time (:class:`Choice`);
            ``rewrites`` must then be empty.
    """

    label: str
    rewrites: frozenset[Rewrite] = frozenset()
    drops_uncond: bool = False
    phase: str = ""
    columns: tuple[tuple[str, str], ...] = field(default=())
    choice: Choice | None = None

    def __post_init__(self) -> None:
        if self.choice is not None and self.rewrites:
            raise ValueError("a MethodStep with a choice gives its rewrites in the choice, not in rewrites")


@dataclass(frozen=True)
class ScheduleContext:
    """What a method's :meth:`~Method.schedule` may know of a generation, the same for every method.

    Attributes:
        num_steps: Denoiser steps of the generation.
        cfg: Whether it runs classifier-free guidance.
        timesteps: The timestep of each step (what the pipeline passes to the
            denoiser), or ``None`` if unknown.
        barriers: Steps at which the *other* methods of the plan need every
            cache refreshed (this method computes everything there).
        drops_uncond: Steps at which another method of the plan drops the
            unconditional half of the CFG batch (the batch is halved there).
        split: CFG runs as two denoiser calls a step (Wan's pipelines), each
            call one half of the pair: a value a method shares across the
            pair is one call's part, and the runtime keeps the mean of the
            two calls' parts (see :meth:`~tgate_fx.core.variants.CacheIO.write`).
    """

    num_steps: int
    cfg: bool
    timesteps: tuple[float, ...] | None = None
    barriers: frozenset[int] = frozenset()
    drops_uncond: frozenset[int] = frozenset()
    split: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.num_steps!r}")
        if self.timesteps is not None and len(self.timesteps) != self.num_steps:
            raise ValueError(f"timesteps must have one value per step ({self.num_steps}), got {len(self.timesteps)}")
        if self.split and not self.cfg:
            raise ValueError("split=True (CFG as two calls a step) needs cfg=True")

    def pairs(self, step: int) -> bool:
        """Whether ``step`` runs the CFG batch as ``[uncond, cond]`` pairs (CFG on, and no other method dropped a half)."""
        return self.cfg and step not in self.drops_uncond


def tagged_nodes(graph: fx.Graph, method: str, group: str) -> list[tuple[fx.Node, CacheKey]]:
    """The nodes ``method`` tagged with ``group``, in graph order, with their cache keys."""
    key = tag_key(method)
    out = []
    for node in graph.nodes:
        tag = node.meta.get(key)
        if tag is not None and tag["group"] == group:
            out.append((node, CacheKey(method, tag["site"], tag["slot"])))
    return out


class Method(ABC):
    """A training-free acceleration method, as the core sees it.

    Subclasses set :attr:`name` (tags, cache keys, JSON), :attr:`title`
    (for people) and :attr:`config_class` (their settings dataclass, with a
    ``to_dict()``); an instance holds its settings in :attr:`config`.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def bind(self, denoiser: Any) -> "Method":
        """This method resolved for ``denoiser``: ``self``, or a new method whose settings derived from the
        denoiser are filled in (e.g. ToCa's family defaults). The config is never mutated.

        Raises ``TypeError`` (saying why and what would work) if the method cannot apply to ``denoiser``;
        ``ValueError`` if its settings do not fit it. Called by :func:`tgate_fx.optimize` before anything
        is installed.
        """
        return self

    @abstractmethod
    def annotate(self, graph_module: fx.GraphModule, regions: Any) -> None:
        """Tag the nodes this method may rewrite (``node.meta[tag_key(name)] = {"group", "site", "slot"}``).

        ``regions`` is the capture's :class:`~tgate_fx.core.analysis.Regions`.
        Raises ``ValueError`` (naming the method and why) if the graph lacks
        what the method needs.
        """

    @abstractmethod
    def schedule(self, ctx: ScheduleContext) -> list[MethodStep]:
        """One :class:`MethodStep` per step of the generation ``ctx`` describes.

        A method that reads ``ctx.timesteps`` documents what it assumes when they are ``None``.
        """

    def barriers(self, ctx: ScheduleContext) -> frozenset[int]:
        """Steps at which the other methods must compute everything (refresh every cache).

        ``ctx`` has no barriers or dropped steps of the others yet.
        """
        return frozenset()

    def validate(self, ctx: ScheduleContext) -> None:
        """Raise ``ValueError`` if this method cannot serve the generation ``ctx`` describes."""

    def inert_reason(self, denoiser: Any) -> str | None:
        """Why these settings would rewrite nothing of ``denoiser`` (``None``: they rewrite something, or it
        cannot be told before a capture). :func:`tgate_fx.optimize` warns with it, and ``report`` shows it."""
        return None

    def transform_pass(self, nodes: list, option: Any, caches: Any):
        """The pass a ``"transform"`` rewrite runs: ``nodes`` are the tagged nodes of the group in the
        variant's graph, in graph order, ``option`` the rewrite's; ``caches`` is the variant's
        :class:`~tgate_fx.core.variants.CacheIO`, through which the pass may read and write caches.
        Methods without transforms need not implement it."""
        raise NotImplementedError(f"method {self.name!r} schedules transforms but has no transform_pass")

    def decide(self, step: int, caches: dict, labels: tuple[str, ...]) -> str:
        """At a :class:`Choice` step, after its head ran: which of ``labels`` (the step's alternatives, as
        its schedule gave them) runs.

        ``caches`` are the generation's (for a split-CFG call, its own role's), holding what the head
        recorded; the method may store its own state there under its own :class:`CacheKey` s (e.g. a
        residual the next alternative reads). A step with one alternative (a barrier of another method,
        say) still asks, so that the method's state follows. Methods without choices need not implement it."""
        raise NotImplementedError(f"method {self.name!r} schedules choices but has no decide")

    def compose(self, others: list[Method]) -> None:
        """Adapt to, or refuse (``ValueError``), the other methods of the same plan (called by
        :func:`as_methods`); the default does nothing."""

    def describe(self) -> str:
        """One line: the method and its settings."""
        return f"{self.name}: {self.config}"


# Method name -> method class, in the order methods are composed and printed (the order they registered in).
_REGISTRY: dict[str, type[Method]] = {}


def register_method(method_cls: type[Method]) -> type[Method]:
    """Make ``method_cls`` known to :func:`as_methods` (its config then selects it); returns it."""
    known = _REGISTRY.get(method_cls.name)
    if known is not None and known is not method_cls:
        raise ValueError(f"two methods are named {method_cls.name!r}: {known.__name__} and {method_cls.__name__}")
    _REGISTRY[method_cls.name] = method_cls
    return method_cls


def registered_methods() -> dict[str, type[Method]]:
    """Name -> class of every registered method, in composition order."""
    return dict(_REGISTRY)


def as_methods(methods: Any) -> list[Method]:
    """Methods from a config, a :class:`Method`, or a sequence of them; sorted in registration order.

    Raises:
        TypeError: for anything else.
        ValueError: if a method appears twice.
    """
    by_config = {m.config_class: m for m in _REGISTRY.values()}
    items = list(methods) if isinstance(methods, Sequence) and not isinstance(methods, str) else [methods]
    out: list[Method] = []
    for item in items:
        if isinstance(item, Method):
            out.append(item)
        elif type(item) in by_config:
            out.append(by_config[type(item)](item))
        else:
            raise TypeError(f"expected a method config ({', '.join(m.config_class.__name__ for m in _REGISTRY.values())}) "
                            f"or a Method, got {type(item).__name__}")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"each method may appear once, got {names}")
    order = list(_REGISTRY)
    out = sorted(out, key=lambda m: order.index(m.name) if m.name in order else len(order))
    for method in out:  # a method may adapt to the others (ToCa: steps where another drops the CFG half)
        method.compose([m for m in out if m is not method])
    return out
