"""DeepCache settings, validated once."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .._checks import check_int

__all__ = ["DeepCacheConfig"]

SKIP_MODES = ("uniform",)


@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache's schedule, with the names and meaning of ``DeepCacheSDHelper.set_params``.

    Attributes:
        cache_interval: Every ``cache_interval``-th step (counted from the
            first step of the generation, and from every step where another
            method asks for a refresh, e.g. T-GATE's gate) runs the whole UNet
            and records the features entering the up path at the branch; the
            steps between read them back and skip every down/mid/up module
            deeper than the branch. ``1`` caches nothing.
        cache_branch_id: Where the UNet is cut: block ``cache_branch_id // 3``
            of the down path, layer ``cache_branch_id % 3``, mirrored on the up
            path. ``0`` (the published default) keeps only the outermost layers.
        skip_mode: ``"uniform"`` (the only mode: full steps at a fixed interval).
    """

    cache_interval: int = 3
    cache_branch_id: int = 0
    skip_mode: str = "uniform"

    def __post_init__(self) -> None:
        check_int("cache_interval", self.cache_interval, 1)
        check_int("cache_branch_id", self.cache_branch_id, 0)
        if self.skip_mode not in SKIP_MODES:
            raise ValueError(f"skip_mode must be one of {SKIP_MODES}, got {self.skip_mode!r} "
                             "(the published non-uniform mode is not implemented)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
