"""Tiny seeded pipelines of the families outside the main test matrix (:data:`tgate_fx.tiny.FAMILIES`).

Video and newer image families, each tested on its own (``tests/test_families_extra.py``):
AnimateDiff (``UNetMotionModel``), Stable Video Diffusion
(``UNetSpatioTemporalConditionModel``), Sana, HunyuanDiT, Wan 2.1 and
LTX-Video. Each builder returns ``(pipeline, call_kwargs)``; the pipeline's
progress bar is off and every call kwarg needed for a 2-3 frame, 32x32
generation is given. Shapes follow diffusers' own pipeline tests.
"""

from __future__ import annotations

import torch

from .tiny import _clip_text_encoder, _sd_scheduler, _vae, make_tokenizer, tiny_pipeline

__all__ = ["tiny_animatediff", "tiny_svd"]


def _seeded(seed: int):
    torch.manual_seed(seed)


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
