"""Block cache (First Block Cache): reuse the residual of a transformer's blocks after the first."""

from .config import BlockCacheConfig
from .method import BlockCache

__all__ = ["BlockCache", "BlockCacheConfig"]
