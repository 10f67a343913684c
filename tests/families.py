"""Tiny seeded pipelines of the diffusers families a user runs, for the families x methods matrix.

Two kinds:

* :func:`pipeline` ``(name) -> (pipe, call kwargs)``: a full diffusers
  pipeline (tiny components with the sizes of diffusers' fast tests) that can
  generate, for the families tgate_fx accelerates;
* :func:`transformer` ``(name)``: the denoiser alone, for the transformers
  that every method refuses at ``optimize`` (Lumina2, AuraFlow, HiDream:
  their pipelines need text encoders that cannot be built here without the
  hub). They are wrapped in a minimal ``DiffusionPipeline`` (:func:`holding`):
  refusing them only needs the denoiser. Flux, Chroma, SD3, Qwen-Image,
  HunyuanVideo and CogVideoX are pipelines given embeddings instead of text
  encoders (:mod:`tgate_fx.tiny_extra`).
"""

from __future__ import annotations

import torch

from tgate_fx import tiny_extra
from tgate_fx.tiny import FAMILIES, tiny_pipeline

# name -> the output field of a latent generation
PIPELINES = {
    **{name: "images" for name in ("sd15", "sd21", "sdxl", "lcm_sdxl", "sd15_img2img", "sd15_controlnet",
                                   "pixart_alpha", "pixart_sigma", "lcm_pixart", "dit", "sana", "hunyuandit",
                                   "kandinsky22", "t2i_adapter", "flux", "flux_true_cfg", "flux_kontext",
                                   "chroma", "sd3", "sd35", "qwenimage", "flux2", "flux2_klein",
                                   "zimage")},
    **{name: "frames" for name in ("animatediff", "svd", "ltx", "wan", "hunyuanvideo", "cogvideox")},
}
# Pipelines built with settings of another family's builder.
_VARIANTS = {"flux_true_cfg": lambda: tiny_extra.tiny_flux(true_cfg_scale=4.0),
             "flux_kontext": lambda: tiny_extra.tiny_flux(kontext=True),
             "sd35": lambda: tiny_extra.tiny_sd3(dual_attention=True),
             "flux2_klein": lambda: tiny_extra.tiny_flux2(klein=True)}
TRANSFORMERS = ("lumina2", "auraflow", "hidream")


def pipeline(name: str):
    """``(pipe, call kwargs)`` of the tiny pipeline ``name`` (one of :data:`PIPELINES`), freshly built."""
    if name in FAMILIES:
        pipe = tiny_pipeline(name)
        return pipe, dict(pipe.tiny_call_kwargs)
    if name in _VARIANTS:
        return _VARIANTS[name]()
    return getattr(tiny_extra, f"tiny_{name}")()


def generate(pipe, name: str, call: dict, steps: int) -> torch.Tensor:
    """The latents of one seeded generation of ``steps`` denoising steps (img2img: of ``strength`` times the
    scheduler's steps, as diffusers counts them)."""
    if "strength" in call:
        scheduled = next(n for n in range(steps, 100 * steps) if int(n * call["strength"]) == steps)
        call = {**call, "num_inference_steps": scheduled}
    else:
        call = {**call, "num_inference_steps": steps}
    call = {"prompt": "a red circle", **call} if "prompt_embeds" not in call and name not in ("svd", "kandinsky22",
                                                                                               "dit") else call
    if name == "dit":  # DiTPipeline always decodes: the decoded images (equal latents give equal images)
        return pipe([1], generator=torch.Generator().manual_seed(0), output_type="pt", **call).images
    out = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **call)
    return getattr(out, PIPELINES[name])


def transformer(name: str) -> torch.nn.Module:
    """The tiny transformer ``name`` (one of :data:`TRANSFORMERS`), seeded, from diffusers' model-test sizes."""
    import diffusers

    torch.manual_seed(0)
    flux = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8])
    build = {
        "flux": lambda: diffusers.FluxTransformer2DModel(**flux, pooled_projection_dim=32),
        "chroma": lambda: diffusers.ChromaTransformer2DModel(**flux, approximator_hidden_dim=32,
                                                             approximator_layers=1, approximator_num_channels=16),
        "sd3": lambda: diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4),
        "qwenimage": lambda: diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
            joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
        "hunyuanvideo": lambda: diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)),
        "cogvideox": lambda: diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
            text_embed_dim=32, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=16),
        "lumina2": lambda: diffusers.Lumina2Transformer2DModel(
            sample_size=4, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
            num_attention_heads=3, num_kv_heads=1, multiple_of=16, norm_eps=1e-5, axes_dim_rope=(4, 2, 2),
            axes_lens=(128, 128, 128), cap_feat_dim=8),
        "auraflow": lambda: diffusers.AuraFlowTransformer2DModel(
            sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
            out_channels=4, pos_embed_max_size=256),
        "hidream": lambda: diffusers.HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=4,
            num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1)),
    }
    return build[name]()


def holding(denoiser: torch.nn.Module):
    """A minimal ``DiffusionPipeline`` whose only component is ``denoiser`` (at ``pipe.transformer``)."""
    from diffusers import DiffusionPipeline

    class TransformerOnly(DiffusionPipeline):
        def __init__(self, transformer):
            super().__init__()
            self.register_modules(transformer=transformer)

    return TransformerOnly(denoiser)
