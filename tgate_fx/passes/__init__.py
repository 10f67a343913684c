"""Graph passes. Each takes a ``GraphModule`` and returns a ``PassResult``; none knows about steps, pipelines or methods."""

from .compute_attention_map import ComputeAttentionMap
from .downsample_key_values import DownsampleKeyValues
from .eliminate_dead_code import EliminateDeadCode
from .expose_values import ExposeValues
from .remove_unused_inputs import RemoveUnusedInputs
from .replace_values_with_cache import ReplaceValuesWithCache
from .restrict_to_tokens import RestrictToTokens, TokenRegion

__all__ = ["ComputeAttentionMap", "DownsampleKeyValues", "EliminateDeadCode", "ExposeValues", "RemoveUnusedInputs",
           "ReplaceValuesWithCache", "RestrictToTokens", "TokenRegion"]
