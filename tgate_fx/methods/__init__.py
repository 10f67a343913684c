"""The methods tgate_fx implements, each a package: a config dataclass, an annotation, a schedule.

:func:`as_methods` turns what users pass (configs, :class:`~tgate_fx.core.method.Method`
objects, or a sequence of them) into methods, in a fixed order.
"""

from __future__ import annotations

from ..core.method import Method, as_methods, register_method
from .blockcache import BlockCache, BlockCacheConfig
from .deepcache import DeepCache, DeepCacheConfig
from .tgate import TGate, TGateConfig
from .toca import ToCa, ToCaConfig
from .todo import ToDo, ToDoConfig

__all__ = ["METHODS", "BlockCache", "BlockCacheConfig", "DeepCache", "DeepCacheConfig", "TGate", "TGateConfig", "ToCa", "ToCaConfig", "ToDo", "ToDoConfig",
           "as_methods"]

# Method name -> method class, in the order methods are composed and printed.
METHODS: dict[str, type[Method]] = {m.name: register_method(m) for m in (TGate, DeepCache, ToDo, ToCa, BlockCache)}
