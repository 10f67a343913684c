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

import contextlib
import types

import diffusers.models.transformers.transformer_z_image as zimage_module

from oracle_toca_flux import FluxToCaOracle, stream_mlp


@contextlib.contextmanager
def _no_flux_blocks(transformer):
    """``transformer`` seen with no FLUX block lists (the FLUX oracle's set-up and close walk them)."""
    transformer.__dict__["transformer_blocks"] = ()
    try:
        yield
    finally:
        del transformer.__dict__["transformer_blocks"]


class ZImageToCaOracle(FluxToCaOracle):
    """ToCa on an eager Z-Image transformer for ONE generation (one call a step); :meth:`close` restores it."""

    def __init__(self, transformer, **rules):
        with _no_flux_blocks(transformer):
            super().__init__(transformer, calls_per_step=1, **rules)
        self._zimage_dispatch = zimage_module.dispatch_attention_fn
        zimage_module.dispatch_attention_fn = self._attention
        for layer, block in enumerate(transformer.layers):
            block.forward = types.MethodType(self._zimage(layer), block)

    def close(self):
        with _no_flux_blocks(self.transformer):
            super().close()
        zimage_module.dispatch_attention_fn = self._zimage_dispatch
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
            return x + gate_mlp * stream_mlp(dic, current, cache, "mlp", x,
                                             lambda t: self.ffn_norm2(self.feed_forward(self.ffn_norm1(t) * scale_mlp)))

        return forward
