"""T-GATE: cache cross-attention after a gate step and drop the unconditional branch."""

from .config import TGateConfig
from .method import CROSS, SELF, TGate

__all__ = ["CROSS", "SELF", "TGate", "TGateConfig"]
