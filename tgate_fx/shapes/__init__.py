"""A small text-to-image model trained on generated pictures of shapes, shipped with the package.

* :mod:`tgate_fx.shapes.data`: the deterministic generator of captioned
  pictures, with a held-out split of attribute combinations;
* :mod:`tgate_fx.shapes.model`: the pipeline's components (a tiny Stable
  Diffusion 1.x: CLIP text encoder, UNet with cross-attention, VAE);
* :mod:`tgate_fx.shapes.dit`: the components of the DiT pipeline (a tiny
  PixArt-alpha: T5 encoder, PixArtTransformer2DModel, the same VAE);
* :mod:`tgate_fx.shapes.flux`: the components of the FLUX pipeline (a tiny
  FLUX.1: CLIP and T5 encoders, FluxTransformer2DModel with double- and
  single-stream blocks, the same VAE, flow-matching Euler; used with true CFG);
* :mod:`tgate_fx.shapes.train`: the training script that made the shipped
  weights (``python -m tgate_fx.shapes.train --out DIR [--model dit|flux]``);
* :mod:`tgate_fx.shapes.evaluate`: baseline accuracy of a pipeline on seen and
  held-out captions, and its attention change per step
  (``python -m tgate_fx.shapes.evaluate [--dit|--flux]``);
* :mod:`tgate_fx.shapes.evaluator`: a classifier that reads the attributes
  back from a picture, for text-alignment accuracy and a Fréchet distance.

The shipped FLUX testbed (:func:`load_flux_pipeline`) was trained by
``python -m tgate_fx.shapes.train --model flux --out DIR --steps 10000 --lr 6e-4
--checkpoint-every 2500 --threads 1 --vae-from tgate_fx/assets/shapes_dit/pipeline/vae
--decoder-steps 0`` (46 min on one thread); at 20 Euler steps and true CFG 4.0
the evaluator reads every attribute right on all 315 seen-caption and 180
held-out-caption pictures (``python -m tgate_fx.shapes.evaluate --flux``;
docs/quality.md has every testbed's figures).

The shipped pipelines draw 32x32 pictures of captions such as
``"a red circle in the top left on a blue background"`` (see
:func:`tgate_fx.shapes.data.combinations` for every valid caption).

Example::

    import torch
    from tgate_fx.shapes import load_pipeline
    pipe = load_pipeline()
    image = pipe("a yellow triangle in the centre on a black background", num_inference_steps=25,
                 guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images[0]

    from tgate_fx.shapes import load_dit_pipeline
    dit = load_dit_pipeline()  # a PixArtAlphaPipeline
    image = dit("a yellow triangle in the centre on a black background", num_inference_steps=20,
                guidance_scale=4.5, use_resolution_binning=False, clean_caption=False,
                generator=torch.Generator().manual_seed(0)).images[0]

    from tgate_fx.shapes import load_flux_pipeline
    flux = load_flux_pipeline()  # a FluxPipeline, true CFG against the empty caption
    image = flux("a yellow triangle in the centre on a black background", num_inference_steps=20,
                 true_cfg_scale=4.0, negative_prompt="", height=32, width=32, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0)).images[0]
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

__all__ = ["DIT_PIPELINE_PATH", "FLUX_PIPELINE_PATH", "PIPELINE_PATH", "load_dit_pipeline", "load_flux_pipeline",
           "load_pipeline"]

PIPELINE_PATH = Path(__file__).resolve().parent.parent / "assets" / "shapes" / "pipeline"
DIT_PIPELINE_PATH = Path(__file__).resolve().parent.parent / "assets" / "shapes_dit" / "pipeline"
FLUX_PIPELINE_PATH = Path(__file__).resolve().parent.parent / "assets" / "shapes_flux" / "pipeline"


def load_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  path: str | os.PathLike | None = None):
    """The shipped shapes pipeline (a diffusers ``StableDiffusionPipeline``), loaded offline.

    Args:
        device: Where to put the pipeline.
        dtype: Its parameters' dtype (``torch.float32`` or ``torch.bfloat16``/``torch.float16``).
        path: A pipeline directory written by :mod:`tgate_fx.shapes.train`;
            default: the one shipped in the package, :data:`PIPELINE_PATH`.

    The progress bar is off: a 32x32 picture takes a fraction of a second.
    """
    from diffusers import DiffusionPipeline

    path = Path(path) if path is not None else PIPELINE_PATH
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no pipeline at {path} (model_index.json missing); expected the shipped "
            f"{PIPELINE_PATH} or a directory written by `python -m tgate_fx.shapes.train --out DIR`"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    with warnings.catch_warnings():
        # Newer diffusers rename torch_dtype to dtype; older ones only know torch_dtype.
        warnings.simplefilter("ignore", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_dit_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      path: str | os.PathLike | None = None):
    """The shipped shapes DiT pipeline (a diffusers ``PixArtAlphaPipeline``), loaded offline.

    Same arguments as :func:`load_pipeline`; default path :data:`DIT_PIPELINE_PATH`.
    Its conventional call settings (20 steps, guidance 4.5, no caption
    cleaning, no resolution binning, 16 tokens) are
    :func:`tgate_fx.shapes.evaluate.call_kwargs`.
    """
    return load_pipeline(device, dtype, DIT_PIPELINE_PATH if path is None else path)


def load_flux_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       path: str | os.PathLike | None = None):
    """The shipped shapes FLUX pipeline (a diffusers ``FluxPipeline``), loaded offline.

    Same arguments as :func:`load_pipeline`; default path :data:`FLUX_PIPELINE_PATH`.
    Its conventional call settings (20 flow-matching Euler steps, true CFG
    4.0 against ``negative_prompt=""``, 32x32, 16 T5 tokens) are
    :func:`tgate_fx.shapes.evaluate.call_kwargs`.
    """
    return load_pipeline(device, dtype, FLUX_PIPELINE_PATH if path is None else path)
