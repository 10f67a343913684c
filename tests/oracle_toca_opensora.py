"""An eager oracle of ToCa's official Open-Sora rules (``Shenyi-Z/ToCa``, ``Open-Sora/opensora/models/``), on the
blocks of diffusers' LTX-Video transformer. It shares no code with tgate_fx.

Transcribed from ``cache_functions/`` (``global_force_fresh``, ``force_scheduler``, ``fresh_ratio_scheduler``,
``score_evaluate`` + ``scores``, ``cache_cutfresh``, ``update_cache``, ``force_init``) and ``stdit/stdit3.py``'s
``STDiT3Block.forward``, mapped onto ``LTXVideoTransformerBlock`` (self-attention ``attn1`` after ``norm1`` and
the modulation, cross-attention ``attn2`` on the raw hidden states, MLP ``ff`` after ``norm2`` and the
modulation; one token sequence of frames x height x width, as STDiT3's ``B, (T S), C``):

* each module on its own cycle (``force_scheduler``'s ``cal_threshold``): every module is full at steps 0, 1, 2;
  then self-attention and the MLP every ``cycle`` (3) steps, cross-attention every ``cross_cycle`` (6) steps;
  steps count up from 0;
* a full module caches its output before the gate (cross-attention also its head-mean map, softmax of
  ``(q * scale) k^T + mask`` on the normed queries and keys) and zeroes its counters;
* a partial step reuses self-attention (the current gate applied) and cross-attention (its fresh ratio
  ``R * (1 - 0.67 * 1.5)`` is negative: ``k = 0``, the map is not refreshed); the MLP recomputes the top-k
  rows of its (modulated) input, ``k = int(float32(R * 1.495) * N)``, by the score
  ``normalize(1 + H) + 0.25 * counter / fresh_threshold`` with ``H`` the entropy of the CFG halves' maps side by
  side (``0.5 * first half``, ``0.5 * second half``, as the official block-diagonal attention has them), both
  halves sharing one selection; counters are read, then incremented, the fresh ones zeroed.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class OpenSoraToCaOracle:
    """ToCa's Open-Sora rules on an eager LTX-Video transformer for ONE generation (one call a step, a CFG batch
    ``[uncond, cond]`` when ``cfg``); :meth:`close` restores the blocks."""

    def __init__(self, denoiser, *, cfg: bool, fresh_ratio=0.1, fresh_threshold=3, cycle=3, cross_cycle=6,
                 soft_fresh_weight=0.25):
        self.cfg = cfg
        self.fresh_ratio, self.fresh_threshold = fresh_ratio, fresh_threshold
        self.cycle, self.cross_cycle = cycle, cross_cycle
        self.soft_fresh_weight = soft_fresh_weight
        self.step = -1
        self.cache, self.cmap, self.counter = {}, {}, {}
        self.log = []  # (step, layer, {"attn": full?, "cross": full?, "mlp": k or "full"})
        self.originals = []
        for layer, block in enumerate(getattr(denoiser, self.blocks)):
            self.originals.append((block, block.forward))
            block.forward = types.MethodType(self._forward(layer), block)
        self.hook = denoiser.register_forward_pre_hook(lambda module, args: self._count())

    blocks = "transformer_blocks"  # the denoiser's block list

    def _count(self):
        self.step += 1

    def close(self):
        self.hook.remove()
        for block, forward in self.originals:
            block.forward = forward

    def _full(self, module: str) -> bool:
        cycle = self.cross_cycle if module == "cross" else self.cycle
        return self.step <= 2 or self.step % cycle == 0

    def _ratio(self, module: str) -> torch.Tensor:  # fresh_ratio_scheduler "ToCa": R * lf * sf * mf * tf, mf != 1
        mf = 1 - (1 - 0.33) * 1.5 if module == "cross" else 1 + 0.33 * 1.5
        return torch.clamp(torch.tensor(self.fresh_ratio * 1.0 * 1.0 * mf * 1.0), min=0, max=1)  # float32

    @staticmethod
    def _map(attn, x, context, mask):
        batch = x.shape[0]
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        logits = (q * (1.0 / q.shape[-1] ** 0.5)) @ k.transpose(-2, -1)
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, context.shape[1], batch)
            logits = logits + mask.view(batch, attn.heads, -1, mask.shape[-1])
        return logits.softmax(-1).mean(dim=1)

    def _cmap(self, amap):
        if not self.cfg:
            return amap
        first, second = torch.split(amap, amap.shape[0] // 2, dim=0)  # side by side, as the block-diagonal map
        return torch.cat([0.5 * first, 0.5 * second], dim=-1)

    def _score(self, layer):
        cmap = self.cmap[layer]
        entropy = -torch.sum(cmap * torch.log(cmap + 1e-7), dim=-1)
        score = F.normalize(1 + entropy, dim=1, p=2)
        if self.cfg:
            score = score.repeat(2, 1)
        return score + self.soft_fresh_weight * (self.counter[layer].float() / self.fresh_threshold)

    def _forward(self, layer):
        oracle = self

        def forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                    encoder_attention_mask=None):
            x = hidden_states
            batch = x.size(0)
            ada = block.scale_shift_table[None, None].to(temb.device) + temb.reshape(batch, temb.size(1), 6, -1)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada.unbind(dim=2)
            cache = oracle.cache.setdefault(layer, {})
            entry = {}
            if oracle._full("attn"):
                cache["attn"] = block.attn1(hidden_states=block.norm1(x) * (1 + scale_msa) + shift_msa,
                                            encoder_hidden_states=None, image_rotary_emb=image_rotary_emb)
            entry["attn"] = oracle._full("attn")
            x = x + cache["attn"] * gate_msa
            if oracle._full("cross"):
                cache["cross"] = block.attn2(x, encoder_hidden_states=encoder_hidden_states, image_rotary_emb=None,
                                             attention_mask=encoder_attention_mask)
                oracle.cmap[layer] = oracle._cmap(oracle._map(block.attn2, x, encoder_hidden_states,
                                                              encoder_attention_mask))
            entry["cross"] = oracle._full("cross")
            x = x + cache["cross"]
            x_m = block.norm2(x) * (1 + scale_mlp) + shift_mlp
            if oracle._full("mlp"):
                cache["mlp"] = block.ff(x_m)
                oracle.counter[layer] = torch.zeros(x.shape[0], x.shape[1], dtype=torch.int)
                entry["mlp"] = "full"
            else:
                k = int(oracle._ratio("mlp") * x.shape[1])
                score = oracle._score(layer)
                fresh = score.argsort(dim=-1, descending=True)[:, :k]
                oracle.counter[layer] += 1
                oracle.counter[layer].scatter_(1, fresh, torch.zeros_like(fresh, dtype=torch.int))
                rows = fresh.unsqueeze(-1).expand(-1, -1, x_m.shape[-1])
                if k:
                    out = block.ff(torch.gather(x_m, 1, rows))
                    cache["mlp"].scatter_(1, fresh.unsqueeze(-1).expand(-1, -1, out.shape[-1]), out)
                entry["mlp"] = k
            oracle.log.append((oracle.step, layer, entry))
            return x + cache["mlp"] * gate_mlp

        return forward
