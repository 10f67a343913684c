"""An eager oracle of ToCa, as the official code behaves: block forwards replaced on diffusers' transformer blocks.

It shares no code with tgate_fx. Transcribed from ``Shenyi-Z/ToCa``
(``PixArt-alpha-ToCa/diffusion/model/nets/PixArt.py``, ``DiT-ToCa/models.py``
and both ``cache_functions/``): ``cache_init``, ``force_scheduler``,
``global_force_fresh`` / ``cal_type``, ``fresh_ratio_scheduler``,
``score_evaluate`` + ``scores``, ``cache_cutfresh`` with
``local_selection_with_bonus``, ``update_cache``, and the full / partial
branches of ``PixArtBlock.forward`` and ``DiTBlock.forward``, on diffusers'
``BasicTransformerBlock`` (PixArt: ``ada_norm_single``; DiT: ``ada_norm_zero``).

Differences from the official code, where it cannot run as is:

* PixArt's cross-attention map: the official attention flattens the batch
  with a block-diagonal mask, so sample b's probabilities sit in its own
  columns; here the per-sample maps are placed block-diagonally to the same
  effect, then ``cmap = 0.5 * first half + 0.5 * second half`` as the official
  ``attn_score``. The combined ``cmap`` rows are stored (not the raw map), so a
  batch that stops being a CFG pair (T-GATE's drop) keeps the pairing its rows
  were computed with.
* Without CFG (the official PixArt code always runs it) each sample scores on
  its own map.
* Composition with T-GATE: ``tgate_gate``: the steps ``gate - 1`` and ``gate``
  are full, and from the gate on cross-attention is what the (T-GATE) processor
  returns, with no ToCa refresh and no map update; the batch is then no CFG pair.
* ``cache_type="random"``: the scores are ``torch.rand`` draws from torch's
  global generator, as the official code makes them, but only where tokens are
  selected (k > 0); the official code draws for k = 0 too. The graphs draw
  where they select (a draw nothing reads is dead code), so seeding the global
  generator before a generation makes both draw the same numbers in the same
  order (block by block, cross-attention before MLP).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

WEIGHTS = {  # fresh_ratio_scheduler: (step_weight, layer_weight, module_weight, module_time_weight, reduced module)
    "ToCa": (-0.9, 0.6, 1.0, 0.6, "cross-attn"),
    "ToCa-ddim50": (2.0, -0.2, 2.5, 0.6, "attn"),
    "ToCa-ddpm250": (0.4, 0.8, 2.5, 0.6, "attn"),
}


class OfficialScheduler:
    """``cache_dic`` / ``current`` and the official scheduling functions, for one generation."""

    def __init__(self, family, num_steps, *, fresh_threshold, fresh_ratio, ratio_scheduler, compat="official",
                 depth=28, barriers=()):
        self.family = family
        self.num_steps = num_steps
        self.fresh_threshold = fresh_threshold
        self.fresh_ratio = fresh_ratio
        self.ratio_scheduler = ratio_scheduler
        self.compat = compat
        self.depth = depth
        self.barriers = set(barriers)
        self.cal_threshold = None
        self.current = {"num_steps": num_steps}

    def set_call(self, i):
        self.current["call"] = i
        self.current["step"] = i if self.family == "pixart" else self.num_steps - 1 - i
        self.step_full = None

    def force_scheduler(self):
        if self.family == "pixart":
            w = 0.0 if self.fresh_ratio == 0 else 0.2
            step_factor = torch.tensor(1 - w + 2 * w * self.current["step"] / self.current["num_steps"])
            threshold = torch.round(self.fresh_threshold / step_factor)
        else:
            w = 0.0 if self.fresh_ratio == 0 else 0.4
            step_factor = torch.tensor(1 + w - 2 * w * self.current["step"] / self.current["num_steps"])
            threshold = torch.round(self.fresh_threshold / step_factor)
            if (self.current["step"] in range(int(self.current["num_steps"] * 0.2),
                                              int(self.current["num_steps"] * 0.4))) and self.fresh_ratio != 0:
                threshold = 2
        self.cal_threshold = threshold

    def is_full(self, layer):
        """global_force_fresh (PixArt) / cal_type (DiT), then the force_init updates of a full block."""
        step = self.current["step"]
        if self.current["call"] in self.barriers:
            full = True
        elif self.compat == "clean" and self.step_full is not None:
            full = self.step_full
        else:
            first = step == (0 if self.family == "pixart" else self.num_steps - 1)
            threshold = self.fresh_threshold if first else self.cal_threshold
            full = bool(first or (step % threshold == 0))
        if self.compat == "clean" and layer == 0:
            self.step_full = full
        if full and (self.family == "pixart" or layer == 0):
            self.force_scheduler()
        return full

    def ratio(self, layer, module):
        step, num_steps = self.current["step"], self.current["num_steps"]
        if self.ratio_scheduler == "constant":
            r = self.fresh_ratio
        else:
            sw, lw, mw, mtw, reduced = WEIGHTS[self.ratio_scheduler]
            step_factor = (1 - sw + 2 * sw * step / num_steps if self.ratio_scheduler == "ToCa"
                           else 1 + sw - 2 * sw * step / num_steps)
            last = 27 if self.compat == "official" else max(self.depth - 1, 1)
            layer_factor = 1 + lw - 2 * lw * layer / last
            module_factor = (1 - (1 - mtw) * mw) if module == reduced else (1 + mtw * mw)
            r = self.fresh_ratio * layer_factor * step_factor * module_factor
        if self.compat == "official":
            return torch.clamp(torch.tensor(r), min=0, max=1)
        return min(max(r, 0.0), 1.0)


def local_selection_with_bonus(score, bonus_ratio, grid_size=2):
    batch_size, num_tokens = score.shape
    image_size = int(num_tokens ** 0.5)
    block_size = grid_size * grid_size
    assert num_tokens % block_size == 0
    score_reshaped = score.view(batch_size, image_size // grid_size, grid_size, image_size // grid_size, grid_size)
    score_reshaped = score_reshaped.permute(0, 1, 3, 2, 4).contiguous()
    score_reshaped = score_reshaped.view(batch_size, -1, block_size)
    max_scores, max_indices = score_reshaped.max(dim=-1, keepdim=True)
    mask = torch.zeros_like(score_reshaped)
    mask.scatter_(-1, max_indices, 1)
    score_reshaped = score_reshaped + (mask * max_scores * bonus_ratio)
    score_modified = score_reshaped.view(batch_size, image_size // grid_size, image_size // grid_size, grid_size,
                                         grid_size)
    score_modified = score_modified.permute(0, 1, 3, 2, 4).contiguous()
    return score_modified.view(batch_size, num_tokens)


def attention_map(attn, x, context=None, mask=None):
    """``cached_attention_forward``'s head-mean map for a diffusers ``Attention``: softmax((q * scale) k^T + mask)."""
    batch = x.shape[0]
    context = x if context is None else context
    head_dim = attn.to_q.out_features // attn.heads
    query = attn.to_q(x).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = attn.to_k(context).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    scale = 1.0 / query.shape[-1] ** 0.5
    logits = (query * scale) @ key.transpose(-2, -1)
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, context.shape[1], batch)
        logits = logits + mask.view(batch, attn.heads, -1, mask.shape[-1])
    return logits.softmax(-1).mean(dim=1)


def combined_cross_map(amap, pairs):
    """The official ``cmap``: per-sample maps block-diagonal (as the flattened batch has them), halves averaged."""
    if not pairs:
        return amap
    batch, n, length = amap.shape
    flat = amap.new_zeros(batch, n, batch * length)
    for b in range(batch):
        flat[b, :, b * length:(b + 1) * length] = amap[b]
    cond_cmap, uncond_cmap = torch.split(flat, batch // 2, dim=0)
    cmap = 0.5 * cond_cmap + (1 - 0.5) * uncond_cmap
    if batch == 2:  # the columns of other pairs hold zeros: drop them as the block-diagonal map has none
        return cmap
    keep = torch.cat([torch.arange(b * length, (b + 1) * length) for b in range(batch)])
    return cmap[:, :, keep]


class ToCaOracle:
    """ToCa on an eager PixArt / DiT transformer for ONE generation; :meth:`close` restores the blocks."""

    def __init__(self, denoiser, *, family, num_steps, cfg, fresh_threshold, fresh_ratio, ratio_scheduler,
                 cache_type="attention", soft_fresh_weight=0.25, bonus=(0.4, 4), compat="official", tgate_gate=None):
        self.denoiser = denoiser
        self.family = family
        self.cfg = cfg
        self.cache_type = cache_type
        self.soft_fresh_weight = soft_fresh_weight
        self.bonus = bonus
        self.tgate_gate = tgate_gate
        blocks = list(denoiser.transformer_blocks)
        barriers = () if tgate_gate is None else (tgate_gate - 1, tgate_gate)
        self.sched = OfficialScheduler(family, num_steps, fresh_threshold=fresh_threshold, fresh_ratio=fresh_ratio,
                                       ratio_scheduler=ratio_scheduler, compat=compat, depth=len(blocks),
                                       barriers=barriers)
        self.cache = {j: {} for j in range(len(blocks))}
        self.cache_index = {j: {} for j in range(len(blocks))}
        self.cmap = {}
        self.attn_map = {}
        self.calls = 0
        self.log = []  # (call, layer, "full" | ("partial", {module: k}))
        self.originals = []
        for layer, block in enumerate(blocks):
            self.originals.append((block, block.forward))
            block.forward = types.MethodType(self._block_forward(layer), block)
        self.hook = denoiser.register_forward_pre_hook(self._pre_hook)

    def close(self):
        self.hook.remove()
        for block, forward in self.originals:
            block.forward = forward

    def _pre_hook(self, module, args):
        self.sched.set_call(self.calls)
        self.calls += 1

    def _pairs(self):
        after_gate = self.tgate_gate is not None and self.sched.current["call"] >= self.tgate_gate
        return self.cfg and not after_gate

    def _tgate_owns_cross(self):
        return self.tgate_gate is not None and self.sched.current["call"] >= self.tgate_gate

    # --- cache_functions --------------------------------------------------------
    def force_init(self, layer, module, tokens):
        self.cache_index[layer][module] = torch.zeros(tokens.shape[0], tokens.shape[1], dtype=torch.int,
                                                      device=tokens.device)

    def score_evaluate(self, tokens, layer, module):
        pairs = self._pairs()
        if self.cache_type == "random":
            if pairs:
                score = torch.rand(int(tokens.shape[0] * 0.5), tokens.shape[1], device=tokens.device)
                score = torch.cat([score, score], dim=0)
            else:
                score = torch.rand(tokens.shape[0], tokens.shape[1], device=tokens.device)
        elif self.family == "pixart":
            cmap = self.cmap[layer]
            cross_attention_entropy = -torch.sum(cmap * torch.log(cmap + 1e-7), dim=-1)
            score = F.normalize(1 + cross_attention_entropy, dim=1, p=2)
            if pairs:
                score = score.repeat(2, 1)
        else:
            score = F.normalize(self.attn_map[layer].sum(dim=1), dim=1, p=2)
        soft_step_score = self.cache_index[layer][module].float() / self.sched.fresh_threshold
        return score + self.soft_fresh_weight * soft_step_score

    def cache_cutfresh(self, tokens, layer, module):
        fresh_ratio = self.sched.ratio(layer, "cross-attn" if module == "cross" else module)
        topk = int(fresh_ratio * tokens.shape[1])
        if self.cache_type == "random" and topk == 0:  # no draw where nothing is selected (see the module doc)
            score = torch.zeros(tokens.shape[:2], device=tokens.device)
        else:
            score = self.score_evaluate(tokens, layer, module)
        score = local_selection_with_bonus(score, *self.bonus)
        indices = score.argsort(dim=-1, descending=True)
        fresh_indices = indices[:, :topk]
        self.cache_index[layer][module] += 1
        self.cache_index[layer][module].scatter_(dim=1, index=fresh_indices,
                                                 src=torch.zeros_like(fresh_indices, dtype=torch.int))
        self.k[module] = topk
        expand = fresh_indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return fresh_indices, torch.gather(input=tokens, dim=1, index=expand)

    def update_cache(self, fresh_indices, fresh_tokens, layer, module, fresh_cmap=None):
        if fresh_cmap is not None:
            rows = fresh_indices[: fresh_cmap.shape[0]]
            self.cmap[layer].scatter_(dim=1, index=rows.unsqueeze(-1).expand(-1, -1, fresh_cmap.shape[-1]),
                                      src=fresh_cmap)
        self.cache[layer][module].scatter_(
            dim=1, index=fresh_indices.unsqueeze(-1).expand(-1, -1, fresh_tokens.shape[-1]), src=fresh_tokens)

    # --- blocks -----------------------------------------------------------------
    def _block_forward(self, layer):
        oracle = self

        def forward(block, hidden_states, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                    added_cond_kwargs=None):
            if oracle.family == "pixart":
                return oracle._pixart(block, layer, hidden_states, encoder_hidden_states, encoder_attention_mask,
                                      timestep)
            return oracle._dit(block, layer, hidden_states, timestep, class_labels)

        return forward

    def _cross(self, block, x, context, mask):
        out = block.attn2(x, encoder_hidden_states=context, attention_mask=mask)
        cmap = combined_cross_map(attention_map(block.attn2, x, context, mask), self._pairs())
        return out, cmap

    def _pixart(self, block, layer, x, context, mask, timestep):
        batch = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            block.scale_shift_table[None] + timestep.reshape(batch, 6, -1)).chunk(6, dim=1)
        cache = self.cache[layer]
        self.k = {}
        if self.sched.is_full(layer):
            self.log.append((self.sched.current["call"], layer, "full"))
            cache["attn"] = block.attn1(block.norm1(x) * (1 + scale_msa) + shift_msa)
            self.force_init(layer, "attn", x)
            x = gate_msa * cache["attn"] + x
            if self._tgate_owns_cross():
                cache["cross"] = block.attn2(x, encoder_hidden_states=context, attention_mask=mask)
            else:
                cache["cross"], self.cmap[layer] = self._cross(block, x, context, mask)
            self.force_init(layer, "cross", x)
            x = cache["cross"] + x
            cache["mlp"] = block.ff(block.norm2(x) * (1 + scale_mlp) + shift_mlp)
            self.force_init(layer, "mlp", x)
            return gate_mlp * cache["mlp"] + x
        x = gate_msa * cache["attn"] + x
        if self._tgate_owns_cross():
            x = block.attn2(x, encoder_hidden_states=context, attention_mask=mask) + x
        else:
            fresh_indices, fresh_tokens = self.cache_cutfresh(x, layer, "cross")
            if fresh_tokens.shape[1]:
                fresh_tokens, fresh_cmap = self._cross(block, fresh_tokens, context, mask)
                self.update_cache(fresh_indices, fresh_tokens, layer, "cross", fresh_cmap)
            x = cache["cross"] + x
        fresh_indices, fresh_tokens = self.cache_cutfresh(x, layer, "mlp")
        if fresh_tokens.shape[1]:
            fresh_tokens = block.ff(block.norm2(fresh_tokens) * (1 + scale_mlp) + shift_mlp)
            self.update_cache(fresh_indices, fresh_tokens, layer, "mlp")
        self.log.append((self.sched.current["call"], layer, ("partial", dict(self.k))))
        return gate_mlp * cache["mlp"] + x

    def _dit(self, block, layer, x, timestep, class_labels):
        norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, timestep, class_labels,
                                                                       hidden_dtype=x.dtype)
        cache = self.cache[layer]
        self.k = {}
        if self.sched.is_full(layer):
            self.log.append((self.sched.current["call"], layer, "full"))
            cache["attn"] = block.attn1(norm_x)
            self.attn_map[layer] = attention_map(block.attn1, norm_x)
            self.force_init(layer, "attn", x)
            x = gate_msa.unsqueeze(1) * cache["attn"] + x
            cache["mlp"] = block.ff(block.norm3(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
            self.force_init(layer, "mlp", x)
            return gate_mlp.unsqueeze(1) * cache["mlp"] + x
        x = gate_msa.unsqueeze(1) * cache["attn"] + x
        fresh_indices, fresh_tokens = self.cache_cutfresh(x, layer, "mlp")
        if fresh_tokens.shape[1]:
            fresh_tokens = block.ff(block.norm3(fresh_tokens) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
            self.update_cache(fresh_indices, fresh_tokens, layer, "mlp")
        self.log.append((self.sched.current["call"], layer, ("partial", dict(self.k))))
        return gate_mlp.unsqueeze(1) * cache["mlp"] + x
