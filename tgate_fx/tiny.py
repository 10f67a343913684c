"""Tiny diffusers pipelines built in code, with seeded random weights.

Every supported family is here at toy size so that tests, the demo and the
benchmarks run on a CPU without downloading anything. The model classes,
schedulers and pipelines are the real diffusers/transformers ones; only the
configs are small. Tokenizers are made from a generated word list.

Example::

    from tgate_fx.tiny import tiny_pipeline
    pipe = tiny_pipeline("sdxl")
    out = pipe("a red circle", **pipe.tiny_call_kwargs, num_inference_steps=5)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["FAMILIES", "make_tokenizer", "tiny_pipeline"]

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey", "pink"]
_SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "heart", "diamond"]
_WORDS = (
    ["a", "an", "the", "of", "on", "in", "with", "and", "photo", "painting", "picture", "cat", "dog",
     "astronaut", "horse", "riding", "top", "bottom", "left", "right", "centre", "background", "small",
     "large", "bright", "dark", "sky", "sea", "city", "forest", "mountain", "at", "night", "day"]
    + _COLOURS
    + _SHAPES
)


def make_tokenizer(max_length: int, words: list[str] | None = None, *, style: str = "clip"):
    """A word-level fast tokenizer over a small generated vocabulary.

    ``style="clip"`` wraps each text in ``<|startoftext|> ... <|endoftext|>`` and
    pads with ``<|endoftext|>``, as CLIP does; ``style="t5"`` appends ``</s>`` and
    pads with ``<pad>``, as T5 does. Unknown words map to the unknown token.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if style == "clip":
        specials = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
    elif style == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
    else:
        raise ValueError(f"style must be 'clip' or 't5', got {style!r}")
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words or _WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "clip":
        bos, eos = "<|startoftext|>", "<|endoftext|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos, unk_token="<unk>",
            model_max_length=max_length,
        )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=max_length
    )


def _clip_text_encoder(tokenizer, hidden: int, *, projection: bool = False, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _vae(seed: int, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=4, layers_per_block=1,
        sample_size=32,
    ).eval()


def _sd_unet(seed: int, *, cross_dim: int = 32, linear_projection: bool = False, channels=(32, 64), **extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=8,
        use_linear_projection=linear_projection, **extra,
    ).eval()


# Random weights predict noise that has nothing to do with the sample, so the
# predicted x0 = (x - sigma * eps) / alpha grows into the hundreds at high
# noise levels; trained models keep it near the data. Dynamic thresholding
# keeps the tiny pipelines' latents in a realistic range (|x| of a few units),
# so that absolute tolerances in tests mean what they would on real models.
_THRESHOLDING = {"thresholding": True, "sample_max_value": 4.0}


def _sd_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
        steps_offset=1, **_THRESHOLDING,
    )


def _build_sd(seed: int, *, version: str = "1.5", channels=(32, 64)):
    from diffusers import StableDiffusionPipeline

    tok = make_tokenizer(16)
    v2 = version == "2.1"
    unet = _sd_unet(seed, linear_projection=v2, upcast_attention=v2, channels=channels)
    return StableDiffusionPipeline(
        vae=_vae(seed + 1), text_encoder=_clip_text_encoder(tok, 32, seed=seed + 2), tokenizer=tok, unet=unet,
        scheduler=_sd_scheduler("v_prediction" if v2 else "epsilon"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def _build_sd_img2img(seed: int):
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(**_build_sd(seed).components)


def _build_sd_controlnet(seed: int):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = _build_sd(seed)
    torch.manual_seed(seed + 3)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16)).eval()
    # ControlNet starts with zero convolutions; give them weights so that the
    # control branch actually changes the UNet's output in tests.
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if "zero_conv" in name or "controlnet_" in name:
                p.normal_(0.0, 0.05)
    return StableDiffusionControlNetPipeline(controlnet=controlnet, **base.components)


def _build_sdxl(seed: int, *, lcm: bool = False):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = make_tokenizer(16)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8, time_cond_proj_dim=16 if lcm else None,
    ).eval()
    scheduler = (
        LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                     **_THRESHOLDING)
        if lcm
        else _sd_scheduler()
    )
    return StableDiffusionXLPipeline(
        vae=_vae(seed + 1), text_encoder=_clip_text_encoder(tok, 32, seed=seed + 2),
        text_encoder_2=_clip_text_encoder(tok, 32, projection=True, seed=seed + 3), tokenizer=tok,
        tokenizer_2=tok, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=False,
    )


def _build_pixart(seed: int, *, sigma: bool = False, lcm: bool = False):
    from diffusers import (
        DPMSolverMultistepScheduler,
        LCMScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    tok = make_tokenizer(16, style="t5")
    torch.manual_seed(seed + 2)
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=0)
    ).eval()
    torch.manual_seed(seed)
    # inner dim 48: PixArt-alpha splits a third of it per size condition.
    # sample_size=128 is what makes the alpha pipeline pass resolution and
    # aspect-ratio conditions; the tests render far smaller images.
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=48, caption_channels=32, sample_size=8 if sigma else 128, patch_size=2,
        use_additional_conditions=not sigma, interpolation_scale=2 if sigma else None,
    ).eval()
    if lcm:
        scheduler = LCMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", **_THRESHOLDING)
    else:
        scheduler = DPMSolverMultistepScheduler(**_THRESHOLDING)
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    return cls(tokenizer=tok, text_encoder=text_encoder, vae=_vae(seed + 1), transformer=transformer,
               scheduler=scheduler)


def _build_dit(seed: int):
    """A class-conditioned DiT (DiTTransformer2DModel, adaLN-zero blocks, learned sigma) in diffusers' DiTPipeline."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2, sample_size=16,
        patch_size=2, num_embeds_ada_norm=1000,  # DiTPipeline's null class is 1000
    ).eval()
    scheduler = DDIMScheduler(beta_schedule="linear", **_THRESHOLDING)
    return DiTPipeline(transformer=transformer, vae=_vae(seed + 1), scheduler=scheduler)


@dataclass(frozen=True)
class Family:
    """A tiny pipeline family: how to build it and how to call it."""

    build: Callable[[int], Any]
    call_kwargs: dict = field(default_factory=dict)
    cfg: bool = True  # whether its default call runs classifier-free guidance
    denoiser: str = "unet"


_SD_CALL = {"height": 32, "width": 32, "guidance_scale": 7.5}
_PIXART_CALL = {"height": 32, "width": 32, "guidance_scale": 4.5, "use_resolution_binning": False,
                "clean_caption": False, "max_sequence_length": 16}

FAMILIES: dict[str, Family] = {
    "sd15": Family(_build_sd, dict(_SD_CALL)),
    "sd21": Family(lambda s: _build_sd(s, version="2.1"), dict(_SD_CALL)),
    # four times the weights of sd15 for the same graph: where sizes are about weights, not structure
    "sd15_wide": Family(lambda s: _build_sd(s, channels=(64, 128)), dict(_SD_CALL)),
    "sdxl": Family(_build_sdxl, {"height": 32, "width": 32, "guidance_scale": 5.0}),
    "lcm_sdxl": Family(lambda s: _build_sdxl(s, lcm=True), {"height": 32, "width": 32, "guidance_scale": 8.0},
                       cfg=False),
    "pixart_alpha": Family(_build_pixart, dict(_PIXART_CALL), denoiser="transformer"),
    "pixart_sigma": Family(lambda s: _build_pixart(s, sigma=True), dict(_PIXART_CALL), denoiser="transformer"),
    "lcm_pixart": Family(lambda s: _build_pixart(s, lcm=True), {**_PIXART_CALL, "guidance_scale": 0.0},
                         cfg=False, denoiser="transformer"),
    # class-conditioned: call it with class_labels=[...] (no prompt); its latent is 16x16 (8x8 tokens)
    "dit": Family(_build_dit, {"guidance_scale": 4.0}, denoiser="transformer"),
    "sd15_img2img": Family(_build_sd_img2img, {"guidance_scale": 7.5, "strength": 0.6}),
    "sd15_controlnet": Family(_build_sd_controlnet, dict(_SD_CALL)),
}


def _calibrate_output_scale(pipe, denoiser_name: str, call_kwargs: dict) -> None:
    """Scale the denoiser's last layer so that its prediction has unit std.

    Random weights give noise predictions in the hundreds, which no trained
    model does; unit-scale outputs keep the sampled latents in a realistic range.
    """
    denoiser = getattr(pipe, denoiser_name)
    final = next(getattr(denoiser, n) for n in ("conv_out", "proj_out", "proj_out_2") if hasattr(denoiser, n))
    class_conditioned = type(denoiser).__name__ == "DiTTransformer2DModel"
    seen = []
    handle = denoiser.register_forward_hook(lambda m, a, out: seen.append(out[0].float().std()))
    try:
        pipe([1] if class_conditioned else "a photo", num_inference_steps=2,
             output_type="pt" if class_conditioned else "latent", generator=torch.Generator().manual_seed(0),
             **call_kwargs)
    finally:
        handle.remove()
    with torch.no_grad():
        final.weight.div_(seen[0])
        if final.bias is not None:
            final.bias.div_(seen[0])


def tiny_pipeline(name: str = "sd15", *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build the tiny pipeline ``name`` (one of :data:`FAMILIES`) with seeded weights.

    The returned pipeline carries ``tiny_call_kwargs``: the resolution and
    guidance its family is meant to be called with (plus the input image for
    img2img and ControlNet).
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown tiny pipeline {name!r}; choose one of {sorted(FAMILIES)}")
    family = FAMILIES[name]
    pipe = family.build(seed)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(family.call_kwargs)
    if name in ("sd15_img2img", "sd15_controlnet"):
        g = torch.Generator().manual_seed(seed + 7)
        kwargs["image"] = torch.rand(1, 3, 32, 32, generator=g)
    _calibrate_output_scale(pipe, family.denoiser, kwargs)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.tiny_call_kwargs = kwargs
    return pipe


def save_tiny_pipeline(name: str, path: str | None = None, *, seed: int = 0) -> str:
    """Write a tiny pipeline in diffusers format, for ``from_pretrained`` round trips."""
    path = path or tempfile.mkdtemp(prefix=f"tgate_fx_{name}_")
    tiny_pipeline(name, seed=seed).save_pretrained(path)
    return path
