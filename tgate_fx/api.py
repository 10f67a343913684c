"""Public entry points: :func:`optimize`, :func:`restore`, :func:`get_runtime`."""

from __future__ import annotations

import warnings
from typing import Any

import torch


from .core.analysis import attention_modules, conditioning_inputs
from .core.method import InertMethodWarning
from .core.hook import install, installed_runtime, uninstall
from .core.runtime import DENOISER_ATTRIBUTES, DenoiserRuntime, find_denoiser
from .methods import BlockCacheConfig, DeepCacheConfig, TGateConfig, ToCaConfig, ToDoConfig, as_methods

__all__ = ["get_runtime", "optimize", "restore"]

_TGATE_ARGS = ("gate_step", "sp_interval", "fi_interval", "warm_up", "lcm")


def _denoiser_of(pipe: Any) -> torch.nn.Module:
    """``pipe``'s denoiser, if tgate_fx can serve it. What a method needs of it, each method checks and names."""
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"optimize() takes a diffusers DiffusionPipeline, got {type(pipe).__name__}")
    found = find_denoiser(pipe)
    if found is None:
        raise TypeError(
            f"{type(pipe).__name__} has no supported denoiser: expected a torch module at "
            f"pipe.{' or pipe.'.join(DENOISER_ATTRIBUTES)}"
        )
    name, module = found
    if getattr(pipe, "transformer_2", None) is not None and _boundary(pipe) is None:
        raise TypeError(
            f"{type(pipe).__name__} has a pipe.transformer_2 but no boundary_ratio in its config that says at which "
            "timestep it takes over from pipe.transformer; tgate_fx serves pipelines that switch denoisers the way "
            "Wan 2.2's do (boundary_ratio)")
    if not conditioning_inputs(module) or not attention_modules(module):
        missing = "no attention modules" if conditioning_inputs(module) else \
            "no conditioning input (encoder_hidden_states or class_labels)"
        raise TypeError(f"{type(pipe).__name__}.{name} ({type(module).__name__}) has {missing}; every method of "
                        "tgate_fx accelerates the attention of a text- or class-conditioned denoiser")
    return module


def _boundary(pipe: Any) -> float | None:
    """Wan 2.2's switch between its experts: ``pipe.transformer`` runs the steps whose timestep is at least
    ``boundary_ratio * num_train_timesteps``, ``pipe.transformer_2`` the others (``None``: no switch)."""
    ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if ratio is None or getattr(pipe, "transformer_2", None) is None:
        return None
    return float(ratio) * pipe.scheduler.config.num_train_timesteps


def _segments(pipe: Any) -> dict[str, Any]:
    """The denoisers of ``pipe`` to serve, by attribute, each with its segment function (``None``: every step).

    Wan 2.2 switches between two experts by timestep: each is served as its own denoiser, its generations the
    steps it runs (counted from its first call; its methods' step settings count within them)."""
    boundary = _boundary(pipe)
    if boundary is None:
        return {}

    def high(pipe_, timesteps):  # the pipeline's test: t >= boundary_timestep runs pipe.transformer
        return tuple(i for i, t in enumerate(timesteps) if t >= boundary)

    def low(pipe_, timesteps):
        return tuple(i for i, t in enumerate(timesteps) if not t >= boundary)

    return {"transformer": high, "transformer_2": low}


def get_runtime(pipe: Any) -> DenoiserRuntime:
    """The :class:`~tgate_fx.core.runtime.DenoiserRuntime` :func:`optimize` installed on ``pipe``'s denoiser.

    Raises:
        ValueError: if ``pipe`` is not optimized.
    """
    found = find_denoiser(pipe)
    runtime = installed_runtime(found[1]) if found is not None else None
    if runtime is not None:
        return runtime
    raise ValueError(f"{type(pipe).__name__} is not optimized; call tgate_fx.optimize(pipe) first")


def optimize(
    pipe: Any,
    gate_step: int | None = None,
    sp_interval: int | None = None,
    fi_interval: int | None = None,
    warm_up: int | None = None,
    lcm: bool | None = None,
    *,
    config: TGateConfig | None = None,
    tgate: TGateConfig | bool | None = None,
    deepcache: DeepCacheConfig | None = None,
    todo: ToDoConfig | None = None,
    toca: ToCaConfig | None = None,
    blockcache: BlockCacheConfig | None = None,
    methods: Any = None,
    compile: bool | dict = False,
):
    """Make a diffusers pipeline run its denoiser with T-GATE, DeepCache, or both; returns the same pipeline.

    Methods are given by keyword, one config each, and compose: every step
    runs the union of the methods' rewrites for that step.

    * ``optimize(pipe, gate_step=10, sp_interval=5, fi_interval=1, warm_up=2)``:
      T-GATE with the reference's argument names (any of them selects T-GATE;
      the others take :class:`TGateConfig`'s defaults);
    * ``optimize(pipe)``: T-GATE with its defaults;
    * ``optimize(pipe, deepcache=DeepCacheConfig(cache_interval=3, cache_branch_id=0))``:
      DeepCache alone;
    * ``optimize(pipe, tgate=TGateConfig(10, 1, 1, 0), deepcache=DeepCacheConfig(3, 0))``:
      both (the combination the T-GATE paper reports); ``tgate=True`` takes
      T-GATE's defaults;
    * ``optimize(pipe, todo=ToDoConfig(factor=2))``: ToDo alone (composes with both others);
    * ``optimize(pipe, toca=ToCaConfig())``: ToCa with the official defaults of the denoiser's family
      (PixArt, DiT); with ``tgate=TGateConfig(gate_step, 1, 1, 0)`` T-GATE owns cross-attention after its gate;
    * ``optimize(pipe, blockcache=BlockCacheConfig(threshold=0.05))``: First Block Cache (every transformer),
      as diffusers' ``FirstBlockCacheConfig`` hook; it composes with T-GATE and ToCa;
    * ``optimize(pipe, methods=[TGateConfig(...), DeepCacheConfig(...)])``: the same as a list.

    The denoiser (``pipe.unet`` or ``pipe.transformer``) stays the user's own
    module: a hook on it (see :mod:`tgate_fx.core.hook`) hands its calls to a
    :class:`~tgate_fx.core.runtime.DenoiserRuntime` (:func:`get_runtime`).
    Nothing is captured yet: the first call of each input signature captures
    the denoiser with ``torch.export`` and builds the graph variants the step
    plan needs. The pipeline is called as before; ``from_pipe`` copies share
    the denoiser and so its runtime, each counting its own generations.
    Applying it again replaces the methods and keeps the captured graphs;
    :func:`restore` removes the hook. Wan 2.2's pipelines switch between two
    experts by timestep (``pipe.transformer``, ``pipe.transformer_2``): each
    gets its own runtime, with the methods applied to the steps it runs, as
    its own generation (step settings count within them).

    Args:
        pipe: A diffusers pipeline (SD 1.x/2.x, SD-XL, PixArt-alpha/sigma, LCM
            variants, img2img, ControlNet, ...). DeepCache needs a UNet.
        gate_step, sp_interval, fi_interval, warm_up, lcm: T-GATE settings, see :class:`TGateConfig`.
        config: A :class:`TGateConfig`, instead of the individual settings (same as ``tgate=``).
        tgate: A :class:`TGateConfig`, or ``True`` for its defaults.
        deepcache: A :class:`DeepCacheConfig`.
        todo: A :class:`ToDoConfig` (key/value downsampling of self-attention).
        toca: A :class:`ToCaConfig` (token-wise feature caching; PixArt, DiT and FLUX transformers).
        blockcache: A :class:`BlockCacheConfig` (First Block Cache: skip the blocks after the first when
            the first block's residual barely changed).
        methods: A list of method configs, instead of the keywords.
        compile: ``True`` compiles every graph variant with ``torch.compile``
            (once each, at first use); a dict is passed to ``torch.compile`` as
            options, e.g. ``{"backend": "inductor", "mode": "max-autotune"}``;
            ``{"regional": True, ...}`` compiles each distinct block of the
            variants once instead of each variant whole (a much shorter first
            compile; see :meth:`DenoiserRuntime.compile`).
            ``pipe.unet.compile(...)`` and ``pipe.unet = torch.compile(pipe.unet, ...)``,
            before or after ``optimize``, compile the variants the same way,
            with the options given there (``fullgraph=True`` included).

    Raises:
        TypeError, ValueError: for bad settings (naming them), a pipeline
            without a supported denoiser, or the same method given twice.

    Example::

        pipe = tgate_fx.optimize(pipe, gate_step=10, sp_interval=5, fi_interval=1, warm_up=2)
        image = pipe(prompt, num_inference_steps=25).images[0]
        print(tgate_fx.report(pipe))
        tgate_fx.restore(pipe)
    """
    chosen = _chosen_methods(dict(zip(_TGATE_ARGS, (gate_step, sp_interval, fi_interval, warm_up, lcm))),
                             config, tgate, deepcache, methods, todo, toca, blockcache)
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {type(compile).__name__}")
    denoiser = _denoiser_of(pipe)
    segments = _segments(pipe)
    if segments:  # each expert has its own runtime, methods bound to it
        for name, segment in segments.items():
            _install(pipe, getattr(pipe, name), chosen, compile, segment)
        return pipe
    _install(pipe, denoiser, chosen, compile)
    return pipe


def _install(pipe: Any, denoiser: torch.nn.Module, chosen: list, compile, segment=None) -> None:
    chosen = [method.bind(denoiser) for method in chosen]  # raises for a denoiser a method cannot serve
    for method in chosen:  # again, now that each knows the denoiser
        method.compose([m for m in chosen if m is not method])
    for method in chosen:
        reason = method.inert_reason(denoiser)
        if reason:
            warnings.warn(f"tgate_fx: {method.title} rewrites nothing here: {reason}", InertMethodWarning, stacklevel=2)
    runtime = installed_runtime(denoiser)
    if runtime is not None:
        runtime.segment = segment
        runtime.configure(chosen, pipe)
    else:
        runtime = DenoiserRuntime(denoiser, chosen, pipe, segment)
        install(denoiser, runtime)
    if compile:
        runtime.compile(**({} if compile is True else compile))


def _chosen_methods(tgate_args: dict, config, tgate, deepcache, methods, todo=None, toca=None,
                    blockcache=None) -> list:
    given = {k: v for k, v in tgate_args.items() if v is not None}
    if methods is not None:
        if given or any(x is not None for x in (config, tgate, deepcache, todo, toca, blockcache)):
            raise TypeError("pass methods=[...] alone, or the method keywords, not both")
        return as_methods(methods)
    if config is not None and tgate is not None:
        raise TypeError("config= and tgate= both give T-GATE settings; pass one")
    tgate = config if config is not None else tgate
    if tgate is True:
        tgate = TGateConfig()
    if tgate is False:
        tgate = None
    if tgate is not None and not isinstance(tgate, TGateConfig):
        raise TypeError(f"tgate (or config) must be a TGateConfig or True, got {type(tgate).__name__}")
    if given:
        if tgate is not None:
            raise TypeError(f"T-GATE settings given twice: {sorted(given)} and a TGateConfig; pass one")
        tgate = TGateConfig(**given)
    if deepcache is not None and not isinstance(deepcache, DeepCacheConfig):
        raise TypeError(f"deepcache must be a DeepCacheConfig, got {type(deepcache).__name__}")
    if todo is not None and not isinstance(todo, ToDoConfig):
        raise TypeError(f"todo must be a ToDoConfig, got {type(todo).__name__}")
    if toca is not None and not isinstance(toca, ToCaConfig):
        raise TypeError(f"toca must be a ToCaConfig, got {type(toca).__name__}")
    if blockcache is not None and not isinstance(blockcache, BlockCacheConfig):
        raise TypeError(f"blockcache must be a BlockCacheConfig, got {type(blockcache).__name__}")
    if tgate is None and deepcache is None and todo is None and toca is None and blockcache is None:
        tgate = TGateConfig()  # the call users know: optimize(pipe) is T-GATE with its defaults
    return as_methods([c for c in (tgate, deepcache, todo, toca, blockcache) if c is not None])


def restore(pipe: Any):
    """Remove tgate_fx's hook from the pipeline's denoiser (its calls run the module itself again, and its
    graphs are dropped); returns the pipeline. A pipeline that is not optimized is returned unchanged."""
    found = find_denoiser(pipe)
    if found is not None:
        uninstall(found[1])
    second = getattr(pipe, "transformer_2", None)  # Wan 2.2's second expert
    if isinstance(second, torch.nn.Module):
        uninstall(second)
    return pipe
