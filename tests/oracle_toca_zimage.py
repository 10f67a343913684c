"""An eager oracle of ToCa on Z-Image's blocks under the FLUX rules, as tgate_fx chose them (no official
counterpart: see ``tgate_fx/methods/toca/single_sequence.py``). It shares no code with tgate_fx.

:class:`~oracle_toca_flux.FluxToCaOracle`'s transcription of the official FLUX code (``cal_type``,
``fresh_ratio_scheduler``, ``score_evaluate``, ``cache_cutfresh``, ``update_cache``, ``force_init``, the map of
``dot_product_attention``), on diffusers' ``ZImageTransformerBlock`` in ``layers``: a single-stream block of the
one sequence whose self-attention and MLP run one after the other. A full step caches the attention output
(before ``attention_norm2`` and the gate) and the MLP output (after ``ffn_norm2``, before the gate) and keeps the
single-stream map ("total"); a partial step adds the cached attention, and refreshes the MLP on the tokens
``cache_cutfresh`` picks from the residual stream. The refiner blocks run as diffusers has them. With CFG (one
batch of 2) each sample selects its own tokens, as ``cache_cutfresh`` does.
"""

from __future__ import annotations

import types

import diffusers.models.transformers.transformer_z_image as zimage_module

from oracle_toca_flux import FluxToCaOracle, cache_cutfresh, force_init, new_cache_dic, update_cache


class ZImageToCaOracle(FluxToCaOracle):
    """ToCa on an eager Z-Image transformer for ONE generation; :meth:`close` restores it."""

    def __init__(self, transformer, *, num_steps, fresh_threshold=4, fresh_ratio=0.1, soft_fresh_weight=0.25,
                 ratio_scheduler="ToCa"):
        self.transformer = transformer
        self.num_steps, self.calls_per_step = num_steps, 1
        self.dics = [new_cache_dic(fresh_ratio, fresh_threshold, soft_fresh_weight, ratio_scheduler)]
        self.fresh_ratio, self.fresh_threshold = fresh_ratio, fresh_threshold
        self.cache_counter, self.cal_threshold, self.calls = 0, None, 0
        self.current = {"num_steps": num_steps}
        self.dic = None
        self.pending_map = None
        self.steps = []
        self.hook = transformer.register_forward_pre_hook(self._pre_hook)
        self._dispatch = zimage_module.dispatch_attention_fn
        zimage_module.dispatch_attention_fn = self._attention
        for layer, block in enumerate(transformer.layers):
            block.forward = types.MethodType(self._zimage(layer), block)

    def close(self):
        self.hook.remove()
        zimage_module.dispatch_attention_fn = self._dispatch
        for block in self.transformer.layers:
            del block.forward

    def _zimage(self, layer):
        oracle = self

        def forward(self, x, attn_mask, freqs_cis, adaln_input=None, noise_mask=None, adaln_noisy=None,
                    adaln_clean=None):
            assert noise_mask is None, "the oracle follows the text-to-image call (no omni noise mask)"
            dic, current = oracle.dic, oracle.current
            current["stream"], current["layer"] = "single_stream", layer
            cache = dic["cache"]["single_stream"].setdefault(layer, {})
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).unsqueeze(1).chunk(4, dim=2)
            gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
            scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
            if current["type"] == "full":
                oracle.pending_map = dic["attn_map"]["single_stream"].setdefault(layer, {})
                cache["attn"] = self.attention(self.attention_norm1(x) * scale_msa, attention_mask=attn_mask,
                                               freqs_cis=freqs_cis)
            x = x + gate_msa * self.attention_norm2(cache["attn"])
            current["module"] = "mlp"
            if current["type"] == "full":
                force_init(dic, current, x)
                cache["mlp"] = self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))
            else:
                idx, fresh = cache_cutfresh(dic, x, current)
                update_cache(idx, self.ffn_norm2(self.feed_forward(self.ffn_norm1(fresh) * scale_mlp)), dic, current)
            return x + gate_mlp * cache["mlp"]

        return forward
