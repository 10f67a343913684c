"""ToCa: token-wise feature caching for diffusion transformers (PixArt, DiT)."""

from .config import ToCaConfig
from .method import ToCa

__all__ = ["ToCa", "ToCaConfig"]
