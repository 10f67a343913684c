"""What a method is, to the core: tags on nodes, and per-step rewrites of the tagged nodes.

A *method* (T-GATE, DeepCache, ...) is data plus passes. The core knows it
only through this interface:

* :meth:`Method.annotate` tags the nodes of a captured graph that the method
  may rewrite, under its own namespace (:func:`tag_key`), each with a *group*
  (e.g. ``"cross"``: every cross-attention output), a *site* (a module path)
  and a *slot* (which value of the site);
* :meth:`Method.schedule` says, for every step of a generation, which groups
  it records (exposes as cache writes) or reuses (replaces by cache reads),
  as :class:`Rewrite`\\ s, and whether the step drops the unconditional half
  of a CFG batch;
* :meth:`Method.barriers` names steps at which every *other* method must
  refresh its caches (compute everything), e.g. because the batch changes
  there; :meth:`Method.validate` rejects a generation it cannot serve.

A method whose schedule depends on the generation's timesteps (not only on
the step count) sets :attr:`Method.reads_timesteps`; its ``schedule`` then
also receives ``timesteps=``: one value per step as the pipeline passes it
to the denoiser, or ``None`` where they are unknown (a plan made for
accounting or a check, without a scheduler). The step index never comes from
them: they only say what a step's timestep is.

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

__all__ = ["RECORD", "REUSE", "TRANSFORM", "CacheKey", "InertMethodWarning", "Method", "MethodStep", "Rewrite", "as_methods",
           "register_method", "registered_methods", "tag_key", "tagged_nodes"]

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
    """

    label: str
    rewrites: frozenset[Rewrite] = frozenset()
    drops_uncond: bool = False
    phase: str = ""
    columns: tuple[tuple[str, str], ...] = field(default=())


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
    #: ``True``: :meth:`schedule` takes a ``timesteps`` keyword (a tuple of floats, one per step, or ``None``).
    reads_timesteps: ClassVar[bool] = False

    def __init__(self, config: Any):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @abstractmethod
    def annotate(self, graph_module: fx.GraphModule, regions: Any) -> None:
        """Tag the nodes this method may rewrite (``node.meta[tag_key(name)] = {"group", "site", "slot"}``).

        ``regions`` is the capture's :class:`~tgate_fx.core.analysis.Regions`.
        Raises ``ValueError`` (naming the method and why) if the graph lacks
        what the method needs.
        """

    @abstractmethod
    def schedule(self, num_steps: int, cfg: bool, barriers: frozenset[int]) -> list[MethodStep]:
        """One :class:`MethodStep` per step of a generation of ``num_steps`` steps.

        A method with :attr:`reads_timesteps` also takes ``timesteps`` (keyword):
        the timestep of each step, or ``None`` if unknown; it documents what it
        assumes then.
        """

    def barriers(self, num_steps: int, cfg: bool) -> frozenset[int]:
        """Steps at which the other methods must compute everything (refresh every cache)."""
        return frozenset()

    def validate(self, num_steps: int, cfg: bool) -> None:
        """Raise ``ValueError`` if this method cannot serve such a generation."""

    def check_denoiser(self, denoiser: Any) -> None:
        """Raise ``TypeError`` (saying why and what would work) if this method cannot apply to ``denoiser``.

        Called by :func:`tgate_fx.optimize` before anything is installed.
        """

    def inert_reason(self, denoiser: Any) -> str | None:
        """Why these settings would rewrite nothing of ``denoiser`` (``None``: they rewrite something, or it
        cannot be told before a capture). :func:`tgate_fx.optimize` warns with it, and ``report`` shows it."""
        return None

    def transform_pass(self, nodes: list, option: Any):
        """The pass a ``"transform"`` rewrite runs: ``nodes`` are the tagged nodes of the group in the
        variant's graph, in graph order, ``option`` the rewrite's. Methods without transforms need not
        implement it."""
        raise NotImplementedError(f"method {self.name!r} schedules transforms but has no transform_pass")

    def compose(self, others: list[Method]) -> None:
        """Adapt to the other methods of the same plan (called by :func:`as_methods`); the default does nothing."""

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
