"""T-GATE settings, validated once."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .._checks import check_int

__all__ = ["TGateConfig"]


@dataclass(frozen=True)
class TGateConfig:
    """The T-GATE schedule, with the names and meaning of the reference code.

    Steps are 0-based denoising steps of one generation (one denoiser call each).

    Attributes:
        gate_step: The gate. Steps ``< gate_step`` run classifier-free guidance
            and compute cross-attention; step ``gate_step - 1`` records
            every attention output (the mean of the two CFG halves); steps
            ``>= gate_step`` reuse the cross-attention cache and drop the
            unconditional branch. Must be ``>= 1`` and at most the number of
            steps of each call (checked at call time).
        sp_interval: Semantics-planning phase (before the gate): after
            ``warm_up``, self-attention is recomputed and recorded at steps
            where ``step % sp_interval == 0`` and reused from the cache at the
            others. ``1`` disables self-attention reuse before the gate.
        fi_interval: Fidelity-improving phase (after the gate): self-attention
            is recomputed and recorded where ``step % fi_interval == 0`` and
            reused otherwise. ``1`` disables reuse after the gate.
        warm_up: Steps ``< warm_up`` compute everything; step ``warm_up``
            records the first self-attention cache.
        lcm: ``None`` (default) decides from each call whether classifier-free
            guidance is on. ``True`` states that the pipeline runs without
            guidance (LCM, guidance 0), ``False`` that it runs with it; a call
            that contradicts the statement raises ``ValueError``.
    """

    gate_step: int = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2
    lcm: bool | None = None

    def __post_init__(self) -> None:
        check_int("gate_step", self.gate_step, 1)
        check_int("sp_interval", self.sp_interval, 1)
        check_int("fi_interval", self.fi_interval, 1)
        check_int("warm_up", self.warm_up, 0)
        if self.lcm is not None and not isinstance(self.lcm, bool):
            raise TypeError(f"lcm must be None, True or False, got {self.lcm!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
