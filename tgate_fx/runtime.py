"""Runtime: the module that stands in for the denoiser inside an unmodified diffusers pipeline.

:class:`TGateDenoiser` is installed as ``pipe.unet`` / ``pipe.transformer`` by
:func:`tgate_fx.optimize`. On each call it

1. normalizes the arguments and advances its own step counter (a new
   generation starts when the scheduler has new timesteps, after the
   pipeline's end-of-call reset, or when the previous one ran all its steps);
2. looks up the :class:`~tgate_fx.plan.Plan` entry of the step;
3. after the gate, keeps only the unconditional half of a CFG batch, as the
   reference feeds the negative conditioning;
4. captures the denoiser for the call's input signature if it has not yet,
   builds the step's graph variant if it has not yet, and runs it with the
   caches it reads;
5. stores the caches the variant writes, and returns the prediction. After
   the gate it returns the prediction twice, ``cat([eps, eps])``, so that the
   pipeline's guidance ``u + g * (c - u)`` leaves it unchanged.

Everything a pipeline reads from its denoiser (``config``, ``dtype``,
``device``, submodules such as ``add_embedding``) is forwarded to the
original module, which stays registered as ``self.denoiser``.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .analysis import AttentionSite, find_attention_sites
from .capture import Capture, InputSignature, capture_denoiser, normalize_call, signature_of
from .config import TGateConfig
from .plan import Plan, VariantSpec
from .variants import Variant, build_variant

__all__ = ["CapturedGraphs", "TGateDenoiser"]


@dataclass
class CapturedGraphs:
    """One capture, its attention sites, and the variants built from it so far."""

    capture: Capture
    sites: list[AttentionSite]
    variants: dict[VariantSpec, Variant] = field(default_factory=dict)

    def variant(self, spec: VariantSpec) -> Variant:
        if spec not in self.variants:
            self.variants[spec] = build_variant(self.capture.graph_module, self.sites, spec)
        return self.variants[spec]


@dataclass
class _Generation:
    plan: Plan
    timesteps: Any  # the scheduler's timesteps object when the generation started
    step: int = 0
    caches: dict[str, torch.Tensor] = field(default_factory=dict)


def _output_class(denoiser: torch.nn.Module):
    from diffusers import UNet2DConditionModel

    if isinstance(denoiser, UNet2DConditionModel):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput


def _take_unconditional_half(call: dict[str, Any], batch: int) -> dict[str, Any]:
    half = batch // 2
    return pytree.tree_map(
        lambda x: x[:half] if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == batch else x, call
    )


class TGateDenoiser(torch.nn.Module):
    """Runs a denoiser as T-GATE graph variants, step by step.

    Args:
        denoiser: The pipeline's ``unet`` or ``transformer``.
        config: T-GATE settings.
        pipeline: The pipeline it serves; used to read the scheduler's steps
            and, where the pipeline exposes it, ``do_classifier_free_guidance``.
    """

    def __init__(self, denoiser: torch.nn.Module, config: TGateConfig, pipeline=None):
        super().__init__()
        self.denoiser = denoiser
        self.tgate_config = config
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else (lambda: None)
        self._sample_arg = next(iter(inspect.signature(denoiser.forward).parameters))
        self._captures: dict[InputSignature, CapturedGraphs] = {}
        self._generation: _Generation | None = None
        self.last_plan: Plan | None = None

    # --- what the pipeline reads from its denoiser -------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            denoiser = self.__dict__["_modules"].get("denoiser")
            if denoiser is None:
                raise
            return getattr(denoiser, name)

    def _apply(self, fn, recurse=True):
        # Graphs are specialised to device and dtype; moving the weights retires them.
        self._captures.clear()
        self._generation = None
        return super()._apply(fn, recurse)

    # --- generation accounting ---------------------------------------------
    def reset(self) -> None:
        """End the current generation and drop its caches."""
        self._generation = None

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        # diffusers calls this on every component at the end of a pipeline call.
        self.reset()

    def _scheduler_timesteps(self):
        scheduler = getattr(self._pipeline(), "scheduler", None)
        return getattr(scheduler, "timesteps", None)

    def _steps_in_generation(self) -> int:
        pipe = self._pipeline()
        if isinstance(getattr(type(pipe), "num_timesteps", None), property):
            steps = getattr(pipe, "_num_timesteps", None)
            if steps:
                return int(steps)
        scheduler = getattr(pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            raise RuntimeError(
                "cannot tell how many denoising steps this generation has: the pipeline has no scheduler "
                "with timesteps; call the denoiser from a diffusers pipeline"
            )
        return len(timesteps) - int(getattr(scheduler, "begin_index", None) or 0)

    def _detect_cfg(self, call: dict[str, Any]) -> bool:
        sample = call[self._sample_arg]
        batch = sample.shape[0]
        pipe = self._pipeline()
        cfg = None
        if isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
            try:
                cfg = bool(pipe.do_classifier_free_guidance)
            except AttributeError:  # read outside a pipeline call
                cfg = None
        if cfg is None:
            # Pipelines that keep the decision local (PixArt) show it in the
            # batch: a CFG batch repeats the same latents twice.
            cfg = batch % 2 == 0 and torch.equal(sample[: batch // 2], sample[batch // 2 :])
        if cfg and batch % 2:
            raise ValueError(f"classifier-free guidance is on but the denoiser batch is odd ({batch})")
        lcm = self.tgate_config.lcm
        if lcm is True and cfg:
            raise ValueError("lcm=True, but this call runs classifier-free guidance (a 2B batch of "
                             "[uncond, cond]); use lcm=None, or guidance_scale <= 1")
        if lcm is False and not cfg:
            raise ValueError("lcm=False, but this call runs without classifier-free guidance; "
                             "use lcm=None (decide per call) or lcm=True")
        return cfg

    def _generation_for(self, call: dict[str, Any]) -> _Generation:
        timesteps = self._scheduler_timesteps()
        gen = self._generation
        if gen is not None and gen.step < gen.plan.num_steps and (timesteps is None or timesteps is gen.timesteps):
            return gen
        self._generation = None
        plan = Plan(self._steps_in_generation(), self.tgate_config, self._detect_cfg(call))
        self._generation = _Generation(plan, timesteps)
        self.last_plan = plan
        return self._generation

    # --- graphs --------------------------------------------------------------
    def graphs_for(self, call: dict[str, Any]) -> CapturedGraphs:
        """The capture for a normalized call's signature, made on first use."""
        signature = signature_of(call)
        if signature not in self._captures:
            capture = capture_denoiser(self.denoiser, call)
            self._captures[signature] = CapturedGraphs(capture, find_attention_sites(capture.graph_module))
        return self._captures[signature]

    @property
    def captures(self) -> list[CapturedGraphs]:
        """Every capture made so far, oldest first."""
        return list(self._captures.values())

    # --- the call --------------------------------------------------------------
    def forward(self, *args, **kwargs):
        call, return_dict = normalize_call(self.denoiser, args, kwargs)
        gen = self._generation_for(call)
        entry = gen.plan.steps[gen.step]
        gen.step += 1
        drop_uncond = gen.plan.cfg and not entry.cfg
        if drop_uncond:
            call = _take_unconditional_half(call, call[self._sample_arg].shape[0])
        graphs = self.graphs_for(call)
        variant = graphs.variant(entry.variant)
        inputs = graphs.capture.flat_inputs(call)
        for site, name in variant.cache_inputs.items():
            inputs[name] = gen.caches[site]
        outputs = variant(inputs)
        gen.caches.update(zip(variant.records, outputs[1:]))
        prediction = outputs[0]
        if drop_uncond:
            prediction = torch.cat([prediction, prediction])
        if not return_dict:
            return (prediction,)
        return _output_class(self.denoiser)(sample=prediction)

    def extra_repr(self) -> str:
        return f"tgate_config={self.tgate_config}"
