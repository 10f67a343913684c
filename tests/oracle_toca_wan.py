"""An eager oracle of ToCa's Open-Sora rules on diffusers' Wan 2.1 transformer, CFG as Wan's pipelines run it: two
denoiser calls a step, conditional then unconditional. It shares no code with tgate_fx.

The rules are :mod:`oracle_toca_opensora`'s (per-module cycles, cross-attention reused, the MLP refreshed on the
top-k tokens by the cross-attention map's entropy), mapped onto ``WanTransformerBlock`` (self-attention ``attn1``
after ``norm1`` and the modulation, cross-attention ``attn2`` after ``norm2``, MLP ``ffn`` after ``norm3`` and the
modulation, with Wan's float casts). Official Open-Sora runs the CFG pair as one batch and scores it with the
halves' maps side by side (each halved), one selection for both halves. With the halves in two calls, the rule
chosen here is that score with each half's entropy summed in its own call: ``H = h_uncond + h_cond``,
``h = -sum(0.5 a log(0.5 a + 1e-7))`` over the keys of a call's head-mean map ``a``, available once both calls of
the full step ran, and shared by both calls of later steps. Every other cache (module outputs, counters) is each
call's own. Without guidance (one call a step) the score is the entropy of the map itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oracle_toca_opensora import OpenSoraToCaOracle


class WanToCaOracle(OpenSoraToCaOracle):
    """The rules on an eager Wan transformer for ONE generation; ``split``: CFG as two calls a step (cond first)."""

    blocks = "blocks"

    def __init__(self, denoiser, *, split: bool, **rules):
        self.split, self.calls, self.role = split, -1, None
        self.entropy = {}  # (role, layer) -> h of the call's map (halved where split)
        super().__init__(denoiser, cfg=False, **rules)

    def _count(self):
        self.calls += 1
        self.step = self.calls // 2 if self.split else self.calls
        self.role = ("cond", "uncond")[self.calls % 2] if self.split else "cond"

    def _wan_score(self, layer):
        if self.split:
            entropy = self.entropy["uncond", layer] + self.entropy["cond", layer]
        else:
            entropy = self.entropy["cond", layer]
        score = F.normalize(1 + entropy, dim=1, p=2)
        return score + self.soft_fresh_weight * (self.counter[self.role, layer].float() / self.fresh_threshold)

    def _forward(self, layer):
        oracle = self

        def forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb):
            x = hidden_states
            shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
                block.scale_shift_table + temb.float()).chunk(6, dim=1)
            role = oracle.role
            cache = oracle.cache.setdefault((role, layer), {})
            entry = {"role": role}
            if oracle._full("attn"):
                norm = (block.norm1(x.float()) * (1 + scale_msa) + shift_msa).type_as(x)
                cache["attn"] = block.attn1(norm, None, None, rotary_emb)
            entry["attn"] = oracle._full("attn")
            x = (x.float() + cache["attn"] * gate_msa).type_as(x)
            norm = block.norm2(x.float()).type_as(x)
            if oracle._full("cross"):
                cache["cross"] = block.attn2(norm, encoder_hidden_states, None, None)
                amap = oracle._map(block.attn2, norm, encoder_hidden_states, None)
                if oracle.split:
                    amap = 0.5 * amap
                    oracle.entropy[role, layer] = -torch.sum(amap * torch.log(amap + 1e-7), dim=-1)
                else:
                    oracle.entropy[role, layer] = -torch.sum(amap * torch.log(amap + 1e-7), dim=-1)
            entry["cross"] = oracle._full("cross")
            x = x + cache["cross"]
            x_m = (block.norm3(x.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(x)
            if oracle._full("mlp"):
                cache["mlp"] = block.ffn(x_m)
                oracle.counter[role, layer] = torch.zeros(x.shape[0], x.shape[1], dtype=torch.int)
                entry["mlp"] = "full"
            else:
                k = int(oracle._ratio("mlp") * x.shape[1])
                fresh = oracle._wan_score(layer).argsort(dim=-1, descending=True)[:, :k]
                oracle.counter[role, layer] += 1
                oracle.counter[role, layer].scatter_(1, fresh, torch.zeros_like(fresh, dtype=torch.int))
                if k:
                    out = block.ffn(torch.gather(x_m, 1, fresh.unsqueeze(-1).expand(-1, -1, x_m.shape[-1])))
                    cache["mlp"].scatter_(1, fresh.unsqueeze(-1).expand(-1, -1, out.shape[-1]), out)
                entry["mlp"] = k
            oracle.log.append((oracle.step, layer, entry))
            return (x.float() + cache["mlp"].float() * c_gate_msa).type_as(x)

        return forward
