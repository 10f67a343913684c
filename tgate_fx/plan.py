"""The step plan: which graph variant runs at each denoising step.

A :class:`Plan` is plain data. It is derived from the T-GATE settings, the
number of steps of a generation and whether that generation runs
classifier-free guidance (CFG), and it reproduces the reference scheduler
(``tgate_scheduler`` in the T-GATE code) step by step. It says nothing about
graphs or tensors: the runtime turns each :class:`VariantSpec` into a graph.

Example::

    >>> from tgate_fx import Plan, TGateConfig
    >>> plan = Plan(25, TGateConfig(gate_step=10), cfg=True)
    >>> plan.steps[3].variant
    'sp_reuse'
    >>> print(plan)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TGateConfig

__all__ = ["CROSS", "SELF", "Plan", "StepPlan", "VariantSpec"]

SELF = "self"
CROSS = "cross"


@dataclass(frozen=True)
class VariantSpec:
    """What a graph variant does with each role of attention site.

    Attributes:
        name: Stable, human-readable name of the variant.
        reuse: Roles whose attention outputs are read from caches (their
            attention computation is removed from the graph).
        record: Roles whose attention outputs become extra graph outputs,
            to be stored as caches.
        cfg_mean: Recorded outputs are the mean of the CFG halves
            ``(uncond + cond) / 2`` instead of the full batch.
    """

    name: str
    reuse: frozenset[str] = frozenset()
    record: frozenset[str] = frozenset()
    cfg_mean: bool = False


def _spec(name: str, reuse=(), record=(), cfg_mean=False) -> VariantSpec:
    return VariantSpec(name, frozenset(reuse), frozenset(record), cfg_mean)


# The variants of the reference schedule. "sp" = semantics-planning phase
# (before the gate), "fi" = fidelity-improving phase (after it).
_SP_COMPUTE = _spec("sp_compute")
_SP_RECORD = _spec("sp_record", record=[SELF])
_SP_REUSE = _spec("sp_reuse", reuse=[SELF])
_GATE_CFG = _spec("gate", record=[SELF, CROSS], cfg_mean=True)
_GATE_NO_CFG = _spec("gate", record=[SELF, CROSS])
_FI_RECORD = _spec("fi_record", reuse=[CROSS], record=[SELF])
_FI_REUSE = _spec("fi_reuse", reuse=[CROSS, SELF])


def _action(spec: VariantSpec, role: str) -> str:
    if role in spec.reuse:
        return "reuse"
    return "record" if role in spec.record else "compute"


@dataclass(frozen=True)
class StepPlan:
    """One denoising step: its phase, variant and CFG state."""

    step: int
    phase: str
    variant: VariantSpec
    cfg: bool

    @property
    def cross(self) -> str:
        return _action(self.variant, CROSS)

    @property
    def self_attn(self) -> str:
        return _action(self.variant, SELF)


class Plan:
    """Maps each step of a generation to a graph variant, CFG on/off, cache reads and writes.

    Args:
        num_steps: Denoiser calls in the generation.
        config: The T-GATE settings.
        cfg: Whether the generation runs classifier-free guidance. After the
            gate, CFG is off in every case.

    Raises:
        ValueError: if ``config.gate_step`` exceeds ``num_steps``.
    """

    def __init__(self, num_steps: int, config: TGateConfig, cfg: bool):
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        if config.gate_step > num_steps:
            raise ValueError(
                f"gate_step={config.gate_step} is beyond the {num_steps} denoising steps of this generation; "
                f"use 1 <= gate_step <= {num_steps}"
            )
        self.num_steps = num_steps
        self.config = config
        self.cfg = cfg
        self.steps = [self._step(i) for i in range(num_steps)]

    def _step(self, cur: int) -> StepPlan:
        c = self.config
        if cur < c.gate_step - 1:
            if cur < c.warm_up:
                spec = _SP_COMPUTE
            elif cur == c.warm_up or cur % c.sp_interval == 0:
                spec = _SP_RECORD
            else:
                spec = _SP_REUSE
            return StepPlan(cur, "semantics-planning", spec, self.cfg)
        if cur == c.gate_step - 1:
            return StepPlan(cur, "gate", _GATE_CFG if self.cfg else _GATE_NO_CFG, self.cfg)
        spec = _FI_RECORD if cur % c.fi_interval == 0 else _FI_REUSE
        return StepPlan(cur, "fidelity-improving", spec, False)

    @property
    def variants(self) -> dict[str, VariantSpec]:
        """The distinct variants this plan uses, in order of first use."""
        out: dict[str, VariantSpec] = {}
        for s in self.steps:
            out.setdefault(s.variant.name, s.variant)
        return out

    def reads(self, step: int) -> tuple[str, ...]:
        """Roles whose caches the step reads."""
        return tuple(sorted(self.steps[step].variant.reuse))

    def writes(self, step: int) -> tuple[str, ...]:
        """Roles whose caches the step writes."""
        return tuple(sorted(self.steps[step].variant.record))

    def to_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "cfg": self.cfg,
            "config": self.config.to_dict(),
            "steps": [
                {"step": s.step, "phase": s.phase, "variant": s.variant.name, "cfg": s.cfg,
                 "reads": list(self.reads(s.step)), "writes": list(self.writes(s.step)),
                 "cfg_mean": s.variant.cfg_mean}
                for s in self.steps
            ],
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        c = self.config
        return (f"Plan(num_steps={self.num_steps}, gate_step={c.gate_step}, sp_interval={c.sp_interval}, "
                f"fi_interval={c.fi_interval}, warm_up={c.warm_up}, cfg={self.cfg})")

    def __str__(self) -> str:
        header = ("step", "phase", "variant", "CFG", "cross-attn", "self-attn", "reads", "writes")
        rows = [header]
        for s in self.steps:
            writes = ",".join(self.writes(s.step)) or "-"
            if s.variant.cfg_mean and writes != "-":
                writes += " (CFG mean)"
            rows.append((str(s.step), s.phase, s.variant.name, "on" if s.cfg else "off", s.cross, s.self_attn,
                         ",".join(self.reads(s.step)) or "-", writes))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [repr(self)]
        for k, r in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)
