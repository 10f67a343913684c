"""The methods' graph passes. Each takes a ``GraphModule`` and returns a ``PassResult``; none knows about steps,
pipelines or methods. The passes every variant runs (records, cache reads, clean-up) are the core's:
:mod:`tgate_fx.core.graph_passes`."""

from .cache_tokens import CacheTokens, CountReset, ScoreSite, TokenRefresh
from .compute_attention_map import ComputeAttentionMap
from .downsample_key_values import DownsampleKeyValues
from .restrict_queries import QueryRows, RestrictQueries
from .restrict_to_tokens import RestrictToTokens, TokenRegion
from .token_math import TokenSelection

__all__ = ["CacheTokens", "ComputeAttentionMap", "CountReset", "DownsampleKeyValues", "QueryRows", "RestrictQueries", "RestrictToTokens", "ScoreSite",
           "TokenRefresh", "TokenRegion", "TokenSelection"]
