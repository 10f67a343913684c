"""Run the *published* DeepCache and T-GATE + DeepCache code on tiny pipelines.

A test helper (not a test file): each function builds a tiny pipeline, applies
the published package to it and returns the final latents of one generation
(``output_type="latent"``, fp32, ``torch.Generator().manual_seed(seed)``, the
prompt and call of :func:`conftest.latents`). Tests of tgate_fx's DeepCache
compare against these. Nothing here imports tgate_fx beyond
:func:`tgate_fx.tiny.tiny_pipeline`.

- :func:`deepcache_latents`: PyPI ``DeepCache==0.1.1``,
  ``DeepCache.DeepCacheSDHelper`` (uniform mode) on any UNet pipeline
  (``sd15``, ``sd21``, ``sdxl``, ``sd15_img2img``, ``sd15_controlnet``).
- :func:`tgate_deepcache_latents`: PyPI ``tgate==1.0.0``,
  ``tgate.TgateSDDeepCacheLoader`` (``sd15``, ``sd21``) and
  ``tgate.TgateSDXLDeepCacheLoader`` (``sdxl``), which apply DeepCache
  themselves and call the package's copied ``__call__`` as ``pipe.tgate(...)``.
- :func:`executed_modules`: which leaf ``Linear``/``Conv2d`` modules of the
  UNet actually ran at each denoising step, and at which batch, for pinning
  down what a DeepCache partial step computes.

No shim is needed with diffusers 0.42 / torch 2.13: both packages run as
published. Two things the callers must respect (they are properties of the
published code, not bugs of the harness):

- ``DeepCacheSDHelper.enable()`` wraps ``forward`` of the UNet and its blocks;
  enabling twice wraps twice and ``disable()`` then restores only one level.
  Its step counter (``start_timestep``) and caches also survive from one
  generation to the next until ``disable()``/``enable()``. So every function
  here enables a fresh helper and disables it after the one generation.
- ``TgateSD*DeepCacheLoader`` replaces ``forward`` of every ``Attention``
  module for good (T-GATE's ``register_forward``), so a pipeline that went
  through it is never reused: each call builds its own.

Example::

    from reference_deepcache import deepcache_latents, tgate_deepcache_latents
    ref = deepcache_latents("sdxl", cache_interval=3, cache_branch_id=0, num_inference_steps=8)
    ref2 = tgate_deepcache_latents("sdxl", gate_step=4, sp_interval=1, fi_interval=1, warm_up=0,
                                   cache_interval=3, cache_branch_id=0, num_inference_steps=8)
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from conftest import PROMPT, latents
from tgate_fx.tiny import tiny_pipeline

__all__ = ["DEEPCACHE_FAMILIES", "TGATE_DEEPCACHE_LOADERS", "deepcache", "deepcache_latents", "executed_modules",
           "tgate_deepcache_latents"]

# Tiny families DeepCacheSDHelper runs on: any pipeline with a UNet2DConditionModel at `pipe.unet`
# that calls it as unet(sample, t, ...) with the timestep positional (the helper reads args[1]).
DEEPCACHE_FAMILIES = ("sd15", "sd21", "sdxl", "sd15_img2img", "sd15_controlnet")

# The published T-GATE + DeepCache loaders copy the text-to-image __call__ of SD and SD-XL only.
TGATE_DEEPCACHE_LOADERS = {"sd15": "TgateSDDeepCacheLoader", "sd21": "TgateSDDeepCacheLoader",
                           "sdxl": "TgateSDXLDeepCacheLoader"}


@contextlib.contextmanager
def deepcache(pipe, cache_interval: int, cache_branch_id: int, skip_mode: str = "uniform"):
    """The published ``DeepCacheSDHelper`` enabled on ``pipe`` for the duration of the block.

    Yields the helper. On exit it is disabled, which puts the original
    ``forward`` methods back and drops its caches and step counter.
    """
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=cache_interval, cache_branch_id=cache_branch_id, skip_mode=skip_mode)
    helper.enable()
    try:
        yield helper
    finally:
        helper.disable()


def deepcache_latents(family: str, cache_interval: int, cache_branch_id: int, num_inference_steps: int,
                      seed: int = 0, *, pipe: Any = None, **call: Any) -> torch.Tensor:
    """Final latents of one generation of ``tiny_pipeline(family)`` under published DeepCache.

    Args:
        family: One of :data:`DEEPCACHE_FAMILIES`.
        cache_interval: A full UNet step every ``cache_interval`` steps,
            counted from the pipeline's first denoising step.
        cache_branch_id: DeepCache's branch (``layer = id % 3``, ``block = id // 3``).
        num_inference_steps: Denoising steps.
        seed: Seed of the latents' generator.
        pipe: A pipeline to use instead of building ``tiny_pipeline(family)``
            (it is left as it was found).
        **call: Overrides of the family's call arguments (e.g. ``strength``).
    """
    if family not in DEEPCACHE_FAMILIES:
        raise ValueError(f"unknown family {family!r} for DeepCache; choose one of {DEEPCACHE_FAMILIES}")
    pipe = pipe if pipe is not None else tiny_pipeline(family)
    with deepcache(pipe, cache_interval, cache_branch_id):
        return latents(pipe, seed=seed, num_inference_steps=num_inference_steps, **call)


def tgate_deepcache_latents(family: str, gate_step: int, sp_interval: int, fi_interval: int, warm_up: int,
                            cache_interval: int, cache_branch_id: int, num_inference_steps: int,
                            seed: int = 0) -> torch.Tensor:
    """Final latents of one generation under the published T-GATE + DeepCache (``tgate==1.0.0``).

    Mirrors ``tests/test_reference_package.py``: the loader is applied to a
    fresh ``tiny_pipeline(family)`` and its ``pipe.tgate(...)`` is called with
    the family's call arguments. ``family`` is one of :data:`TGATE_DEEPCACHE_LOADERS`.
    """
    import tgate

    if family not in TGATE_DEEPCACHE_LOADERS:
        raise ValueError(f"the published T-GATE + DeepCache has no loader for {family!r}; "
                         f"choose one of {sorted(TGATE_DEEPCACHE_LOADERS)}")
    loader = getattr(tgate, TGATE_DEEPCACHE_LOADERS[family])
    reference = loader(tiny_pipeline(family), cache_interval=cache_interval, cache_branch_id=cache_branch_id)
    try:
        return reference.tgate(PROMPT, generator=torch.Generator().manual_seed(seed),
                               num_inference_steps=num_inference_steps, output_type="latent", gate_step=gate_step,
                               sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up,
                               **reference.tiny_call_kwargs).images
    finally:
        reference.deepcache.disable()


def executed_modules(pipe, run) -> list[dict[str, Any]]:
    """Per UNet call of ``run()``: the leaf ``Linear``/``Conv2d`` modules of ``pipe.unet`` that ran.

    Forward hooks on leaves fire only when the leaf really computes, so a
    module DeepCache answers from its cache (and everything under it) is
    absent. Returns one dict per UNet call, in order: ``{"batch": int,
    "modules": [qualified names, in execution order]}``.

    Example::

        pipe = tiny_pipeline("sdxl")
        with deepcache(pipe, 3, 0):
            calls = executed_modules(pipe, lambda: latents(pipe, num_inference_steps=4))
    """
    unet = pipe.unet
    calls: list[dict[str, Any]] = []
    handles = [unet.register_forward_pre_hook(lambda m, a, k: calls.append(
        {"batch": (a[0] if a else k["sample"]).shape[0], "modules": []}), with_kwargs=True)]
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            handles.append(module.register_forward_hook(
                lambda m, a, out, name=name: calls[-1]["modules"].append(name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return calls
