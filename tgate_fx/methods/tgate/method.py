"""T-GATE as a method: tags on attention outputs, and the reference schedule as per-step rewrites.

Annotation: the output of every self- and cross-attention site (the
``to_out`` value found by :mod:`tgate_fx.core.analysis`) is tagged with group
``"self"`` or ``"cross"``. Schedule: the reference ``tgate_scheduler`` step by
step (tested against it for thousands of settings):

* steps ``< warm_up`` compute everything; step ``warm_up`` and, before the
  gate, steps with ``step % sp_interval == 0`` record self-attention; the
  others reuse it;
* step ``gate_step - 1`` records every attention output, as the mean of the
  two CFG halves when the generation runs CFG;
* after it, cross-attention is reused and the unconditional half dropped;
  self-attention is recorded where ``step % fi_interval == 0``, reused otherwise.

Barriers: the gate step (every site is recorded there) and the step after it
(the batch halves), so that a composed method computes everything on both,
as the reference ``tgate/SD_DeepCache.py`` restarts DeepCache there.
"""

from __future__ import annotations

import torch.fx as fx

from ...core.analysis import (Regions, cross_attention_modules, describe_attention,
                              is_text_conditioned, joint_attention_modules)
from ...core.method import CFG_MEAN, RECORD, REUSE, Method, MethodStep, Rewrite, ScheduleContext
from ...core.meta import tag_key
from .config import TGateConfig

__all__ = ["CROSS", "SELF", "TGate"]

SELF = "self"
CROSS = "cross"
NAME = "tgate"
def _rewrites(reuse=(), record=(), cfg_mean=False) -> frozenset[Rewrite]:
    return frozenset([Rewrite(NAME, g, REUSE) for g in reuse]
                     + [Rewrite(NAME, g, RECORD, CFG_MEAN if cfg_mean else None) for g in record])


def _action(rewrites: frozenset[Rewrite], group: str) -> str:
    actions = {r.action for r in rewrites if r.group == group}
    return next(iter(actions)) if actions else "compute"


class TGate(Method):
    """T-GATE (arXiv 2404.02747); settings in :class:`TGateConfig`."""

    name = NAME
    config_class = TGateConfig
    title = "T-GATE"

    def bind(self, denoiser) -> "TGate":
        name = type(denoiser).__name__
        joint = joint_attention_modules(denoiser)
        if joint:
            raise TypeError(
                f"T-GATE cannot apply to {name}: its conditioning enters attention as added "
                f"keys/values ({joint[0]}{' and others' if len(joint) > 1 else ''}: joint attention as in SD3 and "
                "Flux, or Kandinsky's added K/V), so there is no separate cross-attention to cache and dropping the "
                "unconditional branch after the gate would lose the conditioning. "
                + ("DeepCache applies to this UNet: optimize(pipe, deepcache=DeepCacheConfig())."
                   if hasattr(denoiser, "up_blocks") else "No method of tgate_fx applies to it yet."))
        if not cross_attention_modules(denoiser):
            raise TypeError(
                f"T-GATE cannot apply to {name}: it caches cross-attention (keys and values from the text), and none "
                f"of its attention modules is one ({describe_attention(denoiser)}). "
                + ("Its text tokens enter attention together with the image tokens (joint attention, as in "
                   "CogVideoX, Lumina2, HiDream and Flux's single-stream blocks), so there is no cross-attention "
                   "output to cache." if is_text_conditioned(denoiser) else "It is not text-conditioned (class labels or no conditioning); for DiT use "
                   "ToCa: optimize(pipe, toca=ToCaConfig())."))
        return self

    def annotate(self, graph_module: fx.GraphModule, regions: Regions) -> None:
        key = tag_key(NAME)
        by_name = {n.name: n for n in graph_module.graph.nodes}
        if not any(site.role == CROSS for site in regions.attention):
            raise ValueError(
                "T-GATE found no cross-attention (keys/values from encoder_hidden_states) in this denoiser's "
                f"graph ({len(regions.attention)} attention sites, roles "
                f"{sorted({s.role for s in regions.attention})}): after the gate it would drop the conditioning. "
                "T-GATE needs a text-conditioned denoiser with cross-attention")
        for site in regions.attention:
            if site.role in (SELF, CROSS):
                by_name[site.value].meta[key] = {"group": site.role, "site": site.path, "slot": "out"}

    def validate(self, ctx: ScheduleContext) -> None:
        c, num_steps, cfg = self.config, ctx.num_steps, ctx.cfg
        if c.gate_step > num_steps:
            raise ValueError(
                f"gate_step={c.gate_step} is beyond the {num_steps} denoising steps of this generation; "
                f"use 1 <= gate_step <= {num_steps}"
            )
        if c.lcm is True and cfg:
            raise ValueError("lcm=True, but this call runs classifier-free guidance (a 2B batch of "
                             "[uncond, cond]); use lcm=None, or guidance_scale <= 1")
        if c.lcm is False and not cfg:
            raise ValueError("lcm=False, but this call runs without classifier-free guidance; "
                             "use lcm=None (decide per call) or lcm=True")

    def barriers(self, ctx: ScheduleContext) -> frozenset[int]:
        return frozenset(s for s in (self.config.gate_step - 1, self.config.gate_step) if s < ctx.num_steps)

    def schedule(self, ctx: ScheduleContext) -> list[MethodStep]:
        return [self._step(cur, ctx.cfg) for cur in range(ctx.num_steps)]

    def _step(self, cur: int, cfg: bool) -> MethodStep:
        c = self.config
        if cur < c.gate_step - 1:
            phase = "semantics-planning"
            if cur < c.warm_up:
                label, rewrites = "sp_compute", _rewrites()
            elif cur == c.warm_up or cur % c.sp_interval == 0:
                label, rewrites = "sp_record", _rewrites(record=[SELF])
            else:
                label, rewrites = "sp_reuse", _rewrites(reuse=[SELF])
            drops = False
        elif cur == c.gate_step - 1:
            phase, label, rewrites, drops = "gate", "gate", _rewrites(record=[SELF, CROSS], cfg_mean=cfg), False
        else:
            phase, drops = "fidelity-improving", True
            if cur % c.fi_interval == 0:
                label, rewrites = "fi_record", _rewrites(reuse=[CROSS], record=[SELF])
            else:
                label, rewrites = "fi_reuse", _rewrites(reuse=[CROSS, SELF])
        columns = (("cross-attn", _action(rewrites, CROSS)), ("self-attn", _action(rewrites, SELF)))
        return MethodStep(label, rewrites, drops, phase, columns)

    def describe(self) -> str:
        c = self.config
        return f"gate_step={c.gate_step}, sp_interval={c.sp_interval}, fi_interval={c.fi_interval}, warm_up={c.warm_up}"
