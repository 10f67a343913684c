"""DeepCache as a method: one tag at the entry of a UNet's up path, and a full/partial schedule.

Annotation: for branch ``b`` (down block ``b // 3``, layer ``b % 3``,
mirrored on the up path as ``DeepCacheSDHelper`` mirrors it), the first up
layer that still runs on a partial step is resnet ``L - 1 - b % 3`` of up
block ``n - 1 - b // 3``. The value entering it, the output of the module
just before it (an up-block attention or resnet, the previous up block, or
the mid block), is tagged ``"entry"``. That is exactly the tensor the
published helper serves from its cache there.

Schedule: a step is *full* (records the entry) when ``(step - anchor) %
cache_interval == 0``, the anchor being the last barrier at or before the
step (step 0, and steps other methods name, e.g. T-GATE's gate); the other
steps are *partial*: the entry is a cache read, and dead-code elimination
removes every down/mid/up module deeper than the branch (their outputs feed
nothing else). The step index is the runtime's own count.
"""

from __future__ import annotations

import torch.fx as fx

from ...core.analysis import Regions
from ...core.method import RECORD, REUSE, Method, MethodStep, Rewrite, ScheduleContext
from ...core.meta import tag_key
from .config import DeepCacheConfig

__all__ = ["DeepCache", "entry_site"]

NAME = "deepcache"
ENTRY = "entry"
_FULL = MethodStep("dc_full", frozenset([Rewrite(NAME, ENTRY, RECORD)]), columns=(("deepcache", "full"),))
_PARTIAL = MethodStep("dc_partial", frozenset([Rewrite(NAME, ENTRY, REUSE)]), columns=(("deepcache", "partial"),))


def entry_site(regions: Regions, branch: int) -> tuple[str, str]:
    """``(first running up layer, module whose output enters it)`` for ``branch``.

    Raises:
        ValueError: if the graph has no UNet down/mid/up path, or ``branch`` is beyond it.
    """
    ups = regions.children("", "up_blocks")
    if not ups or not regions.children("", "down_blocks") or "mid_block" not in regions.modules:
        raise ValueError("DeepCache needs a UNet with down_blocks, mid_block and up_blocks (e.g. "
                         "UNet2DConditionModel); this denoiser's graph has none")
    block, layer = divmod(branch, 3)
    if block >= len(ups):
        raise ValueError(f"cache_branch_id={branch} points at down block {block}, but this UNet has "
                         f"{len(ups)} levels; use 0 <= cache_branch_id < {3 * len(ups)}")
    u = len(ups) - 1 - block
    resnets = regions.children(ups[u], "resnets")
    attentions = regions.children(ups[u], "attentions")
    first = max(0, len(resnets) - 1 - layer)
    if first > 0:
        before = attentions[first - 1] if len(attentions) >= first else resnets[first - 1]
    else:
        before = ups[u - 1] if u > 0 else "mid_block"
    return resnets[first], before


class DeepCache(Method):
    """DeepCache (uniform mode); settings in :class:`DeepCacheConfig`."""

    name = NAME
    config_class = DeepCacheConfig
    title = "DeepCache"

    def bind(self, denoiser) -> "DeepCache":
        if not all(hasattr(denoiser, a) for a in ("down_blocks", "mid_block", "up_blocks")) or \
                getattr(denoiser, "mid_block", None) is None:
            raise TypeError(f"DeepCache needs a UNet with down_blocks, mid_block and up_blocks (e.g. "
                            f"UNet2DConditionModel); {type(denoiser).__name__} has none. For transformers "
                            "(PixArt, DiT), use T-GATE")
        block, levels = self.config.cache_branch_id // 3, len(denoiser.up_blocks)
        if block >= levels:
            raise ValueError(f"cache_branch_id={self.config.cache_branch_id} points at down block {block}, but "
                             f"this UNet has {levels} levels; use 0 <= cache_branch_id < {3 * levels}")
        return self

    def annotate(self, graph_module: fx.GraphModule, regions: Regions) -> None:
        site, before = entry_site(regions, self.config.cache_branch_id)
        regions.output_of(before).meta[tag_key(NAME)] = {"group": ENTRY, "site": site, "slot": "input"}

    def schedule(self, ctx: ScheduleContext) -> list[MethodStep]:
        out, anchor = [], 0
        for step in range(ctx.num_steps):
            if step in ctx.barriers:
                anchor = step
            out.append(_FULL if (step - anchor) % self.config.cache_interval == 0 else _PARTIAL)
        return out

    def describe(self) -> str:
        c = self.config
        return f"cache_interval={c.cache_interval}, cache_branch_id={c.cache_branch_id}"
