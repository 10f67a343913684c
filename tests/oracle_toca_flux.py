"""An eager oracle of ToCa on FLUX, as the official code behaves: block forwards replaced on diffusers' blocks.

It shares no code with tgate_fx. Transcribed from ``Shenyi-Z/ToCa``
(``flux-ToCa/src/flux/``: ``modules/cache_functions/`` ``cache_init`` (mode
"ToCa"), ``cal_type``, ``force_scheduler``, ``fresh_ratio_scheduler``
("ToCa"), ``score_evaluate`` + ``scores.attn_score``, ``cache_cutfresh``,
``update_cache``, ``force_init``; ``math.attention`` /
``dot_product_attention`` for the map; the full / ``ToCa`` branches of
``DoubleStreamBlock.forward`` and ``SingleStreamBlock.forward``), on
diffusers' ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` (and
Chroma's blocks, which differ only in their modulation and mask), and the
same double-stream rules on SD3's ``JointTransformerBlock`` (no official
counterpart: image tokens first, SD3.5's ``attn2`` cached with the joint
attention, no text stream out of the last block) and Qwen-Image's
``QwenImageTransformerBlock``, and FLUX.2's ``Flux2TransformerBlock`` /
``Flux2SingleTransformerBlock`` (no official counterpart; the parallel single
block's partial step runs its fused ``to_qkv_mlp_proj`` for the fresh tokens,
uses the MLP part, and projects it with the cached attention rows).

Where it cannot run as is:

* the attention itself is diffusers' (the official code computes it with its
  own matmul-softmax); the map is computed from the same rotated queries and
  keys as the official ``dot_product_attention`` does (``softmax(q k^T *
  scale + bias)``, heads then queries averaged), recorded on the way through
  ``dispatch_attention_fn``;
* the double-stream block caches the attention after its output projections
  (the official code caches it before and projects again on partial steps:
  the same values);
* true CFG (the official FLUX code has none): the pipeline's two calls of a
  step run the same step kind (``cal_type`` runs once per step), each on its
  own caches, maps and counters.
"""

from __future__ import annotations

import collections
import types

import torch
import torch.nn.functional as F

import diffusers.models.transformers.transformer_flux as flux_module
import diffusers.models.transformers.transformer_flux2 as flux2_module
import diffusers.models.transformers.transformer_hunyuan_video as hunyuan_module
import diffusers.models.transformers.transformer_qwenimage as qwen_module


def fresh_ratio_scheduler(dic, current):
    """``fresh_ratio_scheduler`` ("ToCa" and "constant")."""
    fresh_ratio = dic["fresh_ratio"]
    if dic["fresh_ratio_schedule"] == "constant":
        return fresh_ratio
    step, num_steps = current["step"], current["num_steps"]
    step_weight = 0.0
    step_factor = 1 - step_weight + 2 * step_weight * step / num_steps
    layer_weight = 0.5
    layer_factor = 1 + layer_weight - 2 * layer_weight * current["layer"] / 27
    stream_weight = 0.6
    stream_factor = (1 - stream_weight) if current["stream"] == "double_stream" else (1 + stream_weight)
    return fresh_ratio * layer_factor * step_factor * stream_factor


def score_evaluate(dic, tokens, current):
    if current["stream"] == "double_stream":
        score = F.normalize(dic["attn_map"]["double_stream"][current["layer"]][current["module"]], dim=-1, p=2)
    else:
        score = F.normalize(dic["attn_map"]["single_stream"][current["layer"]]["total"], dim=-1, p=2)
    soft_step_score = dic["cache_index"][current["layer"]][current["module"]].float() / dic["fresh_threshold"]
    return score + dic["soft_fresh_weight"] * soft_step_score


def cache_cutfresh(dic, tokens, current):
    layer, module = current["layer"], current["module"]
    fresh_ratio = torch.clamp(torch.tensor(fresh_ratio_scheduler(dic, current), device=tokens.device), min=0, max=1)
    score = score_evaluate(dic, tokens, current)
    indices = score.argsort(dim=-1, descending=True)
    topk = int(fresh_ratio * score.shape[1])
    fresh_indices = indices[:, :topk]
    dic["cache_index"][layer][module] += 1
    dic["cache_index"][layer][module].scatter_(
        dim=1, index=fresh_indices, src=torch.zeros_like(fresh_indices, dtype=torch.int, device=fresh_indices.device))
    expand = fresh_indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return fresh_indices, torch.gather(input=tokens, dim=1, index=expand)


def update_cache(fresh_indices, fresh_tokens, dic, current):
    dic["cache"][current["stream"]][current["layer"]][current["module"]].scatter_(
        dim=1, index=fresh_indices.unsqueeze(-1).expand(-1, -1, fresh_tokens.shape[-1]), src=fresh_tokens)


def stream_mlp(dic, current, cache, module, tokens, mlp):
    """One MLP refreshed token-wise (``module``: ``"img_mlp"``, ``"txt_mlp"``, or ``"mlp"`` over one sequence), as
    the official ``DoubleStreamBlock.forward`` branches: on a full step ``mlp`` of every token (its counters
    reset), on a ``ToCa`` step ``mlp`` of the top-k tokens scattered into the cache; returns the cached output."""
    current["module"] = module
    if current["type"] == "full":
        force_init(dic, current, tokens)
        cache[module] = mlp(tokens)
    else:
        idx, fresh = cache_cutfresh(dic, tokens, current)
        update_cache(idx, mlp(fresh), dic, current)
    return cache[module]


def force_init(dic, current, tokens):
    dic["cache_index"][current["layer"]][current["module"]] = torch.zeros(
        tokens.shape[0], tokens.shape[1], dtype=torch.int, device=tokens.device)


def attention_map(query, key, attn_mask=None):
    """``dot_product_attention``'s second output, from diffusers' ``(B, L, H, D)`` rotated queries and keys."""
    import math

    q, k = query.transpose(1, 2), key.transpose(1, 2)
    scale_factor = 1 / math.sqrt(q.size(-1))
    attn_bias = torch.zeros(q.size(-2), k.size(-2), dtype=q.dtype, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_bias = attn_bias.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            attn_bias = attn_bias + attn_mask
    attn_weight = torch.matmul(q, k.transpose(-2, -1)) * scale_factor
    attn_weight += attn_bias
    return torch.softmax(attn_weight, dim=-1).mean(dim=1).mean(dim=1)


def attention_map_bhld(query, key):
    """The same map from ``(B, H, L, D)`` queries and keys (what ``F.scaled_dot_product_attention`` takes)."""
    return attention_map(query.transpose(1, 2), key.transpose(1, 2))


def new_cache_dic(fresh_ratio, fresh_threshold, soft_fresh_weight, schedule):
    return {"attn_map": {"double_stream": {}, "single_stream": {}}, "cache": {"double_stream": {}, "single_stream": {}},
            "cache_index": collections.defaultdict(dict), "fresh_ratio": fresh_ratio, "fresh_threshold": fresh_threshold,
            "soft_fresh_weight": soft_fresh_weight, "fresh_ratio_schedule": schedule}


class FluxToCaOracle:
    """ToCa on an eager Flux / Chroma transformer for ONE generation; :meth:`close` restores it.

    ``calls_per_step``: 2 where the pipeline runs true CFG as two calls per step (conditional first).
    """

    def __init__(self, transformer, *, num_steps, calls_per_step=1, fresh_threshold=4, fresh_ratio=0.1,
                 soft_fresh_weight=0.25, ratio_scheduler="ToCa"):
        self.transformer = transformer
        self.num_steps, self.calls_per_step = num_steps, calls_per_step
        self.dics = [new_cache_dic(fresh_ratio, fresh_threshold, soft_fresh_weight, ratio_scheduler)
                     for _ in range(calls_per_step)]
        self.fresh_ratio, self.fresh_threshold = fresh_ratio, fresh_threshold
        self.cache_counter, self.cal_threshold, self.calls = 0, None, 0
        self.current = {"num_steps": num_steps}
        self.dic = None
        self.pending_map = None  # where the next attention's map goes
        self.pending_out = None  # where the next attention's output goes (FLUX.2's parallel block)
        self.steps = []  # the type of each step, for the tests
        self.hook = transformer.register_forward_pre_hook(self._pre_hook)
        self._dispatch = flux_module.dispatch_attention_fn  # the same function in every module below
        for module in (flux_module, flux2_module, qwen_module, hunyuan_module):
            module.dispatch_attention_fn = self._attention
        self._sdpa = F.scaled_dot_product_attention  # SD3's processor calls it directly
        F.scaled_dot_product_attention = self._sdpa_attention
        self.chroma = type(transformer).__name__.startswith("Chroma")
        for layer, block in enumerate(transformer.transformer_blocks):
            kind = {"JointTransformerBlock": self._joint, "QwenImageTransformerBlock": self._qwen,
                    "CogVideoXBlock": self._cogvideox, "HunyuanVideoTransformerBlock": self._hunyuan,
                    "Flux2TransformerBlock": self._flux2}.get(type(block).__name__, self._double)
            block.forward = types.MethodType(kind(layer), block)
        for layer, block in enumerate(getattr(transformer, "single_transformer_blocks", ())):
            single = {"HunyuanVideoSingleTransformerBlock": self._hunyuan_single,
                      "Flux2SingleTransformerBlock": self._flux2_single}.get(type(block).__name__, self._single)
            block.forward = types.MethodType(single(layer), block)

    def close(self):
        self.hook.remove()
        for module in (flux_module, flux2_module, qwen_module, hunyuan_module):
            module.dispatch_attention_fn = self._dispatch
        F.scaled_dot_product_attention = self._sdpa
        for block in [*self.transformer.transformer_blocks, *getattr(self.transformer, "single_transformer_blocks", ())]:
            del block.forward

    def _sdpa_attention(self, query, key, value, *args, **kwargs):
        if self.pending_map is not None:
            self.pending_map["total"] = attention_map_bhld(query, key)
            self.pending_map = None
        return self._sdpa(query, key, value, *args, **kwargs)

    def _pre_hook(self, module, args):
        step, role = divmod(self.calls, self.calls_per_step)
        self.calls += 1
        self.current["step"] = step
        self.dic = self.dics[role]
        if role == 0:
            self._cal_type()
            self.steps.append(self.current["type"])

    def _cal_type(self):
        current = self.current
        first_step = current["step"] == 0 if self.fresh_ratio == 0.0 else current["step"] <= 2
        fresh_interval = self.fresh_threshold if first_step else self.cal_threshold
        if first_step or self.cache_counter == fresh_interval - 1:
            current["type"] = "full"
            self.cache_counter = 0
            step_factor = torch.tensor(1 - 0.0 + 2 * 0.0 * current["step"] / current["num_steps"])
            self.cal_threshold = torch.round(self.fresh_threshold / step_factor)
        else:
            self.cache_counter += 1
            current["type"] = "ToCa"

    def _attention(self, query, key, value, attn_mask=None, *args, **kwargs):
        if self.pending_map is not None:
            self.pending_map["total"] = attention_map(query, key, attn_mask)
            self.pending_map = None
        out = self._dispatch(query, key, value, attn_mask, *args, **kwargs)
        if self.pending_out is not None:
            self.pending_out["attn"] = out.flatten(2, 3)
            self.pending_out = None
        return out

    def _double(self, layer):
        oracle = self

        def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_mask=None,
                    joint_attention_kwargs=None):
            dic, current = oracle.dic, oracle.current
            current["stream"], current["layer"] = "double_stream", layer
            temb_img, temb_txt = (temb[:, :6], temb[:, 6:]) if oracle.chroma else (temb, temb)
            norm_hs, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb_img)
            norm_ehs, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states,
                                                                                          emb=temb_txt)
            cache = dic["cache"]["double_stream"].setdefault(layer, {})
            text = encoder_hidden_states.shape[1]
            if current["type"] == "full":
                maps = dic["attn_map"]["double_stream"].setdefault(layer, {})
                oracle.pending_map = maps
                extra = {}
                if attention_mask is not None:
                    extra["attention_mask"] = attention_mask[:, None, None, :] * attention_mask[:, None, :, None]
                cache["attn"] = self.attn(hidden_states=norm_hs, encoder_hidden_states=norm_ehs,
                                          image_rotary_emb=image_rotary_emb, **extra)
                maps["txt_mlp"], maps["img_mlp"] = maps["total"][:, :text], maps["total"][:, text:]
            attn_output, context_attn_output = cache["attn"]

            hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
            img_mlp = stream_mlp(dic, current, cache, "img_mlp", hidden_states,
                                 lambda x: self.ff(self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]))
            hidden_states = hidden_states + gate_mlp.unsqueeze(1) * img_mlp

            encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
            txt_mlp = stream_mlp(dic, current, cache, "txt_mlp", encoder_hidden_states, lambda x: self.ff_context(
                self.norm2_context(x) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]))
            encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * txt_mlp
            return encoder_hidden_states, hidden_states

        return forward

    def _joint(self, layer):
        """SD3's ``JointTransformerBlock`` under FLUX's double-stream rules: the image tokens come first in its
        joint attention; SD3.5's image-only ``attn2`` is cached with the joint attention; the last block has
        no text stream out (``context_pre_only``)."""
        oracle = self

        def forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs=None):
            dic, current = oracle.dic, oracle.current
            current["stream"], current["layer"] = "double_stream", layer
            if self.use_dual_attention:
                norm_hs, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hs2, gate_msa2 = self.norm1(hidden_states,
                                                                                                   emb=temb)
            else:
                norm_hs, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
            if self.context_pre_only:
                norm_ehs = self.norm1_context(encoder_hidden_states, temb)
            else:
                norm_ehs, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states,
                                                                                              emb=temb)
            cache = dic["cache"]["double_stream"].setdefault(layer, {})
            image = hidden_states.shape[1]
            if current["type"] == "full":
                maps = dic["attn_map"]["double_stream"].setdefault(layer, {})
                oracle.pending_map = maps
                cache["attn"] = self.attn(hidden_states=norm_hs, encoder_hidden_states=norm_ehs)
                maps["img_mlp"], maps["txt_mlp"] = maps["total"][:, :image], maps["total"][:, image:]
                if self.use_dual_attention:
                    cache["attn2"] = self.attn2(hidden_states=norm_hs2)
            attn_output, context_attn_output = cache["attn"]
            hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
            if self.use_dual_attention:
                hidden_states = hidden_states + gate_msa2.unsqueeze(1) * cache["attn2"]

            img_mlp = stream_mlp(dic, current, cache, "img_mlp", hidden_states,
                                 lambda x: self.ff(self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]))
            hidden_states = hidden_states + gate_mlp.unsqueeze(1) * img_mlp
            if self.context_pre_only:
                return None, hidden_states

            encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
            txt_mlp = stream_mlp(dic, current, cache, "txt_mlp", encoder_hidden_states, lambda x: self.ff_context(
                self.norm2_context(x) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]))
            encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * txt_mlp
            return encoder_hidden_states, hidden_states

        return forward

    def _qwen(self, layer):
        """Qwen-Image's double-stream block under FLUX's double-stream rules (text tokens first in its joint
        attention, the text mask in the map)."""
        oracle = self

        def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                    image_rotary_emb=None, joint_attention_kwargs=None, modulate_index=None):
            assert modulate_index is None and not self.zero_cond_t
            dic, current = oracle.dic, oracle.current
            current["stream"], current["layer"] = "double_stream", layer
            img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)
            txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)
            img_modulated, img_gate1 = self._modulate(self.img_norm1(hidden_states), img_mod1)
            txt_modulated, txt_gate1 = self._modulate(self.txt_norm1(encoder_hidden_states), txt_mod1)
            cache = dic["cache"]["double_stream"].setdefault(layer, {})
            text = encoder_hidden_states.shape[1]
            if current["type"] == "full":
                maps = dic["attn_map"]["double_stream"].setdefault(layer, {})
                oracle.pending_map = maps
                cache["attn"] = self.attn(hidden_states=img_modulated, encoder_hidden_states=txt_modulated,
                                          encoder_hidden_states_mask=encoder_hidden_states_mask,
                                          image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
                maps["txt_mlp"], maps["img_mlp"] = maps["total"][:, :text], maps["total"][:, text:]
            img_attn_output, txt_attn_output = cache["attn"]
            hidden_states = hidden_states + img_gate1 * img_attn_output
            encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn_output
            outputs = []
            for stream, x, norm, mod, mlp in (
                    ("img_mlp", hidden_states, self.img_norm2, img_mod2, self.img_mlp),
                    ("txt_mlp", encoder_hidden_states, self.txt_norm2, txt_mod2, self.txt_mlp)):
                gate = self._modulate(norm(x), mod)[1]
                out = stream_mlp(dic, current, cache, stream, x, lambda t: mlp(self._modulate(norm(t), mod)[0]))
                outputs.append(x + gate * out)
            hidden_states, encoder_hidden_states = outputs
            return encoder_hidden_states, hidden_states

        return forward

    def _cogvideox(self, layer):
        """CogVideoX's block (a joint attention with an image and a text output, then ONE MLP over the joined
        text and video tokens): the attention cached as FLUX's double-stream blocks cache theirs, the MLP
        refreshed over the joined tokens with the whole map as the score (tgate_fx's choice; no official
        counterpart)."""
        oracle = self

        def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
            dic, current = oracle.dic, oracle.current
            current["stream"], current["layer"] = "double_stream", layer
            text = encoder_hidden_states.size(1)
            norm_hs, norm_ehs, gate_msa, enc_gate_msa = self.norm1(hidden_states, encoder_hidden_states, temb)
            cache = dic["cache"]["double_stream"].setdefault(layer, {})
            if current["type"] == "full":
                maps = dic["attn_map"]["double_stream"].setdefault(layer, {})
                oracle.pending_map = maps
                cache["attn"] = self.attn1(hidden_states=norm_hs, encoder_hidden_states=norm_ehs,
                                           image_rotary_emb=image_rotary_emb, **(attention_kwargs or {}))
                maps["mlp"] = maps["total"]
            attn_hs, attn_ehs = cache["attn"]
            hidden_states = hidden_states + gate_msa * attn_hs
            encoder_hidden_states = encoder_hidden_states + enc_gate_msa * attn_ehs
            norm_hs, norm_ehs, gate_ff, enc_gate_ff = self.norm2(hidden_states, encoder_hidden_states, temb)
            x = torch.cat([norm_ehs, norm_hs], dim=1)
            ff_output = stream_mlp(dic, current, cache, "mlp", x, self.ff)
            hidden_states = hidden_states + gate_ff * ff_output[:, text:]
            encoder_hidden_states = encoder_hidden_states + enc_gate_ff * ff_output[:, :text]
            return hidden_states, encoder_hidden_states

        return forward

    def _hunyuan(self, layer):
        """HunyuanVideo's double-stream block under FLUX's rules: image tokens first, the text mask in the map."""
        oracle = self

        def forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, freqs_cis=None, *args,
                    **kwargs):
            dic, current = oracle.dic, oracle.current
            current["stream"], current["layer"] = "double_stream", layer
            norm_hs, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
            norm_ehs, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states,
                                                                                          emb=temb)
            cache = dic["cache"]["double_stream"].setdefault(layer, {})
            image = hidden_states.shape[1]
            if current["type"] == "full":
                maps = dic["attn_map"]["double_stream"].setdefault(layer, {})
                oracle.pending_map = maps
                cache["attn"] = self.attn(hidden_states=norm_hs, encoder_hidden_states=norm_ehs,
                                          attention_mask=attention_mask, image_rotary_emb=freqs_cis)
                maps["img_mlp"], maps["txt_mlp"] = maps["total"][:, :image], maps["total"][:, image:]
            attn_output, context_attn_output = cache["attn"]
            hidden_states = hidden_states + attn_output * gate_msa.unsqueeze(1)
            encoder_hidden_states = encoder_hidden_states + context_attn_output * c_gate_msa.unsqueeze(1)
            outputs = []
            for stream, x, norm, ff, shift, scale, gate in (
                    ("img_mlp", hidden_states, self.norm2, self.ff, shift_mlp, scale_mlp, gate_mlp),
                    ("txt_mlp", encoder_hidden_states, self.norm2_context, self.ff_context, c_shift_mlp, c_scale_mlp,
                     c_gate_mlp)):
                out = stream_mlp(dic, current, cache, stream, x,
                                 lambda t: ff(norm(t) * (1 + scale[:, None]) + shift[:, None]))
                outputs.append(x + gate.unsqueeze(1) * out)
            hidden_states, encoder_hidden_states = outputs
            return hidden_states, encoder_hidden_states

        return forward

    def _hunyuan_single(self, layer):
        """HunyuanVideo's single-stream block under FLUX's single-stream rules (image tokens first; its
        attention returns the image and the text rows apart, joined again)."""
        oracle = self

        def forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None,
                    *args, **kwargs):
            dic, current = oracle.dic, oracle.current
            current["stream"], current["layer"] = "single_stream", layer
            text = encoder_hidden_states.shape[1]
            x = torch.cat([hidden_states, encoder_hidden_states], dim=1)
            cache = dic["cache"]["single_stream"].setdefault(layer, {})
            norm_x, gate = self.norm(x, emb=temb)
            if current["type"] == "full":
                mlp = self.act_mlp(self.proj_mlp(norm_x))
                cache["mlp"] = mlp
                current["module"] = "attn"
                oracle.pending_map = dic["attn_map"]["single_stream"].setdefault(layer, {})
                attn_output, context_attn_output = self.attn(
                    hidden_states=norm_x[:, :-text], encoder_hidden_states=norm_x[:, -text:],
                    attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
                attn = torch.cat([attn_output, context_attn_output], dim=1)
                force_init(dic, current, attn)
                cache["attn"] = attn
                current["module"] = "mlp"
                output = self.proj_out(torch.cat([attn, mlp], dim=2))
                force_init(dic, current, output)
                current["module"] = "total"
                cache["total"] = output
            else:
                current["module"] = "mlp"
                idx, fresh = cache_cutfresh(dic, x, current)
                mlp_fresh = self.act_mlp(self.proj_mlp(self.norm(fresh, emb=temb)[0]))
                update_cache(idx, mlp_fresh, dic, current)
                attn = cache["attn"]
                fake_fresh_attn = torch.gather(attn, 1, idx.unsqueeze(-1).expand(-1, -1, attn.shape[-1]))
                current["module"] = "total"
                fresh_out = self.proj_out(torch.cat([fake_fresh_attn, mlp_fresh], dim=2))
                update_cache(idx, fresh_out, dic, current)
                output = cache["total"]
            x = gate.unsqueeze(1) * output + x
            return x[:, :-text], x[:, -text:]

        return forward

    def _single(self, layer):
        oracle = self

        def forward(self, hidden_states, encoder_hidden_states=None, temb=None, image_rotary_emb=None,
                    attention_mask=None, joint_attention_kwargs=None):
            if oracle.chroma:  # Chroma's single blocks take the joint sequence (called with keywords)
                x = hidden_states
            else:
                text = encoder_hidden_states.shape[1]
                x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
            dic, current = oracle.dic, oracle.current
            current["stream"], current["layer"] = "single_stream", layer
            cache = dic["cache"]["single_stream"].setdefault(layer, {})
            norm_x, gate = self.norm(x, emb=temb)
            if current["type"] == "full":
                mlp = self.proj_mlp(norm_x)
                cache["mlp"] = mlp
                current["module"] = "attn"
                oracle.pending_map = dic["attn_map"]["single_stream"].setdefault(layer, {})
                extra = {}
                if attention_mask is not None:
                    extra["attention_mask"] = attention_mask[:, None, None, :] * attention_mask[:, None, :, None]
                attn = self.attn(hidden_states=norm_x, image_rotary_emb=image_rotary_emb, **extra)
                force_init(dic, current, attn)
                cache["attn"] = attn
                current["module"] = "mlp"
                output = self.proj_out(torch.cat([attn, self.act_mlp(mlp)], dim=2))
                force_init(dic, current, output)
                current["module"] = "total"
                cache["total"] = output
            else:
                current["module"] = "mlp"
                idx, fresh = cache_cutfresh(dic, x, current)
                mlp_fresh = self.proj_mlp(self.norm(fresh, emb=temb)[0])
                update_cache(idx, mlp_fresh, dic, current)
                attn = cache["attn"]
                fake_fresh_attn = torch.gather(attn, 1, idx.unsqueeze(-1).expand(-1, -1, attn.shape[-1]))
                current["module"] = "total"
                fresh_out = self.proj_out(torch.cat([fake_fresh_attn, self.act_mlp(mlp_fresh)], dim=2))
                update_cache(idx, fresh_out, dic, current)
                output = cache["total"]
            x = x + gate.unsqueeze(1) * output
            if oracle.chroma:
                return x
            return x[:, :text], x[:, text:]

        return forward

    def _flux2(self, layer):
        """FLUX.2's double-stream block under FLUX's double-stream rules (text tokens first; the modulation is
        computed once for all blocks)."""
        oracle = self

        def forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt, image_rotary_emb=None,
                    joint_attention_kwargs=None):
            dic, current = oracle.dic, oracle.current
            current["stream"], current["layer"] = "double_stream", layer
            (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = \
                flux2_module.Flux2Modulation.split(temb_mod_img, 2)
            (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = \
                flux2_module.Flux2Modulation.split(temb_mod_txt, 2)
            cache = dic["cache"]["double_stream"].setdefault(layer, {})
            text = encoder_hidden_states.shape[1]
            if current["type"] == "full":
                maps = dic["attn_map"]["double_stream"].setdefault(layer, {})
                oracle.pending_map = maps
                cache["attn"] = self.attn(hidden_states=(1 + scale_msa) * self.norm1(hidden_states) + shift_msa,
                                          encoder_hidden_states=(1 + c_scale_msa) * self.norm1_context(
                                              encoder_hidden_states) + c_shift_msa,
                                          image_rotary_emb=image_rotary_emb)
                maps["txt_mlp"], maps["img_mlp"] = maps["total"][:, :text], maps["total"][:, text:]
            attn_output, context_attn_output = cache["attn"]
            hidden_states = hidden_states + gate_msa * attn_output
            encoder_hidden_states = encoder_hidden_states + c_gate_msa * context_attn_output
            outputs = []
            for stream, x, norm, ff, shift, scale, gate in (
                    ("img_mlp", hidden_states, self.norm2, self.ff, shift_mlp, scale_mlp, gate_mlp),
                    ("txt_mlp", encoder_hidden_states, self.norm2_context, self.ff_context, c_shift_mlp, c_scale_mlp,
                     c_gate_mlp)):
                outputs.append(x + gate * stream_mlp(dic, current, cache, stream, x,
                                                     lambda t: ff(norm(t) * (1 + scale) + shift)))
            hidden_states, encoder_hidden_states = outputs
            return encoder_hidden_states, hidden_states

        return forward

    def _flux2_single(self, layer):
        """FLUX.2's parallel single-stream block (the joined sequence in, attention and MLP branch from one
        projection, projected together) under FLUX's single-stream rules."""
        oracle = self

        def forward(self, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb=None,
                    joint_attention_kwargs=None, split_hidden_states=False, text_seq_len=None):
            assert encoder_hidden_states is None and not split_hidden_states
            x = hidden_states
            dic, current = oracle.dic, oracle.current
            current["stream"], current["layer"] = "single_stream", layer
            cache = dic["cache"]["single_stream"].setdefault(layer, {})
            shift, scale, gate = flux2_module.Flux2Modulation.split(temb_mod, 1)[0]
            attn = self.attn
            if current["type"] == "full":
                oracle.pending_map = dic["attn_map"]["single_stream"].setdefault(layer, {})
                oracle.pending_out = cache
                output = attn(hidden_states=(1 + scale) * self.norm(x) + shift, image_rotary_emb=image_rotary_emb)
                for module in ("attn", "mlp", "total"):
                    current["module"] = module
                    force_init(dic, current, output)
                cache["total"] = output
            else:
                current["module"] = "mlp"
                idx, fresh = cache_cutfresh(dic, x, current)
                projected = attn.to_qkv_mlp_proj((1 + scale) * self.norm(fresh) + shift)
                qkv = 3 * attn.inner_dim
                mlp_fresh = attn.mlp_act_fn(projected[..., qkv:])
                cached = cache["attn"]
                fake_fresh_attn = torch.gather(cached, 1, idx.unsqueeze(-1).expand(-1, -1, cached.shape[-1]))
                current["module"] = "total"
                update_cache(idx, attn.to_out(torch.cat([fake_fresh_attn, mlp_fresh], dim=-1)), dic, current)
                output = cache["total"]
            return x + gate * output

        return forward
