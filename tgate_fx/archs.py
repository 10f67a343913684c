"""Full-size denoiser architectures, built on the ``meta`` device: shapes and graphs, no weights.

Each :class:`Arch` carries a published ``config.json`` (source cited next to
it), the resolution and text length the T-GATE paper measures it at (for
FLUX.1-dev, Wan 2.1 T2V 1.3B and HunyuanVideo, which it does not: their
diffusers pipelines' defaults, frames included), its T-GATE defaults
(``/work/shared/docs/tgate-reference.md``; none where none is published) and
whether its pipeline runs classifier-free guidance. It builds the denoiser
under ``torch.device("meta")`` and the call a diffusers pipeline makes to it,
so that :func:`tgate_fx.core.capture.capture_denoiser` can export SD-XL,
PixArt or FLUX.1-dev in seconds on a laptop, and
:mod:`tgate_fx.accounting.macs` can count what every method's variants cost.

Example::

    >>> from tgate_fx.archs import get_arch, ArchGraphs
    >>> arch = get_arch("sdxl")
    >>> arch.height, arch.tgate.gate_step, arch.cfg
    (1024, 10, True)
    >>> graphs = ArchGraphs(arch)(batch_size=2)     # doctest: +SKIP
    >>> len(graphs.sites)                            # doctest: +SKIP
    140
    >>> get_arch("wan21_t2v_1_3b").image_tokens     # 21 latent frames of 30 x 52 patches
    32760
"""

from __future__ import annotations

import inspect
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from .core.capture import capture_denoiser
from .core.rebatch import BatchCaptures
from .core.variants import CapturedGraphs
from .methods import TGateConfig

__all__ = ["ARCHS", "Arch", "ArchGraphs", "arch_from_pipeline", "get_arch"]

# VAE downsampling of every model here (SD, SD-XL and PixArt VAEs have 4 blocks; FLUX's, Wan's and
# HunyuanVideo's also scale by 8), and the video VAEs' temporal compression (Wan, HunyuanVideo: 4).
_VAE_SCALE = 8
_VAE_TEMPORAL = 4
_FAMILIES = ("sd", "sdxl", "pixart", "dit", "flux", "flux2", "zimage", "wan", "hunyuanvideo")
_TOKENS = ("flux", "flux2", "zimage", "wan", "hunyuanvideo")  # the families that count image tokens
_VIDEO = ("wan", "hunyuanvideo")

# --- published configs ------------------------------------------------------------------
# Copied key for key from the models' ``config.json`` files. Where the
# official file was only readable through a verbatim copy, the copy is cited
# too. Bookkeeping keys (``_class_name``, ``_diffusers_version``) are kept:
# ``from_config`` ignores them.

# runwayml/stable-diffusion-v1-5, unet/config.json
# (https://huggingface.co/runwayml/stable-diffusion-v1-5/blob/main/unet/config.json; read through the
# verbatim copy https://huggingface.co/neuronaut/vasyalozhkin-style/blame/main/unet/config.json,
# "_name_or_path": "runwayml/stable-diffusion-v1-5").
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/stable-diffusion-2-1, unet/config.json
# (https://huggingface.co/stabilityai/stable-diffusion-2-1/blob/main/unet/config.json; read through the
# verbatim copy https://huggingface.co/Kayvane/rick-and-morty-rsanchez-character-10000-steps-20-inputs/
# blame/9f4faf8a38ff513ddef67afdc215c2fa71a5f1d4/unet/config.json, "_name_or_path": "stabilityai/stable-diffusion-2-1").
SD21_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "resnet_time_scale_shift": "default",
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
# (https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/unet/config.json; the same
# file is committed as the starting point of latent-consistency/lcm-sdxl,
# https://huggingface.co/latent-consistency/lcm-sdxl/commit/7136117e57233ea0d299aa4520e6a15aa47ec6a2,
# "_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0").
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# latent-consistency/lcm-sdxl, config.json
# (https://huggingface.co/latent-consistency/lcm-sdxl/blob/main/config.json): the SD-XL base UNet
# distilled with a guidance-scale embedding. Its architecture keys were read through the verbatim copy
# https://huggingface.co/Jingya/lcm-sdxl-neuronx/blob/0d64a77a370fc45b77bc4cfc050f5daed4a94459/unet/config.json
# ("_name_or_path": "latent-consistency/lcm-sdxl"); time_cond_proj_dim=256 is the value the diffusers
# distillation script gives the student (examples/consistency_distillation/train_lcm_distill_sdxl_wds.py,
# --unet_time_cond_proj_dim default 256).
LCM_SDXL_UNET = {**SDXL_UNET, "time_cond_proj_dim": 256}

# PixArt-alpha/PixArt-XL-2-1024-MS, transformer/config.json
# (https://huggingface.co/PixArt-alpha/PixArt-XL-2-1024-MS/blob/main/transformer/config.json; read through
# the verbatim copy https://huggingface.co/Luo-Yihong/yoso_pixart1024/blob/main/config.json,
# "_name_or_path": "PixArt-alpha/PixArt-XL-2-1024-MS"). PixArt-LCM-XL-2-1024-MS ships the same 719-byte
# transformer config (https://huggingface.co/PixArt-alpha/PixArt-LCM-XL-2-1024-MS/tree/main/transformer).
PIXART_ALPHA_TRANSFORMER = {
    "_class_name": "Transformer2DModel",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "double_self_attention": False,
    "dropout": 0.0,
    "in_channels": 4,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 128,
    "upcast_attention": False,
    "use_linear_projection": False,
}

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json
# (https://huggingface.co/PixArt-alpha/PixArt-Sigma-XL-2-1024-MS/blob/main/transformer/config.json,
# "Update config file for diffusers update"; read through the verbatim copy
# https://huggingface.co/unclecode/pixart-sigma-int8/blob/main/config.json,
# "_name_or_path": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS").
# It differs from PixArt-alpha's only in these keys (every other key is equal, checked against that copy):
PIXART_SIGMA_TRANSFORMER = {
    **PIXART_ALPHA_TRANSFORMER,
    "_class_name": "PixArtTransformer2DModel",
    "interpolation_scale": 2,
    "use_additional_conditions": False,
}

# facebook/DiT-XL-2-256, transformer/config.json (https://huggingface.co/facebook/DiT-XL-2-256/blob/main/
# transformer/config.json): DiT-XL/2, 28 blocks of width 1152, patch 2 on the 32x32 latent of 256x256 px,
# class-conditional (1000 classes + the null class of CFG), no text. diffusers loads it as DiTTransformer2DModel.
DIT_XL_2_256_TRANSFORMER = {
    "_class_name": "Transformer2DModel",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "dropout": 0.0,
    "in_channels": 4,
    "norm_elementwise_affine": False,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_zero",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 32,
    "upcast_attention": False,
    "use_linear_projection": False,
}

# black-forest-labs/FLUX.1-dev, transformer/config.json
# (https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/transformer/config.json). The file holds
# exactly FluxTransformer2DModel's constructor defaults (FLUX.1's 19 double- and 38 single-stream blocks of
# width 24 x 128) with guidance_embeds on (FLUX.1-dev is guidance-distilled): diffusers'
# scripts/convert_flux_to_diffusers.py builds FluxTransformer2DModel(in_channels=64, out_channels=None,
# guidance_embeds=True) for a checkpoint with guidance weights (github:huggingface/diffusers at 58eb52c0).
FLUX1_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "out_channels": None,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

# black-forest-labs/FLUX.2-dev, transformer/config.json, as diffusers 0.42.1 gives it: Flux2Transformer2DModel's
# constructor defaults (written out here) are FLUX.2-dev's, the model its pipeline's docstring loads; the file
# itself could not be read offline. FLUX.2's 8 double- and 48 single-stream blocks of width 48 x 128 (the
# block counts and width that independent ports, mflux and sglang, give too), Mistral 3 text width 15360
# (three hidden layers of 5120 stacked), 128 latent channels (32 VAE channels, 2 x 2-patchified), guidance
# embedded.
FLUX2_DEV_TRANSFORMER = {
    "_class_name": "Flux2Transformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [32, 32, 32, 32],
    "eps": 1e-06,
    "guidance_embeds": True,
    "in_channels": 128,
    "joint_attention_dim": 15360,
    "mlp_ratio": 3.0,
    "num_attention_heads": 48,
    "num_layers": 8,
    "num_single_layers": 48,
    "out_channels": None,
    "patch_size": 1,
    "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}

# Tongyi-MAI/Z-Image-Turbo, transformer/config.json, as diffusers 0.42.1 gives it: ZImageTransformer2DModel's
# constructor defaults (written out here) are the published model's (the file itself could not be read
# offline): 30 single-stream layers of width 3840 (30 heads x 128) after a noise and a context refiner of 2
# layers each, Qwen3-4B caption width 2560, 16 latent channels in 2 x 2 patches.
ZIMAGE_TURBO_TRANSFORMER = {
    "_class_name": "ZImageTransformer2DModel",
    "all_f_patch_size": [1],
    "all_patch_size": [2],
    "axes_dims": [32, 48, 48],
    "axes_lens": [1024, 512, 512],
    "cap_feat_dim": 2560,
    "dim": 3840,
    "in_channels": 16,
    "n_heads": 30,
    "n_kv_heads": 30,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "rope_theta": 256.0,
    "siglip_feat_dim": None,
    "t_scale": 1000.0,
}

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json
# (https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B-Diffusers/blob/main/transformer/config.json); read through
# diffusers' scripts/convert_wan_to_diffusers.py, get_transformer_config("Wan-T2V-1.3B")["diffusers_config"],
# the config that script writes (github:huggingface/diffusers at 58eb52c0). The keys it leaves out take
# WanTransformer3DModel's defaults, written here: image_dim None (text to video), rope_max_seq_len 1024.
WAN21_T2V_1_3B_TRANSFORMER = {
    "_class_name": "WanTransformer3DModel",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}

# hunyuanvideo-community/HunyuanVideo, transformer/config.json
# (https://huggingface.co/hunyuanvideo-community/HunyuanVideo/blob/main/transformer/config.json); read through
# diffusers' scripts/convert_hunyuan_video_to_diffusers.py, TRANSFORMER_CONFIGS["HYVideo-T/2-cfgdistill"], the
# config that script writes for the text-to-video checkpoint (github:huggingface/diffusers at 58eb52c0):
# 20 double- and 40 single-stream blocks of width 24 x 128, a 2-layer token refiner, guidance embedded.
HUNYUANVIDEO_TRANSFORMER = {
    "_class_name": "HunyuanVideoTransformer3DModel",
    "attention_head_dim": 128,
    "guidance_embeds": True,
    "image_condition_type": None,
    "in_channels": 16,
    "mlp_ratio": 4.0,
    "num_attention_heads": 24,
    "num_layers": 20,
    "num_refiner_layers": 2,
    "num_single_layers": 40,
    "out_channels": 16,
    "patch_size": 2,
    "patch_size_t": 1,
    "pooled_projection_dim": 768,
    "qk_norm": "rms_norm",
    "rope_axes_dim": [16, 56, 56],
    "rope_theta": 256.0,
    "text_embed_dim": 4096,
}

# T-GATE defaults of the published results (tgate-reference.md, "Defaults used in the published results").
_SD_TGATE = TGateConfig(gate_step=10, sp_interval=5, fi_interval=1, warm_up=2)
_PIXART_TGATE = TGateConfig(gate_step=15, sp_interval=3, fi_interval=1, warm_up=2)
# LCM-PixArt is listed with gate_step "1 or 2"; 1 is the setting its published MACs (8.563T -> 7.623T) match.
_LCM_TGATE = TGateConfig(gate_step=1, sp_interval=1, fi_interval=1, warm_up=0, lcm=True)


@dataclass(frozen=True)
class Arch:
    """A denoiser architecture and the call its pipeline makes, for meta-device captures.

    Attributes:
        name: Registry name, e.g. ``"sdxl"``.
        family: ``"sd"`` (SD 1.x/2.x UNet), ``"sdxl"`` (UNet with text-time
            conditioning), ``"pixart"`` (PixArt transformer), ``"dit"`` (class-conditional
            DiT transformer, no text), ``"flux"`` (FLUX.1: 2 x 2-packed latent tokens, T5 and
            pooled CLIP embeddings, positions as ids), ``"flux2"`` (FLUX.2: 2 x 2-patchified latent
            tokens, Mistral 3 embeddings, positions as 4-axis ids per sample), ``"zimage"`` (Z-Image:
            per-sample lists, here in the engine's batched form), ``"wan"`` (Wan 2.1 video) or
            ``"hunyuanvideo"`` (HunyuanVideo: Llama tokens with their mask, pooled CLIP); decides the call.
        model_class: The diffusers class, e.g. ``"UNet2DConditionModel"`` or ``"FluxTransformer2DModel"``.
        config: The denoiser's ``config.json`` (excluded from hashing and equality).
        source: Where the config comes from.
        height, width: Image size in pixels.
        frames: Video frames in pixels (``"wan"``, ``"hunyuanvideo"``: ``4 k + 1``, the VAE keeps the first
            frame and compresses the others 4 to 1); 1 for images.
        text_tokens: Length of the text-encoder sequence the denoiser attends to.
        num_steps: Denoising steps of the published setting.
        tgate: T-GATE settings of the published setting; ``None`` where none is published (the
            method is then off unless asked for).
        cfg: Whether the pipeline runs classifier-free guidance (a 2B batch before the gate).
        vae_scale: Pixels per latent pixel.
    """

    name: str
    family: str
    model_class: str
    config: dict = field(compare=False, hash=False, repr=False)
    source: str = ""
    height: int = 1024
    width: int = 1024
    text_tokens: int = 77
    num_steps: int = 25
    tgate: TGateConfig | None = _SD_TGATE
    cfg: bool = True
    vae_scale: int = _VAE_SCALE
    frames: int = 1

    def __post_init__(self) -> None:
        if self.family not in _FAMILIES:
            raise ValueError(f"family must be one of {', '.join(map(repr, _FAMILIES))}, got {self.family!r}")
        for name in ("height", "width", "frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        multiple = self.vae_scale * self.latent_patch
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % multiple:
                what = "the VAE scale" if self.latent_patch == 1 else \
                    f"the VAE scale {self.vae_scale} times the {self.latent_patch} x {self.latent_patch} patch"
                raise ValueError(f"{name}={value} is not a multiple of {multiple} ({what})")
        if self.family in _VIDEO:
            if (self.frames - 1) % _VAE_TEMPORAL:
                raise ValueError(f"frames={self.frames} is not 4 k + 1 (the video VAE keeps the first frame and "
                                 f"compresses the others {_VAE_TEMPORAL} to 1), e.g. 81 or 129")
        elif self.frames != 1:
            raise ValueError(f"frames={self.frames} given for the image architecture {self.name!r}; only "
                             f"{', '.join(_VIDEO)} take frames")

    def with_size(self, height: int | None = None, width: int | None = None, frames: int | None = None) -> "Arch":
        """The same architecture at another image size (and, for video, another number of frames)."""
        return replace(self, height=height or self.height, width=width or self.width, frames=frames or self.frames)

    @property
    def latent_patch(self) -> int:
        """Latent pixels per token side: FLUX's pipeline packs 2 x 2 latents into a token; Wan and HunyuanVideo
        patch them by their config's (spatial) patch size (2 in the published configs); 1 elsewhere."""
        if self.family in ("flux", "flux2"):
            return 2
        if self.family == "zimage":
            return int(self.config["all_patch_size"][0])
        if self.family == "wan":
            return int(self.config["patch_size"][-1])
        if self.family == "hunyuanvideo":
            return int(self.config["patch_size"])
        return 1

    @property
    def latent_frames(self) -> int:
        """Frames of the latent video (1 for images)."""
        return (self.frames - 1) // _VAE_TEMPORAL + 1 if self.family in _VIDEO else 1

    @property
    def image_tokens(self) -> int:
        """Image (or video) tokens of the transformer families (latent frames x the latent grid in patches)."""
        side = self.vae_scale * self.latent_patch
        temporal = {"wan": lambda: int(self.config["patch_size"][0]),
                    "hunyuanvideo": lambda: int(self.config["patch_size_t"])}.get(self.family, lambda: 1)()
        return -(-self.latent_frames // temporal) * (self.height // side) * (self.width // side)

    @property
    def text_dim(self) -> int:
        """Width of the text embeddings the pipeline feeds the denoiser."""
        key = {"pixart": "caption_channels", "flux": "joint_attention_dim", "flux2": "joint_attention_dim",
               "zimage": "cap_feat_dim", "wan": "text_dim",
               "hunyuanvideo": "text_embed_dim"}.get(self.family, "cross_attention_dim")
        return int(self.config[key])

    def build_denoiser(self, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
        """The denoiser, built from :attr:`config` on ``device`` (no weights on ``meta``)."""
        import diffusers
        from diffusers.utils import logging as diffusers_logging

        cls = getattr(diffusers, self.model_class)
        # Published configs carry keys of older class versions; from_config ignores them, noisily.
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            with torch.device(device):
                model = cls.from_config(self.config)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        if dtype != torch.float32:
            model = model.to(dtype=dtype)
        return model.eval()

    def make_call(self, batch_size: int, device: str | torch.device = "meta",
                  dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """The normalized denoiser call of one denoising step at ``batch_size``, as the pipeline makes it.

        Tensors are empty (uninitialised) on ``device``; only their shapes and
        dtypes matter for a capture.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        b, c = batch_size, self.config.get("in_channels", 4)
        h, w = self.height // self.vae_scale, self.width // self.vae_scale

        def t(*shape, dt=dtype):
            return torch.empty(*shape, device=device, dtype=dt)

        if self.family == "flux":
            return self._flux_call(b, t)
        if self.family == "flux2":
            return self._flux2_call(b, t)
        if self.family == "zimage":
            # ZImagePipeline: one (C, 1, h, w) latent and one caption of hidden states per sample (lists, here
            # stacked as the engine reads them: tgate_fx.core.conventions), the timestep expanded over the batch.
            return {"hidden_states": t(b, c, 1, h, w), "timestep": t(b),
                    "encoder_hidden_states": t(b, self.text_tokens, self.text_dim)}
        if self.family in _VIDEO:
            return self._video_call(b, t)
        if self.family == "dit":
            # DiTPipeline expands the step's timestep over the batch and passes class labels, no text.
            return {"hidden_states": t(b, c, h, w), "timestep": t(b, dt=torch.int64),
                    "class_labels": t(b, dt=torch.int64)}
        text = t(b, self.text_tokens, self.text_dim)
        if self.family == "pixart":
            # PixArt pipelines expand the step's timestep over the batch and pass the text mask.
            call = {"hidden_states": t(b, c, h, w), "encoder_hidden_states": text,
                    "timestep": t(b, dt=torch.int64),
                    "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
                    "encoder_attention_mask": t(b, self.text_tokens, dt=torch.int64)}
            if _pixart_size_conditions(self.config):
                call["added_cond_kwargs"] = {"resolution": t(b, 2), "aspect_ratio": t(b, 1)}
            return call
        # UNet pipelines pass the scheduler's 0-d timestep.
        call = {"sample": t(b, c, h, w), "timestep": t((), dt=torch.int64), "encoder_hidden_states": text}
        if self.config.get("time_cond_proj_dim"):
            call["timestep_cond"] = t(b, int(self.config["time_cond_proj_dim"]))
        if self.family == "sdxl":
            time_ids = 6  # (original size, crop top-left, target size), two numbers each
            pooled = int(self.config["projection_class_embeddings_input_dim"]) - time_ids * int(
                self.config["addition_time_embed_dim"])
            call["added_cond_kwargs"] = {"text_embeds": t(b, pooled), "time_ids": t(b, time_ids)}
        return call

    def _flux_call(self, b: int, t: Callable) -> dict[str, Any]:
        # FluxPipeline: latents packed 2 x 2 into (B, tokens, 4 C); the step's timestep / 1000 and the
        # guidance scale expanded over the batch (guidance only for a guidance-distilled model); positions as
        # (tokens, 3) ids, shared by the batch; text from T5 (max_sequence_length) and a pooled CLIP vector.
        call = {"hidden_states": t(b, self.image_tokens, int(self.config["in_channels"])),
                "encoder_hidden_states": t(b, self.text_tokens, self.text_dim),
                "pooled_projections": t(b, int(self.config["pooled_projection_dim"])),
                "timestep": t(b), "img_ids": t(self.image_tokens, 3), "txt_ids": t(self.text_tokens, 3),
                "guidance": t(b) if self.config.get("guidance_embeds") else None,
                "joint_attention_kwargs": None}
        return call

    def _flux2_call(self, b: int, t: Callable) -> dict[str, Any]:
        # Flux2Pipeline: latents 2 x 2-patchified and packed into (B, tokens, 4 C); the step's timestep / 1000
        # and the embedded guidance scale expanded over the batch; positions as (B, tokens, 4) integer ids
        # (t, h, w, l) for the image and the text; text from Mistral 3 (max_sequence_length).
        return {"hidden_states": t(b, self.image_tokens, int(self.config["in_channels"])),
                "encoder_hidden_states": t(b, self.text_tokens, self.text_dim), "timestep": t(b),
                "img_ids": t(b, self.image_tokens, 4, dt=torch.int64),
                "txt_ids": t(b, self.text_tokens, 4, dt=torch.int64),
                "guidance": t(b) if self.config.get("guidance_embeds") else None, "joint_attention_kwargs": None}

    def _video_call(self, b: int, t: Callable) -> dict[str, Any]:
        # WanPipeline and HunyuanVideoPipeline: latents (B, C, latent frames, h, w) and the step's timestep
        # expanded over the batch. Wan passes the UMT5 tokens (padded to max_sequence_length, no mask);
        # HunyuanVideo the Llama tokens with their mask (in the model's dtype), a pooled CLIP vector and the
        # embedded guidance scale (guidance-distilled: one call a step, no CFG).
        h, w = self.height // self.vae_scale, self.width // self.vae_scale
        call = {"hidden_states": t(b, int(self.config["in_channels"]), self.latent_frames, h, w), "timestep": t(b),
                "encoder_hidden_states": t(b, self.text_tokens, self.text_dim)}
        if self.family == "wan":
            return {**call, "attention_kwargs": None}
        return {**call, "encoder_attention_mask": t(b, self.text_tokens),
                "pooled_projections": t(b, int(self.config["pooled_projection_dim"])),
                "guidance": t(b) if self.config.get("guidance_embeds") else None, "attention_kwargs": None}

    def capture(self, batch_size: int) -> CapturedGraphs:
        """Export the meta-device denoiser at ``batch_size`` and find its attention sites."""
        denoiser = self.build_denoiser()
        capture = capture_denoiser(denoiser, self.make_call(batch_size))
        return CapturedGraphs.from_capture(capture)

    def describe(self) -> str:
        """One line: name, class, size, text length, CFG."""
        text = "class labels" if self.family == "dit" else f"{self.text_tokens} text tokens"
        size = f"{self.height}x{self.width}"
        if self.family in _VIDEO:
            size += f", {self.frames} frames ({self.latent_frames} latent)"
        if self.family in _TOKENS:
            size += f", {self.image_tokens} image tokens"
        return f"{self.name}: {self.model_class}, {size}, {text}, CFG {'on' if self.cfg else 'off'}"


def _pixart_size_conditions(config: dict) -> bool:
    # PixArtTransformer2DModel's own rule: explicit setting, else on for the 1024px (sample_size 128) models.
    explicit = config.get("use_additional_conditions")
    return bool(explicit) if explicit is not None else config.get("sample_size") == 128


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("sd15", "sd", "UNet2DConditionModel", SD15_UNET, "runwayml/stable-diffusion-v1-5 unet/config.json",
             height=512, width=512),
        Arch("sd21", "sd", "UNet2DConditionModel", SD21_UNET, "stabilityai/stable-diffusion-2-1 unet/config.json",
             height=768, width=768),
        Arch("sdxl", "sdxl", "UNet2DConditionModel", SDXL_UNET,
             "stabilityai/stable-diffusion-xl-base-1.0 unet/config.json"),
        Arch("pixart_alpha", "pixart", "PixArtTransformer2DModel", PIXART_ALPHA_TRANSFORMER,
             "PixArt-alpha/PixArt-XL-2-1024-MS transformer/config.json", text_tokens=120, tgate=_PIXART_TGATE),
        Arch("pixart_sigma", "pixart", "PixArtTransformer2DModel", PIXART_SIGMA_TRANSFORMER,
             "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json", text_tokens=300,
             tgate=_PIXART_TGATE),
        Arch("lcm_sdxl", "sdxl", "UNet2DConditionModel", LCM_SDXL_UNET, "latent-consistency/lcm-sdxl config.json",
             num_steps=4, tgate=_LCM_TGATE, cfg=False),
        Arch("lcm_pixart", "pixart", "PixArtTransformer2DModel", PIXART_ALPHA_TRANSFORMER,
             "PixArt-alpha/PixArt-LCM-XL-2-1024-MS transformer/config.json", text_tokens=120, num_steps=4,
             tgate=_LCM_TGATE, cfg=False),
        # ToCa's DiT setting: DDIM 50 steps with CFG (T-GATE does not apply: DiT has no cross-attention).
        Arch("dit_xl_2", "dit", "DiTTransformer2DModel", DIT_XL_2_256_TRANSFORMER,
             "facebook/DiT-XL-2-256 transformer/config.json", height=256, width=256, text_tokens=0, num_steps=50),
        # The pipelines' defaults (diffusers 0.42: FluxPipeline, WanPipeline, HunyuanVideoPipeline): FLUX.1-dev
        # 28 steps, 512 T5 tokens, guidance distilled (no CFG); Wan 2.1 480p (832 x 480, 81 frames), 50 steps,
        # 512 UMT5 tokens, CFG (guidance 5.0, two denoiser calls a step: counted as the CFG batch, the same
        # MACs); HunyuanVideo 720p (1280 x 720, 129 frames), 50 steps, 256 Llama tokens, guidance embedded (no
        # CFG). None of them has a published T-GATE setting.
        Arch("flux_dev", "flux", "FluxTransformer2DModel", FLUX1_DEV_TRANSFORMER,
             "black-forest-labs/FLUX.1-dev transformer/config.json", text_tokens=512, num_steps=28, tgate=None,
             cfg=False),
        # Flux2Pipeline's defaults: 50 steps, 512 Mistral 3 tokens, guidance embedded (no CFG).
        Arch("flux2_dev", "flux2", "Flux2Transformer2DModel", FLUX2_DEV_TRANSFORMER,
             "black-forest-labs/FLUX.2-dev transformer/config.json", text_tokens=512, num_steps=50, tgate=None,
             cfg=False),
        # Z-Image-Turbo as its model card and ZImagePipeline's docstring run it: 1024 x 1024, 8 steps, no guidance.
        # A caption is its prompt's Qwen3 tokens (the padding dropped): 128 here (chosen; a multiple of 32, the
        # transformer's caption padding).
        Arch("zimage_turbo", "zimage", "ZImageTransformer2DModel", ZIMAGE_TURBO_TRANSFORMER,
             "Tongyi-MAI/Z-Image-Turbo transformer/config.json", text_tokens=128, num_steps=8, tgate=None,
             cfg=False),
        Arch("wan21_t2v_1_3b", "wan", "WanTransformer3DModel", WAN21_T2V_1_3B_TRANSFORMER,
             "Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json", height=480, width=832, frames=81,
             text_tokens=512, num_steps=50, tgate=None),
        Arch("hunyuanvideo", "hunyuanvideo", "HunyuanVideoTransformer3DModel", HUNYUANVIDEO_TRANSFORMER,
             "hunyuanvideo-community/HunyuanVideo transformer/config.json", height=720, width=1280, frames=129,
             text_tokens=256, num_steps=50, tgate=None, cfg=False),
    ]
}


def get_arch(name: str) -> Arch:
    """The registered architecture ``name`` (one of :data:`ARCHS`)."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


def arch_from_pipeline(pipe: Any, *, height: int | None = None, width: int | None = None,
                       text_tokens: int | None = None) -> Arch:
    """The :class:`Arch` of a diffusers pipeline's denoiser, from its config (weights are not used).

    Sizes default to what the pipeline itself would use: the denoiser's
    ``sample_size`` times the VAE scale, the tokenizer's maximum length for
    UNets, and 120 (PixArt-alpha) or 300 (PixArt-Sigma) text tokens.
    The T-GATE defaults follow the family; LCM pipelines (an ``LCMScheduler``
    or a UNet with a guidance embedding) run without CFG.

    Raises:
        TypeError: if the denoiser is neither a ``UNet2DConditionModel`` nor a
            ``PixArtTransformer2DModel``.
    """
    from .core.runtime import find_denoiser

    found = find_denoiser(pipe)
    denoiser = found[1] if found else None
    model_class = type(denoiser).__name__
    if model_class not in ("UNet2DConditionModel", "PixArtTransformer2DModel"):
        raise TypeError(f"{type(pipe).__name__} has denoiser {model_class}; supported: UNet2DConditionModel, "
                        "PixArtTransformer2DModel")
    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    vae_scale = int(getattr(pipe, "vae_scale_factor", _VAE_SCALE))
    sample = config.get("sample_size") or 64
    lcm = type(getattr(pipe, "scheduler", None)).__name__ == "LCMScheduler" or bool(config.get("time_cond_proj_dim"))
    if model_class == "PixArtTransformer2DModel":
        family = "pixart"
        tokens = 300 if "Sigma" in type(pipe).__name__ else 120
        tgate = _PIXART_TGATE
    else:
        embed = config.get("addition_embed_type")
        if embed not in (None, "text_time"):
            raise TypeError(f"UNet addition_embed_type={embed!r} is not supported; supported: None, 'text_time'")
        family = "sdxl" if embed == "text_time" else "sd"
        tokenizer = getattr(pipe, "tokenizer", None)
        tokens = int(getattr(tokenizer, "model_max_length", 77) or 77)
        tgate = _SD_TGATE
    return Arch(
        name=type(pipe).__name__, family=family, model_class=model_class, config=config,
        source=str(getattr(pipe, "name_or_path", "") or "pipeline"),
        height=height or sample * vae_scale, width=width or sample * vae_scale,
        text_tokens=text_tokens or tokens, num_steps=4 if lcm else 25, tgate=_LCM_TGATE if lcm else tgate,
        cfg=not lcm, vae_scale=vae_scale,
    )


class ArchGraphs:
    """The captures of one architecture, one per batch size, made on first use from one export (see
    :mod:`tgate_fx.core.rebatch`).

    Calling it with a batch size returns a
    :class:`~tgate_fx.core.variants.CapturedGraphs` (capture, attention sites, and
    the graph variants built from it so far), which is what
    :func:`tgate_fx.macs.plan_macs` and :mod:`tgate_fx.inspection` read.

    Args:
        arch: The architecture.
        progress: Called with a line of text before and after each export
            (they take seconds); the default writes to stderr.
    """

    def __init__(self, arch: Arch, progress: Callable[[str], None] | None = None):
        self.arch = arch
        self.progress = progress if progress is not None else _stderr
        self._by_batch: dict[int, CapturedGraphs] = {}
        self._captures: BatchCaptures | None = None

    def __call__(self, batch_size: int) -> CapturedGraphs:
        if batch_size not in self._by_batch:
            self.progress(f"capturing {self.arch.name} at batch {batch_size} on the meta device ...")
            start = time.perf_counter()
            if self._captures is None:  # one denoiser, one export for every batch size (see core.rebatch)
                denoiser = self.arch.build_denoiser()
                self._captures = BatchCaptures(denoiser, next(iter(inspect.signature(denoiser.forward).parameters)))
            capture = self._captures(self.arch.make_call(batch_size))
            self._by_batch[batch_size] = graphs = CapturedGraphs.from_capture(capture)
            regions = graphs.regions  # .sites refuses a graph with unreadable sites (HunyuanVideo's joint attention)
            unread = f" (and {len(regions.unreadable)} attention modules of another structure)" \
                if regions.unreadable else ""
            self.progress(f"  {len(graphs.capture.graph_module.graph.nodes)} nodes, {len(regions.sites)} attention "
                          f"sites{unread}, {time.perf_counter() - start:.1f}s")
        return self._by_batch[batch_size]

    @property
    def batches(self) -> list[int]:
        """Batch sizes captured so far."""
        return sorted(self._by_batch)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
