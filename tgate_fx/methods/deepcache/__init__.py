"""DeepCache: reuse a UNet's deep features between full steps."""

from .config import DeepCacheConfig
from .method import DeepCache

__all__ = ["DeepCache", "DeepCacheConfig"]
