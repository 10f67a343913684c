"""The one model loader of the CLI commands: the shipped shapes model, tiny pipelines, local directories."""

from __future__ import annotations

import os

__all__ = ["MODEL_HELP", "load_model"]

MODEL_HELP = ("'shapes' (the trained pipeline shipped with tgate_fx), 'tiny-sd' or tiny-<family> "
              "(random weights built in code, see tgate_fx.tiny), or a local diffusers pipeline directory")


def load_model(spec: str, dtype=None, device: str = "cpu"):
    """``(pipeline, call defaults)`` for ``spec``: ``shapes``, ``tiny-sd``, ``tiny-<family>`` or a directory.

    Raises:
        ValueError: naming what ``spec`` may be.
    """
    import torch

    dtype = dtype or torch.float32
    if spec == "shapes":
        from ..shapes import load_pipeline

        return load_pipeline(device, dtype), {"height": 32, "width": 32, "guidance_scale": 7.5}
    if spec.startswith("tiny-"):
        from ..tiny import FAMILIES, tiny_pipeline

        family = {"sd": "sd15"}.get(spec[len("tiny-"):], spec[len("tiny-"):])
        if family not in FAMILIES:
            raise ValueError(f"unknown tiny model {spec!r}; use tiny-sd or one of "
                             f"{', '.join('tiny-' + f for f in sorted(FAMILIES))}")
        pipe = tiny_pipeline(family, dtype=dtype)
        return pipe.to(device), dict(pipe.tiny_call_kwargs)
    if os.path.isdir(spec):
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(spec, torch_dtype=dtype).to(device), {}
    raise ValueError(f"--model {spec!r} is not 'shapes', tiny-sd / tiny-<family>, or a pipeline directory")
