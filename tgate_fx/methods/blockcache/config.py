"""Block cache settings, validated once."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .._checks import check_int

__all__ = ["BlockCacheConfig"]


@dataclass(frozen=True)
class BlockCacheConfig:
    """First Block Cache, with the meaning of diffusers' ``FirstBlockCacheConfig`` (or FORA's fixed interval).

    Attributes:
        threshold: At every step the first transformer block runs. When the
            relative change of its residual (its output minus its input, in the
            image stream) since the last step that ran every block,
            ``mean(|r - r_prev|) / mean(|r_prev|)``, is at most ``threshold``,
            the other blocks are skipped: the residual they added at that step
            (of each stream) is added to the first block's output instead.
            Otherwise they run, and their residual is stored. ``0`` never skips.
            diffusers' default is ``0.05``.
        fora_interval: ``None`` (the threshold decides), or FORA's fixed schedule: the blocks after
            the first run at every ``fora_interval``-th step (counted from the first step, and from every
            step where another method asks for a refresh, e.g. T-GATE's gate) and are skipped at the
            others, whatever the residual; ``threshold`` is then not read. ``1`` skips nothing.
    """

    threshold: float = 0.05
    fora_interval: int | None = None

    def __post_init__(self) -> None:
        if self.fora_interval is not None:
            check_int("fora_interval", self.fora_interval, 1)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
