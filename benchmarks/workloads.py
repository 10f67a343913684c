"""The benchmark workloads: SD-1.5 and PixArt-alpha architectures, scaled down, with random weights.

Each :class:`Workload` builds a real diffusers pipeline (the published
denoiser ``config.json`` from :mod:`tgate_fx.archs` with a few keys
overridden, a small text encoder and VAE, the published scheduler) and
knows how to call it. What is scaled against the published model is listed
in :attr:`Workload.scaled` and written into the results, with the MAC shares
of the attention sites in both, so that a reader can check that the
attention share stays realistic.

Example::

    from workloads import WORKLOADS
    pipe = WORKLOADS["sd15"].build()
    latents = WORKLOADS["sd15"].generate(pipe, seed=0)
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tgate_fx.archs import PIXART_ALPHA_TRANSFORMER, SD15_UNET, get_arch  # noqa: E402
from tgate_fx.methods import TGateConfig  # noqa: E402
from tgate_fx.tiny import make_tokenizer  # noqa: E402

__all__ = ["PROMPT", "STEPS", "WORKLOADS", "Workload"]

STEPS = 25
PROMPT = "a photo of an astronaut riding a horse on the sea"


@dataclass(frozen=True)
class Workload:
    """A scaled-down published architecture and how the benchmark calls it.

    Attributes:
        name: Key in :data:`WORKLOADS`.
        title: What the architecture is.
        published: The published architecture (for the MAC-share comparison).
        overrides: Keys of the published denoiser config replaced here.
        height, width: Image size of the benchmark.
        text_tokens: Text-encoder sequence length (as published).
        tgate: T-GATE settings of the published results.
        scaled: Human-readable list of what differs from the published model.
        call_kwargs: Extra pipeline arguments.
        reference_loader: Name of the loader in the reference ``tgate`` package.
    """

    name: str
    title: str
    published: str
    overrides: dict
    height: int
    width: int
    text_tokens: int
    tgate: TGateConfig
    scaled: str
    build_fn: Callable[["Workload"], Any] = field(repr=False, compare=False)
    call_kwargs: dict = field(default_factory=dict)
    reference_loader: str = ""

    @property
    def denoiser_attr(self) -> str:
        return "transformer" if get_arch(self.published).family == "pixart" else "unet"

    def build(self):
        """The pipeline, with seeded random weights and the progress bar off."""
        pipe = self.build_fn(self)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call(self, seed: int = 0) -> dict:
        """Keyword arguments of one benchmark generation (25 steps, latent output)."""
        return dict(prompt=PROMPT, num_inference_steps=STEPS, output_type="latent", height=self.height,
                    width=self.width, generator=torch.Generator().manual_seed(seed), **self.call_kwargs)

    def generate(self, pipe, seed: int = 0) -> torch.Tensor:
        return pipe(**self.call(seed)).images


def _vae(latent_channels: int = 4):
    """4 blocks like the SD VAE (downsampling 8), 8-32 channels instead of 128-512. Not timed (latent output)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(8, 16, 32, 32), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, layers_per_block=1,
    ).eval()


def _small_output(layer, std: float = 0.02) -> None:
    # Random weights give predictions in the hundreds; a small last layer keeps
    # the latents in a realistic range. It does not change the cost.
    with torch.no_grad():
        layer.weight.normal_(0.0, std)
        if layer.bias is not None:
            layer.bias.zero_()


def _build_sd15(w: Workload):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    hidden = w.overrides["cross_attention_dim"]
    tok = make_tokenizer(w.text_tokens)
    torch.manual_seed(2)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=w.text_tokens, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**SD15_UNET, **w.overrides}).eval()
    _small_output(unet.conv_out)
    # DPM-Solver++ multistep, SD-1.5's betas: the scheduler of the published T-GATE SD results.
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, algorithm_type="dpmsolver++")
    return StableDiffusionPipeline(vae=_vae(), text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _build_pixart(w: Workload):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    d_model = w.overrides["caption_channels"]
    tok = make_tokenizer(w.text_tokens, style="t5")
    torch.manual_seed(2)
    text = T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=d_model, d_ff=2 * d_model, d_kv=16, num_layers=2, num_heads=4,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=0)).eval()
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel.from_config({**PIXART_ALPHA_TRANSFORMER, **w.overrides}).eval()
    _small_output(transformer.proj_out)
    # PixArt-XL-2-1024-MS ships DPMSolverMultistepScheduler (its default settings).
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=text, vae=_vae(), transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())


def _sd15() -> Workload:
    # SD-1.5's config says attention_head_dim=8 but means 8 heads (head dims 40, 80, 160); 2 heads keep the
    # head dims realistic (48, 96, 192) at the narrower widths, and with them the SDPA core's softmax cost
    # per multiply-accumulate.
    overrides = {"block_out_channels": [96, 192, 384, 384], "cross_attention_dim": 128, "attention_head_dim": 2}
    size = 256
    return Workload(
        "sd15", "SD-1.5 UNet (runwayml/stable-diffusion-v1-5 unet/config.json)", "sd15", overrides, size, size, 77,
        get_arch("sd15").tgate,
        "block_out_channels (320, 640, 1280, 1280) -> (96, 192, 384, 384); attention heads 8 -> 2 (head dims "
        "40/80/160 -> 48/96/192); cross_attention_dim (CLIP width) 768 -> 128; image 512x512 -> 256x256 "
        "(latent 64x64 -> 32x32, so image tokens per channel 4096/320 = 12.8 -> 1024/96 = 10.7). Unchanged: "
        "4 down / 4 up blocks, 2 layers per block, cross-attention blocks at the same three levels plus the "
        "mid block (16 transformer blocks, 32 attention sites), 32 norm groups, 77 text tokens. "
        "Text encoder: CLIP with 2 layers of width 128 (real: 12 x 768); VAE: 4 blocks of 8-32 channels "
        "(not run: `output_type=\"latent\"`).",
        _build_sd15, {"guidance_scale": 7.5}, "TgateSDLoader",
    )


def _pixart() -> Workload:
    overrides = {"num_attention_heads": 3, "attention_head_dim": 72, "cross_attention_dim": 216,
                 "caption_channels": 64, "num_layers": 14}
    size = 448
    return Workload(
        "pixart", "PixArt-alpha transformer (PixArt-alpha/PixArt-XL-2-1024-MS transformer/config.json)",
        "pixart_alpha", overrides, size, size, 120, get_arch("pixart_alpha").tgate,
        "attention heads 16 -> 3 of the same head dim 72 (width 1152 -> 216); num_layers 28 -> 14; "
        "caption_channels (T5 width) 4096 -> 64; image 1024x1024 -> 448x448 (latent 128x128 -> 56x56, "
        "4096 -> 784 patch tokens, so image tokens per channel 3.6 as published). Unchanged: the block "
        "(adaLN-single, self-attention, cross-attention to the caption, GELU MLP x4), patch 2, sample_size 128 "
        "(so the resolution and aspect-ratio conditions run), 120 text tokens. Text encoder: T5 with 2 layers "
        "of width 64 (real: T5-XXL, 24 x 4096); VAE: 4 blocks of 8-32 channels "
        "(not run: `output_type=\"latent\"`).",
        _build_pixart,
        {"guidance_scale": 4.5, "use_resolution_binning": False, "clean_caption": False,
         "max_sequence_length": 120},
        "TgatePixArtAlphaLoader",
    )


WORKLOADS: dict[str, Workload] = {w.name: w for w in (_sd15(), _pixart())}
