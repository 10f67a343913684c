"""Tiny seeded pipelines of the families outside the main test matrix (:data:`tgate_fx.tiny.FAMILIES`).

Video and newer image families, each tested on its own (``tests/test_families_extra.py``,
``tests/test_tiny_extra.py``): AnimateDiff (``UNetMotionModel``), Stable Video Diffusion
(``UNetSpatioTemporalConditionModel``), Sana, HunyuanDiT, Wan 2.1,
LTX-Video, Kandinsky 2.2, FLUX.1 (and Kontext), Chroma, Stable Diffusion 3
(and SD3.5's dual attention), Qwen-Image, HunyuanVideo, CogVideoX, FLUX.2 (and
[klein]) and Z-Image. Each builder returns ``(pipeline, call_kwargs)``; the pipeline's progress bar is
off and every call kwarg needed for a 32x32 generation of a few frames is
given (HunyuanDiT: 64x64, its rotary grid assumes a VAE factor of 8). Shapes
follow diffusers' own pipeline tests; no token count (text or image) is a
multiple of 11.

Sana (Gemma), HunyuanDiT (BERT and mT5), Wan (UMT5), LTX-Video (T5), FLUX.1
and SD3 (CLIP and T5), Chroma and CogVideoX (T5), Qwen-Image (Qwen2.5-VL),
HunyuanVideo (Llama and CLIP), FLUX.2 (Mistral; [klein]: Qwen3) and Z-Image
(Qwen3) ship no text encoder here: their tokenizers cannot be built offline,
so the call kwargs carry seeded ``prompt_embeds``/``negative_prompt_embeds`` (and the pooled
embeddings and masks each pipeline wants with them), as a user of prompt-weighting tools calls them.
"""

from __future__ import annotations

import torch

from .tiny import tiny_pipeline

__all__ = ["tiny_animatediff", "tiny_hunyuandit", "tiny_kandinsky22", "tiny_ltx", "tiny_sana", "tiny_svd",
           "tiny_t2i_adapter", "tiny_wan", "tiny_wan22", "tiny_flux", "tiny_chroma", "tiny_sd3", "tiny_qwenimage",
           "tiny_hunyuanvideo", "tiny_cogvideox", "tiny_flux2", "tiny_zimage"]


def _seeded(seed: int):
    torch.manual_seed(seed)


def _embeds(seed: int, tokens: int, dim: int, *, mask: bool = True, suffix: str = "") -> dict:
    """Seeded positive and negative text embeddings (and all-ones attention masks) for one prompt."""
    g = torch.Generator().manual_seed(seed)
    out = {f"prompt_embeds{suffix}": torch.randn(1, tokens, dim, generator=g),
           f"negative_prompt_embeds{suffix}": torch.randn(1, tokens, dim, generator=g)}
    if mask:
        out[f"prompt_attention_mask{suffix}"] = torch.ones(1, tokens, dtype=torch.long)
        out[f"negative_prompt_attention_mask{suffix}"] = torch.ones(1, tokens, dtype=torch.long)
    return out


def tiny_animatediff(seed: int = 0):
    """AnimateDiff over the tiny SD-1.5 UNet with a tiny motion adapter (3 frames of 32x32)."""
    from diffusers import AnimateDiffPipeline, MotionAdapter, UNetMotionModel

    base = tiny_pipeline("sd15", seed=seed)
    _seeded(seed + 11)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1,
                            motion_transformer_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=8, motion_max_seq_length=8)
    with torch.no_grad():  # motion modules start at zero output; give them weights so they matter
        for name, p in adapter.named_parameters():
            if "proj_out" in name:
                p.normal_(0.0, 0.05)
    unet = UNetMotionModel.from_unet2d(base.unet, adapter).eval()
    pipe = AnimateDiffPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
                               motion_adapter=adapter, scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(prompt="a red circle", height=32, width=32, num_frames=3, guidance_scale=7.5)


def tiny_svd(seed: int = 0):
    """Stable Video Diffusion (image to video), 3 frames of 32x32, CFG on (guidance 1 -> 3 across frames)."""
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    _seeded(seed)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=(2, 4), projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32, num_frames=3,
    ).eval()
    _seeded(seed + 1)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                                       down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                                       latent_channels=4).eval()
    _seeded(seed + 2)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        intermediate_size=37, patch_size=4)).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
        steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 7))
    return pipe, dict(image=image, height=32, width=32, num_frames=3, decode_chunk_size=3,
                      min_guidance_scale=1.0, max_guidance_scale=3.0)


def tiny_sana(seed: int = 0):
    """Sana (linear self-attention, softmax cross-attention), 32x32, CFG on; text as embeddings (Gemma)."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    _seeded(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=16).eval()
    _seeded(seed + 1)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407).eval()
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(negative_prompt=None, **_embeds(seed + 5, 6, 8), height=32, width=32, guidance_scale=4.5,
                      use_resolution_binning=False)


def tiny_hunyuandit(seed: int = 0):
    """HunyuanDiT (rotary self-attention; cross-attention over CLIP and projected T5 tokens), 64x64, CFG on.

    Text as embeddings for both encoders (BERT: 6 tokens, mT5: 8); the pooled
    mT5 embedding also enters the timestep embedding.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    _seeded(seed)
    transformer = HunyuanDiT2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=3, in_channels=4,
        cross_attention_dim=32, cross_attention_dim_t5=32, pooled_projection_dim=16, hidden_size=24,
        activation_fn="gelu-approximate", text_len=6, text_len_t5=8).eval()
    _seeded(seed + 1)
    # four blocks: the pipeline sizes its rotary grid as height // 8 // patch_size
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=4, layers_per_block=1, sample_size=64).eval()
    pipe = HunyuanDiTPipeline(vae=vae, text_encoder=None, tokenizer=None, transformer=transformer,
                              scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(**_embeds(seed + 5, 6, 32), **_embeds(seed + 6, 8, 32, suffix="_2"), height=64, width=64,
                      guidance_scale=5.0, use_resolution_binning=False)


def tiny_ltx(seed: int = 0, *, num_layers: int = 1):
    """LTX-Video (its own LTXAttention class, rotary self-attention), 9 frames of 32x32 (2 latent frames), CFG on;
    ``num_layers`` transformer blocks (a block cache needs two)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    _seeded(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=num_layers, caption_channels=32).eval()
    _seeded(seed + 1)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False).eval()
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                       transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(**_embeds(seed + 5, 8, 32), height=32, width=32, num_frames=9, guidance_scale=3.0)


def tiny_wan(seed: int = 0, *, guidance_scale: float = 6.0):
    """Wan 2.1 text to video (its own WanAttention class), 9 frames of 32x32 (3 latent frames of 4x4).

    ``guidance_scale > 1`` runs CFG as Wan's pipelines do: two denoiser calls
    per step (conditional, then unconditional), not one batch.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    _seeded(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32).eval()
    _seeded(seed + 1)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(**_embeds(seed + 5, 8, 32, mask=False), height=32, width=32, num_frames=9,
                      guidance_scale=guidance_scale)


def tiny_wan22(seed: int = 0, *, guidance_scale: float = 6.0, boundary_ratio: float = 0.9):
    """Wan 2.2 text to video: :func:`tiny_wan` with a second expert, ``transformer_2`` (other weights), which
    runs the steps whose timestep is below ``boundary_ratio * 1000`` (the pipeline's switch)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    pipe, call = tiny_wan(seed, guidance_scale=guidance_scale)
    _seeded(seed + 2)
    second = WanTransformer3DModel(**pipe.transformer.config).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=pipe.vae, transformer=pipe.transformer,
                       transformer_2=second, scheduler=pipe.scheduler, boundary_ratio=boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {**call, "guidance_scale_2": guidance_scale}


def tiny_kandinsky22(seed: int = 0):
    """Kandinsky 2.2 decoder (image embeddings enter attention as added keys/values), 32x32, CFG on."""
    from diffusers import DDIMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    _seeded(seed)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
        encoder_hid_dim=32, encoder_hid_dim_type="image_proj", cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type=None).eval()
    _seeded(seed + 1)
    movq = VQModel(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                   in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                   num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
                   vq_embed_dim=4).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                              thresholding=False)
    pipe = KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 5)
    return pipe, dict(image_embeds=torch.randn(1, 32, generator=g), negative_image_embeds=torch.randn(1, 32, generator=g),
                      height=32, width=32, guidance_scale=4.0)


def tiny_t2i_adapter(seed: int = 0):
    """SD 1.5 with a T2I-Adapter (``StableDiffusionAdapterPipeline``), 32x32, CFG on.

    The adapter's features reach the UNet as a list, ``down_intrablock_additional_residuals``,
    which the UNet consumes (``pop(0)``) on its way down.
    """
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    sd = tiny_pipeline("sd15", seed=seed)
    _seeded(seed + 7)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=2,
                         adapter_type="full_adapter").eval()
    pipe = StableDiffusionAdapterPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                          adapter=adapter, scheduler=sd.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 8)
    return pipe, dict(image=torch.rand(1, 3, 32, 32, generator=g), height=32, width=32, guidance_scale=7.5)


def tiny_flux(seed: int = 0, *, true_cfg_scale: float = 1.0, size: int = 32, kontext: bool = False):
    """FLUX.1 text to image (``FluxTransformer2DModel``: double- and single-stream blocks), ``size`` x ``size``.

    The VAE has one block (scale factor 1), so a 32 x 32 image is 16 x 16 latents packed 2 x 2 into 256 image
    tokens; the text is 9 seeded T5-like tokens (9: no token count is a multiple of
    the probe batch 11 of :mod:`tgate_fx.core.rebatch`, so every batch size is served by one capture) and a pooled CLIP-like vector. ``true_cfg_scale > 1`` runs
    true CFG as FluxPipeline does: two denoiser calls per step (conditional, then unconditional).
    ``kontext``: FluxKontextPipeline, whose image tokens also hold a reference image's (an input image).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline
    from diffusers import FluxTransformer2DModel

    _seeded(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    _seeded(seed + 1)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    cls = FluxKontextPipeline if kontext else FluxPipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
               text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 5)
    call = dict(prompt_embeds=torch.randn(1, 9, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                height=size, width=size, guidance_scale=3.5, max_sequence_length=9)
    if true_cfg_scale > 1:
        call.update(negative_prompt_embeds=torch.randn(1, 9, 32, generator=g),
                    negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g), true_cfg_scale=true_cfg_scale)
    if kontext:
        # max_area: the size asked for (Kontext scales to 1024 x 1024 by default)
        call.update(image=torch.rand(1, 3, size, size, generator=g), _auto_resize=False, max_area=size * size)
    return pipe, call


def tiny_chroma(seed: int = 0, *, guidance_scale: float = 4.0, size: int = 32):
    """Chroma text to image (``ChromaTransformer2DModel``: FLUX's blocks, modulation from a distilled
    approximator, a text attention mask), ``size`` x ``size``; CFG (``guidance_scale > 1``) runs as two
    denoiser calls per step. The text is 9 seeded tokens, the last 2 masked out."""
    from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    _seeded(seed)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=[4, 4, 8], approximator_num_channels=8,
                                           approximator_hidden_dim=32, approximator_layers=1).eval()
    _seeded(seed + 1)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                          transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 5)
    mask = torch.ones(1, 9)  # the dtype ChromaPipeline._get_t5_prompt_embeds returns
    mask[:, 7:] = 0
    call = dict(prompt_embeds=torch.randn(1, 9, 32, generator=g), prompt_attention_mask=mask,
                height=size, width=size, guidance_scale=guidance_scale, max_sequence_length=9)
    if guidance_scale > 1:
        call.update(negative_prompt_embeds=torch.randn(1, 9, 32, generator=g), negative_prompt_attention_mask=mask)
    return pipe, call


def tiny_sd3(seed: int = 0, *, guidance_scale: float = 5.0, dual_attention: bool = False, num_layers: int = 1):
    """Stable Diffusion 3 (``SD3Transformer2DModel``: joint text-image blocks), 32 x 32; CFG
    (``guidance_scale > 1``) runs as SD3's pipeline does, one denoiser call per step on a batch of 2.

    The VAE has one block (scale factor 1), so a 32 x 32 image is 1024 image tokens (patch size 1); the text is
    9 seeded tokens and a pooled embedding, in place of the two CLIP and one T5 encoders. ``dual_attention``:
    SD3.5-medium's block (a second self-attention over the image tokens, ``dual_attention_layers=(0,)``, and its
    RMS query/key norm).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline

    _seeded(seed)
    sd35 = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if dual_attention else {}
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=num_layers, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=64, out_channels=4, **sd35).eval()
    _seeded(seed + 1)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 5)
    text, pooled = transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim
    call = dict(prompt_embeds=torch.randn(1, 9, text, generator=g), pooled_prompt_embeds=torch.randn(1, pooled, generator=g),
                height=32, width=32, guidance_scale=guidance_scale)
    if guidance_scale > 1:
        call.update(negative_prompt_embeds=torch.randn(1, 9, text, generator=g),
                    negative_pooled_prompt_embeds=torch.randn(1, pooled, generator=g))
    return pipe, call


def tiny_qwenimage(seed: int = 0, *, true_cfg_scale: float = 4.0):
    """Qwen-Image (``QwenImageTransformer2DModel``: joint text-image blocks, 3D rotary positions), 32 x 32; true
    CFG (``true_cfg_scale > 1``) runs as QwenImagePipeline does: two denoiser calls per step (conditional, then
    unconditional), the combination rescaled to the conditional prediction's norm.

    The VAE's scale factor is 4 and latents are packed 2 x 2: 16 image tokens on a 4 x 4 grid. The text is 8
    seeded tokens (in place of Qwen2.5-VL's hidden states) whose last 2 are masked out, as padding is when prompts
    differ in length (the pipeline drops an all-ones mask, so the transformer would never see one). Not 9: the
    text's rotary positions start after the grid's largest index (2), and 2 + 9 would be the probe batch 11 of
    :mod:`tgate_fx.core.rebatch`, so batch 1 could not be served by the probe capture.
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers import QwenImageTransformer2DModel

    _seeded(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4)).eval()
    _seeded(seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 5)
    mask = torch.ones(1, 8, dtype=torch.long)  # the dtype QwenImagePipeline._get_qwen_prompt_embeds returns
    mask[:, 6:] = 0
    call = dict(prompt_embeds=torch.randn(1, 8, 16, generator=g), prompt_embeds_mask=mask, height=32, width=32,
                true_cfg_scale=true_cfg_scale)
    if true_cfg_scale > 1:
        call.update(negative_prompt_embeds=torch.randn(1, 8, 16, generator=g), negative_prompt_embeds_mask=mask.clone())
    return pipe, call


def tiny_hunyuanvideo(seed: int = 0):
    """HunyuanVideo text to video (``HunyuanVideoTransformer3DModel``: a token refiner, then double- and
    single-stream blocks), 9 frames of 32 x 32 (3 latent frames of 4 x 4: 48 image tokens); guidance is
    embedded (distilled), so one denoiser call per step and no CFG batch.

    The text is 9 seeded tokens (in place of Llama's hidden states) whose last 2 are masked out, as the padding
    of Llama's fixed-length prompt is, and a pooled embedding (in place of CLIP's).
    """
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from diffusers import HunyuanVideoTransformer3DModel

    _seeded(seed)
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=10, num_layers=1, num_single_layers=1,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
                                                 rope_axes_dim=(2, 4, 4)).eval()
    _seeded(seed + 1)
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
                                    spatial_compression_ratio=8, temporal_compression_ratio=4,
                                    mid_block_add_attention=True).eval()
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 5)
    mask = torch.ones(1, 9, dtype=torch.long)  # the tokenizer's mask; the pipeline casts it to the model's dtype
    mask[:, 7:] = 0
    return pipe, dict(prompt_embeds=torch.randn(1, 9, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                      prompt_attention_mask=mask, height=32, width=32, num_frames=9, guidance_scale=4.5)


def tiny_cogvideox(seed: int = 0, *, guidance_scale: float = 6.0, num_layers: int = 1):
    """CogVideoX text to video (``CogVideoXTransformer3DModel``: text and video tokens in one sequence, with
    sin-cos positions), 9 frames of 32 x 32 (3 latent frames of 4 x 4, patched 2 x 2: 12 video tokens); CFG
    (``guidance_scale > 1``) runs as one denoiser call per step on a batch of 2.

    The transformer's ``sample_height``/``sample_width``/``sample_frames`` are the generated size, so its stored
    positional table is used: at another size the patch embedding rebuilds it in the call (which
    ``torch.export`` cannot trace). The text is 9 seeded tokens (in place of T5's), the transformer's
    ``max_text_seq_length``: the positions are added to the whole joint sequence.
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler

    _seeded(seed)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
                                              time_embed_dim=2, text_embed_dim=32, num_layers=num_layers, sample_width=4,
                                              sample_height=4, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=9).eval()
    _seeded(seed + 1)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                             scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 5)
    call = dict(prompt_embeds=torch.randn(1, 9, 32, generator=g), height=32, width=32, num_frames=9,
                guidance_scale=guidance_scale)
    if guidance_scale > 1:
        call["negative_prompt_embeds"] = torch.randn(1, 9, 32, generator=g)
    return pipe, call


def tiny_flux2(seed: int = 0, *, klein: bool = False, guidance_scale: float = 4.0, size: int = 32):
    """FLUX.2 text to image (``Flux2Transformer2DModel``: double-stream blocks, then parallel single-stream
    blocks over the joined text and image sequence), ``size`` x ``size``.

    The VAE (``AutoencoderKLFlux2``) has one block and one latent channel, packed 2 x 2 into 4 channels: a
    32 x 32 image is 256 image tokens; the text is 9 seeded tokens (Mistral-like, width 32). ``klein``:
    ``Flux2KleinPipeline`` (not distilled), which runs CFG as two denoiser calls per step when
    ``guidance_scale > 1``; else ``Flux2Pipeline`` (guidance distilled: one call per step, the guidance
    scale embedded).
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
    from diffusers import Flux2Transformer2DModel

    _seeded(seed)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                          timestep_guidance_channels=32, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=not klein).eval()
    _seeded(seed + 1)
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                             down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                             layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                             use_post_quant_conv=False).eval()
    cls = Flux2KleinPipeline if klein else Flux2Pipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
               transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 5)
    call = dict(prompt_embeds=torch.randn(1, 9, 32, generator=g), height=size, width=size,
                guidance_scale=guidance_scale, max_sequence_length=9)
    if klein and guidance_scale > 1:
        call.update(negative_prompt_embeds=torch.randn(1, 9, 32, generator=g))
    return pipe, call


def tiny_zimage(seed: int = 0, *, guidance_scale: float = 3.0, num_layers: int = 2):
    """Z-Image text to image (``ZImageTransformer2DModel``: single-stream ``layers`` over image and caption
    tokens, after a noise and a context refiner), 32 x 32; CFG (``guidance_scale > 0``: Z-Image's pipeline
    guides at any positive scale) runs as one denoiser call per step on a batch of 2, the conditional half first.

    Sizes are diffusers' fast test's (``tests/pipelines/z_image/test_z_image.py``), its pad tokens fixed to
    ones as there. The transformer takes lists of per-sample tensors: latents ``(16, 1, 16, 16)``, 64 image
    tokens after the 2 x 2 patches, and captions of 9 seeded tokens (in place of Qwen3's hidden states, whose
    tokenizer cannot be built offline), which the transformer pads to 32: 96 tokens in the main blocks.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    _seeded(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=num_layers, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                           norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0,
                                           t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]).eval()
    with torch.no_grad():  # torch.empty in diffusers: fixed as its fast test does
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    _seeded(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
                        latent_channels=16, norm_num_groups=32, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159).eval()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                          transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 5)
    call = dict(prompt_embeds=[torch.randn(9, 16, generator=g)], height=32, width=32, guidance_scale=guidance_scale)
    if guidance_scale > 0:
        call["negative_prompt_embeds"] = [torch.randn(9, 16, generator=g)]
    return pipe, call
