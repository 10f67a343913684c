"""The passes the core runs on every variant it builds (methods never call them).

A :class:`~tgate_fx.core.method.Rewrite` that records a value becomes
:class:`ExposeValues` (the value is an extra graph output), one that reuses it
becomes :class:`ReplaceValuesWithCache` (the value is a graph input), the head of a
choice step loses its prediction (:class:`DropPrediction`), and
:class:`EliminateDeadCode` and :class:`RemoveUnusedInputs` then drop what no
longer feeds an output. :class:`GraphPass`, :func:`new_node`, :func:`call_traced` (a torch
function traced into the graph) and :func:`first_user` (and the graph walks :func:`upstream`, :func:`downstream`,
:func:`nodes_between`) are the base every
pass, here and in :mod:`tgate_fx.passes`, is built on.
"""

from .base import GraphPass, PassResult, downstream, first_user, new_node, nodes_between, upstream
from .inline import call_traced
from .drop_prediction import DropPrediction
from .eliminate_dead_code import EliminateDeadCode
from .expose_values import ExposeValues
from .remove_unused_inputs import RemoveUnusedInputs
from .replace_values_with_cache import ReplaceValuesWithCache

__all__ = ["DropPrediction", "EliminateDeadCode", "ExposeValues", "GraphPass", "PassResult", "RemoveUnusedInputs", "ReplaceValuesWithCache",
           "call_traced", "downstream", "first_user", "new_node", "nodes_between", "upstream"]
