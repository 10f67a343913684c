"""Public entry points: :func:`optimize`, :func:`restore`, :func:`get_runtime`."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch._dynamo.eval_frame import OptimizedModule

from .config import TGateConfig
from .runtime import DENOISER_ATTRIBUTES, TGateDenoiser

__all__ = ["DENOISER_ATTRIBUTES", "get_runtime", "optimize", "restore"]


def _unwrap(module: Any) -> Any:
    """The module inside a ``torch.compile`` wrapper (or the module itself)."""
    return getattr(module, "_orig_mod", module) if isinstance(module, OptimizedModule) else module


def _denoiser_attribute(pipe: Any) -> str:
    from diffusers import DiffusionPipeline
    from diffusers.models.attention_processor import Attention

    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"optimize() takes a diffusers DiffusionPipeline, got {type(pipe).__name__}")
    for name in DENOISER_ATTRIBUTES:
        module = _unwrap(getattr(pipe, name, None))
        if isinstance(module, TGateDenoiser):
            module = module.denoiser
        if isinstance(module, torch.nn.Module):
            text_conditioned = "encoder_hidden_states" in inspect.signature(module.forward).parameters
            if not text_conditioned or not any(isinstance(m, Attention) for m in module.modules()):
                raise TypeError(
                    f"{type(pipe).__name__}.{name} ({type(module).__name__}) is not a text-conditioned "
                    "denoiser with diffusers Attention modules for T-GATE to cache; supported denoisers "
                    "are UNet2DConditionModel and "
                    "transformers built from diffusers Attention blocks (e.g. PixArtTransformer2DModel)"
                )
            return name
    raise TypeError(
        f"{type(pipe).__name__} has no supported denoiser: expected a torch module at "
        f"pipe.{' or pipe.'.join(DENOISER_ATTRIBUTES)}"
    )


def get_runtime(pipe: Any) -> TGateDenoiser:
    """The :class:`TGateDenoiser` installed in ``pipe`` by :func:`optimize`.

    Raises:
        ValueError: if ``pipe`` is not optimized.
    """
    for name in DENOISER_ATTRIBUTES:
        module = _unwrap(getattr(pipe, name, None))
        if isinstance(module, TGateDenoiser):
            return module
    raise ValueError(f"{type(pipe).__name__} is not optimized; call tgate_fx.optimize(pipe) first")


def optimize(
    pipe: Any,
    gate_step: int = 10,
    sp_interval: int = 5,
    fi_interval: int = 1,
    warm_up: int = 2,
    lcm: bool | None = None,
    *,
    config: TGateConfig | None = None,
    compile: bool | dict = False,
):
    """Make a diffusers pipeline run its denoiser with T-GATE; returns the same pipeline.

    The denoiser (``pipe.unet`` or ``pipe.transformer``) is replaced by a
    :class:`~tgate_fx.runtime.TGateDenoiser`. Nothing is captured yet: the
    first call of each input signature captures the denoiser with
    ``torch.export`` and builds the graph variants the step plan needs. The
    pipeline is called as before. Applying it again replaces the settings and
    keeps the captured graphs; :func:`restore` puts the original denoiser back.

    Args:
        pipe: A diffusers pipeline (SD 1.x/2.x, SD-XL, PixArt-alpha/sigma, LCM
            variants, img2img, ControlNet, ...).
        gate_step, sp_interval, fi_interval, warm_up, lcm: see :class:`TGateConfig`.
        config: A :class:`TGateConfig`, instead of the individual settings.
        compile: ``True`` compiles every graph variant with ``torch.compile``
            (once each, at first use); a dict is passed to ``torch.compile`` as
            options, e.g. ``{"backend": "inductor", "mode": "max-autotune"}``.
            ``pipe.unet.compile(...)`` and ``pipe.unet = torch.compile(pipe.unet)``
            after ``optimize`` do the same.

    Example::

        pipe = tgate_fx.optimize(pipe, gate_step=10, sp_interval=5, fi_interval=1, warm_up=2)
        image = pipe(prompt, num_inference_steps=25).images[0]
        print(tgate_fx.report(pipe))
        tgate_fx.restore(pipe)
    """
    if config is None:
        config = TGateConfig(gate_step, sp_interval, fi_interval, warm_up, lcm)
    elif not isinstance(config, TGateConfig):
        raise TypeError(f"config must be a TGateConfig, got {type(config).__name__}")
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {type(compile).__name__}")
    name = _denoiser_attribute(pipe)
    current = _unwrap(getattr(pipe, name))
    if isinstance(current, TGateDenoiser):
        runtime = current
        runtime.configure(config, pipe)
    else:
        runtime = TGateDenoiser(current, config, pipe)
        # Bypass DiffusionPipeline.__setattr__: it would record the runtime's class
        # in the pipeline config, and save_pretrained would then write it there.
        object.__setattr__(pipe, name, runtime)
    if compile:
        runtime.compile(**({} if compile is True else compile))
    return pipe


def restore(pipe: Any):
    """Put back the original denoiser (the very same module object); returns the pipeline.

    A pipeline that is not optimized is returned unchanged.
    """
    for name in DENOISER_ATTRIBUTES:
        module = _unwrap(getattr(pipe, name, None))
        if isinstance(module, TGateDenoiser):
            # A plain assignment also puts the original class back in the
            # pipeline config, in case `pipe.unet = torch.compile(...)` changed it.
            setattr(pipe, name, module.denoiser)
    return pipe
