"""Graph passes. Each takes a ``GraphModule`` and returns a ``PassResult``; none knows about steps or pipelines."""

from .eliminate_dead_code import EliminateDeadCode
from .expose_attention_outputs import ExposeAttentionOutputs
from .remove_unused_inputs import RemoveUnusedInputs
from .replace_attention_with_cache import ReplaceAttentionWithCache, cache_input_name

__all__ = [
    "EliminateDeadCode",
    "ExposeAttentionOutputs",
    "RemoveUnusedInputs",
    "ReplaceAttentionWithCache",
    "cache_input_name",
]
