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

Joint attention (SD3 / SD3.5, FLUX's double-stream blocks, Qwen-Image): the
text tokens' keys and values and each block's text-stream output are recorded
at the gate and reused after it, as cross-attention is, and the attention then
runs on the image queries only (:mod:`.joint`).

Barriers: the gate step (every site is recorded there) and the step after it
(the batch halves), so that a composed method computes everything on both,
as the reference ``tgate/SD_DeepCache.py`` restarts DeepCache there.
"""

from __future__ import annotations

import torch.fx as fx

from ...core.analysis import (Regions, cross_attention_modules, describe_attention,
                              is_text_conditioned, joint_attention_modules)
from ...core.method import CFG_MEAN, RECORD, REUSE, TRANSFORM, Method, MethodStep, Rewrite, ScheduleContext
from ...core.meta import tag_key
from .config import TGateConfig
from .joint import JOINT_BLOCKS, JOINT_KV, JOINT_QUERY, JOINT_TEXT, annotate_joint, joint_pass

__all__ = ["CROSS", "SELF", "TGate"]

SELF = "self"
CROSS = "cross"
NAME = "tgate"
# What the gate records and the steps after it reuse, besides self-attention: cross-attention, or (a denoiser
# with joint attention, see bind) the text tokens' keys, values and text stream.
GATED = (CROSS,)
GATED_JOINT = (JOINT_KV, JOINT_TEXT)


def _rewrites(reuse=(), record=(), cfg_mean=False) -> frozenset[Rewrite]:
    rewrites = [Rewrite(NAME, g, REUSE) for g in reuse] + [Rewrite(NAME, g, RECORD, CFG_MEAN if cfg_mean else None)
                                                           for g in record]
    if JOINT_TEXT in reuse:  # the text rows of the joint attention are then not read: image queries only
        rewrites.append(Rewrite(NAME, JOINT_QUERY, TRANSFORM))
    return frozenset(rewrites)


def _action(rewrites: frozenset[Rewrite], group: str) -> str:
    actions = {r.action for r in rewrites if r.group == group}
    return next(iter(actions)) if actions else "compute"


class TGate(Method):
    """T-GATE (arXiv 2404.02747); settings in :class:`TGateConfig`."""

    name = NAME
    config_class = TGateConfig
    title = "T-GATE"

    joint = False  # set by bind: the denoiser's conditioning enters joint attention (columns of the plan)

    def bind(self, denoiser) -> "TGate":
        name = type(denoiser).__name__
        joint = joint_attention_modules(denoiser)
        if joint:
            blocks = dict(denoiser.named_modules())
            unserved = [p for p in joint if not (p.startswith("transformer_blocks.") and p.count(".") == 2
                                                 and p.endswith(".attn")
                                                 and type(blocks[p.rsplit(".", 1)[0]]).__name__ in JOINT_BLOCKS)]
            if unserved:
                raise TypeError(
                    f"T-GATE cannot apply to {name}: its conditioning enters attention as added keys/values "
                    f"({unserved[0]}{' and others' if len(unserved) > 1 else ''}), in blocks its joint-attention rule "
                    f"does not know (it serves {', '.join(sorted(JOINT_BLOCKS))}: SD3 / SD3.5, FLUX, Chroma, "
                    "Qwen-Image). "
                    + ("DeepCache applies to this UNet: optimize(pipe, deepcache=DeepCacheConfig())."
                       if hasattr(denoiser, "up_blocks") else
                       "The block cache may: optimize(pipe, blockcache=BlockCacheConfig())."))
            bound = TGate(self.config)
            bound.joint = True
            return bound
        if not cross_attention_modules(denoiser):
            raise TypeError(
                f"T-GATE cannot apply to {name}: it caches cross-attention (keys and values from the text), and none "
                f"of its attention modules is one ({describe_attention(denoiser)}). "
                + ("Its text tokens enter attention together with the image tokens in one sequence (joint "
                   "attention, as in CogVideoX, Lumina2 and HiDream), with no text stream of their own to cache." if is_text_conditioned(denoiser) else "It is not text-conditioned (class labels or no conditioning); for DiT use "
                   "ToCa: optimize(pipe, toca=ToCaConfig())."))
        return self

    def annotate(self, graph_module: fx.GraphModule, regions: Regions) -> None:
        key = tag_key(NAME)
        by_name = {n.name: n for n in graph_module.graph.nodes}
        joint = annotate_joint(regions, key)
        unreadable = [reason for path, reason in regions.unreadable.items() if path not in joint]
        if unreadable:
            raise ValueError(unreadable[0])
        sites = [s for s in regions.sites if s.path not in joint]  # a joint block's attention is not self-attention
        if not joint and not any(site.role == CROSS for site in sites):
            raise ValueError(
                "T-GATE found no cross-attention (keys/values from encoder_hidden_states) and no joint attention "
                f"in this denoiser's graph ({len(sites)} attention sites, roles {sorted({s.role for s in sites})}): "
                "after the gate it would drop the conditioning. T-GATE needs a text-conditioned denoiser with "
                "cross-attention or an MMDiT's joint attention")
        for site in sites:
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
        gated = GATED_JOINT if self.joint else GATED
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
            phase, label, rewrites, drops = "gate", "gate", _rewrites(record=[SELF, *gated], cfg_mean=cfg), False
        else:
            phase, drops = "fidelity-improving", True
            if cur % c.fi_interval == 0:
                label, rewrites = "fi_record", _rewrites(reuse=gated, record=[SELF])
            else:
                label, rewrites = "fi_reuse", _rewrites(reuse=[*gated, SELF])
        conditioning = (("text stream", _action(rewrites, JOINT_TEXT)) if self.joint
                        else ("cross-attn", _action(rewrites, CROSS)))
        columns = (conditioning, ("self-attn", _action(rewrites, SELF)))
        return MethodStep(label, rewrites, drops, phase, columns)

    def compose(self, others: list[Method]) -> None:
        # ToCa caches the same joint attention per token (its cores, scores and outputs): the two rules rewrite
        # the same nodes, with no published semantics for both at once.
        if self.joint and any(o.name == "toca" for o in others):
            raise ValueError("T-GATE's joint-attention rule and ToCa rewrite the same joint attention of this "
                             "MMDiT; use one of them (each composes with the block cache)")

    def transform_pass(self, nodes: list, option, caches):
        return joint_pass(nodes, tag_key(NAME))

    def describe(self) -> str:
        c = self.config
        return f"gate_step={c.gate_step}, sp_interval={c.sp_interval}, fi_interval={c.fi_interval}, warm_up={c.warm_up}"
