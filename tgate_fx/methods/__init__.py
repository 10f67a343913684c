"""The methods tgate_fx implements, each a package: a config dataclass, an annotation, a schedule.

:func:`as_methods` turns what users pass (configs, :class:`~tgate_fx.core.method.Method`
objects, or a sequence of them) into methods, in a fixed order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..core.method import Method
from .deepcache import DeepCache, DeepCacheConfig
from .tgate import TGate, TGateConfig
from .toca import ToCa, ToCaConfig
from .todo import ToDo, ToDoConfig

__all__ = ["METHODS", "DeepCache", "DeepCacheConfig", "TGate", "TGateConfig", "ToCa", "ToCaConfig", "ToDo", "ToDoConfig",
           "as_methods"]

# Method name -> method class, in the order methods are composed and printed.
METHODS: dict[str, type[Method]] = {m.name: m for m in (TGate, DeepCache, ToDo, ToCa)}
_BY_CONFIG = {m.config_class: m for m in METHODS.values()}


def as_methods(methods: Any) -> list[Method]:
    """Methods from a config, a :class:`Method`, or a sequence of them; sorted in :data:`METHODS` order.

    Raises:
        TypeError: for anything else.
        ValueError: if a method appears twice.
    """
    items = list(methods) if isinstance(methods, Sequence) and not isinstance(methods, str) else [methods]
    out: list[Method] = []
    for item in items:
        if isinstance(item, Method):
            out.append(item)
        elif type(item) in _BY_CONFIG:
            out.append(_BY_CONFIG[type(item)](item))
        else:
            raise TypeError(f"expected a method config ({', '.join(m.config_class.__name__ for m in METHODS.values())}) "
                            f"or a Method, got {type(item).__name__}")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"each method may appear once, got {names}")
    order = list(METHODS)
    out = sorted(out, key=lambda m: order.index(m.name) if m.name in order else len(order))
    for method in out:  # a method may adapt to the others (ToCa: steps where another drops the CFG half)
        compose = getattr(method, "compose", None)
        if compose is not None:
            compose([m for m in out if m is not method])
    return out
