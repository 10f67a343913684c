"""Runtime: the module that stands in for the denoiser inside an unmodified diffusers pipeline.

:class:`TGateDenoiser` is installed as ``pipe.unet`` / ``pipe.transformer`` by
:func:`tgate_fx.optimize`. On each call it

1. normalizes the arguments and asks its
   :class:`~tgate_fx.generation.GenerationTracker` for the step: the
   :class:`~tgate_fx.plan.Plan` entry, whether CFG is dropped, the caches;
2. after the gate, keeps only the unconditional half of a CFG batch, as the
   reference feeds the negative conditioning;
3. captures the denoiser for the call's input signature if it has not yet,
   builds the step's graph variant if it has not yet, and runs it with the
   caches it reads;
4. stores the caches the variant writes, and returns the prediction. After
   the gate it returns the prediction twice, ``cat([eps, eps])``, so that the
   pipeline's guidance ``u + g * (c - u)`` leaves it unchanged.

Everything a pipeline reads from its denoiser (``config``, ``dtype``,
``device``, submodules such as ``add_embedding``) is forwarded to the
original module, which stays registered as ``self.denoiser``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from .analysis import AttentionSite, find_attention_sites
from .capture import Capture, InputSignature, capture_denoiser, normalize_call, signature_of
from .config import TGateConfig
from .generation import GenerationTracker, take_unconditional_half
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
        self._sample_arg = next(iter(inspect.signature(denoiser.forward).parameters))
        self._captures: dict[InputSignature, CapturedGraphs] = {}
        self.configure(config, pipeline)

    def configure(self, config: TGateConfig, pipeline=None) -> None:
        """Use new settings. Captures and variants are kept: they do not depend on the settings."""
        self.tgate_config = config
        self.generations = GenerationTracker(config, pipeline, self._sample_arg)

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
        self.reset()
        return super()._apply(fn, recurse)

    # --- generation accounting ---------------------------------------------
    def reset(self) -> None:
        """End the current generation and drop its caches."""
        self.generations.reset()

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        # diffusers calls this on every component at the end of a pipeline call.
        self.reset()

    @property
    def last_plan(self) -> Plan | None:
        """The plan of the current or last generation."""
        return self.generations.last_plan

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
        step = self.generations.next_step(call)
        if step.drops_uncond:
            call = take_unconditional_half(call, call[self._sample_arg].shape[0])
        graphs = self.graphs_for(call)
        variant = graphs.variant(step.plan.variant)
        inputs = graphs.capture.flat_inputs(call)
        for site, name in variant.cache_inputs.items():
            inputs[name] = step.caches[site]
        outputs = variant(inputs)
        step.caches.update(zip(variant.records, outputs[1:]))
        return step.finish(outputs[0], return_dict, self.denoiser)

    def extra_repr(self) -> str:
        return f"tgate_config={self.tgate_config}"
