"""The passes the core runs on every variant it builds (methods never call them).

A :class:`~tgate_fx.core.method.Rewrite` that records a value becomes
:class:`ExposeValues` (the value is an extra graph output), one that reuses it
becomes :class:`ReplaceValuesWithCache` (the value is a graph input), and
:class:`EliminateDeadCode` and :class:`RemoveUnusedInputs` then drop what no
longer feeds an output. :class:`GraphPass` and :func:`new_node` are the base
every pass, here and in :mod:`tgate_fx.passes`, is built on.
"""

from .base import GraphPass, PassResult, new_node
from .eliminate_dead_code import EliminateDeadCode
from .expose_values import ExposeValues
from .remove_unused_inputs import RemoveUnusedInputs
from .replace_values_with_cache import ReplaceValuesWithCache

__all__ = ["EliminateDeadCode", "ExposeValues", "GraphPass", "PassResult", "RemoveUnusedInputs", "ReplaceValuesWithCache",
           "new_node"]
