"""Runtime: the module that stands in for the denoiser inside an unmodified diffusers pipeline.

:class:`OptimizedDenoiser` is installed as ``pipe.unet`` / ``pipe.transformer`` by
:func:`tgate_fx.optimize`. On each call it

1. normalizes the arguments and asks its
   :class:`~tgate_fx.core.generation.GenerationTracker` for the step: the
   :class:`~tgate_fx.core.plan.Plan` entry (composed from every method),
   whether the unconditional half is dropped, the caches;
2. where a method drops it, keeps only the unconditional half of a CFG
   batch, as the reference T-GATE feeds the negative conditioning;
3. captures the denoiser for the call's input signature if it has not yet
   (one export per resolution serves every batch size, see
   :mod:`~tgate_fx.core.rebatch`; each method tags the capture), builds the step's graph variant
   if it has not yet, and runs it with the caches it reads;
4. stores the caches the variant writes, keyed by ``(method, site, slot)``,
   and returns the prediction; where the unconditional half was dropped it
   returns the prediction twice, ``cat([eps, eps])``, so that the pipeline's
   guidance ``u + g * (c - u)`` leaves it unchanged.

Everything a pipeline reads from its denoiser (``config``, ``dtype``,
``device``, submodules such as ``add_embedding``) is forwarded to the
original module, which stays registered as ``self.denoiser``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.eval_frame import OptimizedModule

from .blockwise import RegionalCompiler
from .captured import InputSignature, normalize_call, signature_of
from .generation import GenerationTracker, output_class, split_spec, take_half
from .method import Method
from .plan import Plan
from .rebatch import BatchCaptures
from .state import fingerprint
from .variants import CapturedGraphs, Variant, walk_plan

__all__ = ["DENOISER_ATTRIBUTES", "OptimizedDenoiser", "find_denoiser", "unwrap_compiled"]

# Where diffusers pipelines keep their denoiser, in order of preference.
DENOISER_ATTRIBUTES = ("unet", "transformer")


def unwrap_compiled(module: Any) -> Any:
    """The module inside a ``torch.compile`` wrapper (or the module itself)."""
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def find_denoiser(pipe: Any) -> tuple[str, torch.nn.Module] | None:
    """``(attribute, module)`` of a pipeline's denoiser (``unet`` or ``transformer``), compile wrappers
    removed; ``None`` if it has none. An optimized pipeline answers with its :class:`OptimizedDenoiser`."""
    for name in DENOISER_ATTRIBUTES:
        module = unwrap_compiled(getattr(pipe, name, None))
        if isinstance(module, torch.nn.Module):
            return name, module
    return None


_FULLGRAPH_REASON = (
    "tgate_fx's runtime switches graph variants between denoising steps, so torch.compile(pipe.unet, "
    "fullgraph=True) cannot trace it as one graph. Compile the variants instead, each as a full graph: "
    "pipe.unet.compile(fullgraph=True, ...) (likewise pipe.transformer), or tgate_fx.optimize(pipe, ..., "
    "compile={...}); or drop fullgraph=True (one graph break, at the runtime's own frame)")


def _model_base() -> type:
    # A diffusers ModelMixin, so that `pipe.save_pretrained` finds a save method (it looks one up
    # by base class, and silently writes a pipeline without the component otherwise).
    from diffusers import ModelMixin

    return ModelMixin


class OptimizedDenoiser(_model_base()):
    """Runs a denoiser as graph variants, step by step, for one or more methods.

    Args:
        denoiser: The pipeline's ``unet`` or ``transformer``.
        methods: The methods (see :func:`tgate_fx.methods.as_methods`).
        pipeline: The pipeline it serves; used to read the scheduler's steps
            and, where the pipeline exposes it, ``do_classifier_free_guidance``.
    """

    def __init__(self, denoiser: torch.nn.Module, methods: list[Method], pipeline=None):
        torch.nn.Module.__init__(self)
        self.denoiser = denoiser
        self._sample_arg = next(iter(inspect.signature(denoiser.forward).parameters))
        self._output_class = output_class(denoiser)
        self._captures: dict[InputSignature, CapturedGraphs] = {}
        self._batches = BatchCaptures(denoiser, self._sample_arg)  # one export per resolution, any batch
        self._compiler: Callable | None = None
        self._compiled: dict[Variant, Callable] = {}
        self._trace: list | None = None
        # Captures and variant builds are serialised: requests from several threads share them
        # (each thread has its own generation and caches, see GenerationTracker).
        self._lock = threading.RLock()
        self._state: tuple | None = None  # the denoiser's state the captures were made with
        self.recaptures = 0  # captures dropped because that state changed
        self.configure(methods, pipeline)

    def configure(self, methods: list[Method], pipeline=None) -> None:
        """Use new methods or settings. Captures are kept (they do not depend on them); variants are
        rebuilt where a method's tags change."""
        if not methods:
            raise ValueError("at least one method is needed")
        previous = getattr(self, "methods", None)
        try:
            for graphs in self._captures.values():
                graphs.annotate(methods)
        except Exception:
            for graphs in self._captures.values():  # leave the runtime as it was
                graphs.annotate(previous or [])
            raise
        self.methods = list(methods)
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else (lambda: None)
        self.generations = GenerationTracker(self.plan, pipeline, self._sample_arg, with_timesteps=True, split_cfg=True)

    def plan(self, num_steps: int, cfg: bool, timesteps=None) -> Plan:
        """The plan of a generation of ``num_steps`` steps (with these ``timesteps``, if known) under this
        runtime's methods."""
        return Plan(num_steps, self.methods, cfg, timesteps)

    def method_config(self, method: str):
        """The config of ``method`` (``"tgate"``, ``"deepcache"``, ...)."""
        for m in self.methods:
            if m.name == method:
                return m.config
        raise KeyError(f"method {method!r} is not applied (applied: {[m.name for m in self.methods]})")

    # --- torch.compile ---------------------------------------------------------
    def compile(self, *args, regional: bool = False, **kwargs) -> None:
        """Compile each graph variant with ``torch.compile(*args, **kwargs)``, once, at its first use.

        Replaces ``nn.Module.compile``: compiling this module's own ``forward``
        would make dynamo trace the step accounting and recompile at every
        step. ``fullgraph`` defaults to ``True``: a variant is one aten graph,
        and a graph break inside it would be a bug worth an error.
        ``torch.compile(runtime)`` assigned back to the pipeline is recognised
        too (see :meth:`_active_compiler`).

        ``regional=True`` compiles block by block instead (see
        :mod:`tgate_fx.core.blockwise`): each distinct block (a resnet, an
        attention block, ...) is compiled once and shared by every variant
        and every identical site, which cuts the first compile; the ops
        between blocks run eagerly.
        """
        kwargs.setdefault("fullgraph", True)
        self.compile_with(functools.partial(torch.compile, *args, **kwargs), regional=regional)

    def compile_with(self, compiler: Callable, regional: bool = False) -> None:
        """Compile each graph variant's ``forward`` with ``compiler(fn)`` (e.g. a dynamo context), once;
        ``regional=True``: each distinct block of the variants instead (see :meth:`compile`)."""
        self._compiler = RegionalCompiler(compiler) if regional else compiler
        self._compiled.clear()

    def _active_compiler(self) -> Callable | None:
        if self._compiler is not None:
            return self._compiler
        # `pipe.unet = torch.compile(pipe.unet)`: the pipeline holds an
        # OptimizedModule around this runtime; compile the variants with its
        # dynamo context (same backend and options). Its own frame around this
        # module compiles no graph: `__call__` below is disabled for dynamo.
        pipe = self._pipeline()
        for name in DENOISER_ATTRIBUTES:
            wrapper = getattr(pipe, name, None)
            if isinstance(wrapper, OptimizedModule) and wrapper._orig_mod is self:
                return wrapper.dynamo_ctx
        return None

    def _runner(self, variant: Variant) -> Callable:
        compiler = self._active_compiler()
        if compiler is None:
            return variant.graph_module
        if variant not in self._compiled:
            gm = variant.graph_module
            self._compiled[variant] = compiler(gm) if isinstance(compiler, RegionalCompiler) else compiler(gm.forward)
        return self._compiled[variant]

    def __deepcopy__(self, memo):
        """A runtime over a deep copy of the denoiser, serving the copied pipeline (``copy.deepcopy(pipe)``).

        Graphs are not copied (they hold the original's parameters): the copy captures its own.
        """
        pipe = self._pipeline()
        new = OptimizedDenoiser(copy.deepcopy(self.denoiser, memo), self.methods, memo.get(id(pipe), pipe))
        memo[id(self)] = new
        return new

    def save_pretrained(self, *args, **kwargs):
        """Save the original denoiser (what ``pipe.save_pretrained`` writes): graphs are never saved."""
        return self.denoiser.save_pretrained(*args, **kwargs)

    # --- what the pipeline reads from its denoiser -------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            denoiser = self.__dict__["_modules"].get("denoiser")
            if denoiser is None or name in _OWN_ATTRIBUTES:
                raise
            return getattr(denoiser, name)

    def _apply(self, fn, recurse=True):
        # `.to(device)` keeps the Parameter objects the graphs hold (it moves their data), and a
        # capture is keyed by its inputs' devices: moving the weights, as model CPU offload does
        # around every call, retires nothing and must not end the generation. A new dtype does
        # retire the graphs (dtypes of parameters are baked into the traced casts); the caches
        # of a generation in progress are then refused by their dtype check.
        dtypes = _dtypes(self.denoiser)
        out = super()._apply(fn, recurse)
        if _dtypes(self.denoiser) != dtypes:
            self._drop_graphs()
        return out

    def _drop_graphs(self) -> None:
        self._captures.clear()
        self._batches.clear()
        self._compiled.clear()

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
        """The capture for a normalized call's signature, made on first use (from the capture of its
        resolution, see :mod:`~tgate_fx.core.rebatch`)."""
        signature = signature_of(call)
        if signature not in self._captures:
            self._captures[signature] = CapturedGraphs.from_capture(self._batches(call), self.methods)
        return self._captures[signature]

    @contextlib.contextmanager
    def tracing(self):
        """Within the block, record every call as ``(StepPlan, CapturedGraphs, Variant)`` in the yielded list."""
        trace: list = []
        self._trace = trace
        try:
            yield trace
        finally:
            self._trace = None

    @property
    def captures(self) -> list[CapturedGraphs]:
        """Every capture made so far, oldest first."""
        return list(self._captures.values())

    # --- the call --------------------------------------------------------------
    # Never traced by dynamo: a call is Python bookkeeping around one graph
    # call, and the graphs themselves are what gets compiled (see `compile`).
    # `torch.compile(runtime)` records one graph break here (its wrapper frame
    # holds no graph); with `fullgraph=True` dynamo raises, and the reason below
    # is its message.
    @functools.partial(torch.compiler.disable, reason=_FULLGRAPH_REASON)
    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs)

    def _check_state(self) -> None:
        """At each generation's start: if module state baked into the graphs changed, drop them.

        LoRA adapters switched or scaled, IP-adapter scales, attention
        processors (PAG), fused projections, replaced parameters: see
        :mod:`tgate_fx.core.state`. The next calls capture again.
        """
        state = fingerprint(self.denoiser)
        if self._state is not None and state != self._state and self._captures:
            self._drop_graphs()
            self.recaptures += 1
        self._state = state

    def forward(self, *args, **kwargs):
        # Model CPU offload (accelerate): its hook on the denoiser moves the weights to the execution
        # device before a call; the graphs replace that call, so the runtime calls the hook itself.
        hook = getattr(self.denoiser, "_hf_hook", None)
        if hook is not None:
            args, kwargs = hook.pre_forward(self.denoiser, *args, **kwargs)
            return hook.post_forward(self.denoiser, self._forward(*args, **kwargs))
        return self._forward(*args, **kwargs)

    def _forward(self, *args, **kwargs):
        call, return_dict = normalize_call(self.denoiser, args, kwargs)
        step = self.generations.next_step(call)
        with self._lock:
            if step.plan.step == 0:
                self._check_state()
                self._prepare(call, self.generations.current_plan, split=step.role is not None)
        if not step.computed:  # split CFG after the gate: this call returns the step's prediction
            return step.finish(None, return_dict, self._output_class)
        if step.halves:
            call = take_half(call, self._sample_arg, type(self.denoiser).__name__)
        with self._lock:
            graphs = self.graphs_for(call)
            variant = graphs.variant(step.spec, step.caches)
        inputs = graphs.capture.flat_inputs(call)
        for key, name in variant.cache_inputs.items():
            inputs[name] = _checked_cache(step.caches[key], variant, name)
        outputs = self._runner(variant)(*(inputs[name] for name in variant.input_names))
        step.record(variant.records, outputs[1:], graphs.mean_keys(step.plan.variant) if step.role else frozenset())
        if self._trace is not None:
            self._trace.append((step.plan, graphs, variant))
        return step.finish(outputs[0], return_dict, self._output_class)

    def _prepare(self, call: dict[str, Any], plan: Plan, split: bool = False) -> None:
        """At a generation's first call: capture every batch its plan runs and build every variant.

        The capture of the post-gate batch (half the CFG batch) and the
        variant builds would otherwise happen in the middle of the generation,
        at the step that first needs them; the first call pays them instead,
        and each later step only runs its graph.
        """
        if split:  # every call has the latents' batch; records are averaged across the calls, not in the graph
            walk_plan(plan, lambda s: self.graphs_for(call), spec_of=split_spec)
            return
        half = None
        if any(s.drops_uncond for s in plan.steps):
            half = take_half(call, self._sample_arg, type(self.denoiser).__name__)
        walk_plan(plan, lambda s: self.graphs_for(half if s.drops_uncond else call))

    def extra_repr(self) -> str:
        return ", ".join(m.describe() for m in self.methods)


# Attributes that describe a module itself, never forwarded to the denoiser: accelerate's hooks
# (a pipeline removing them from its components would otherwise reach through the runtime).
_OWN_ATTRIBUTES = frozenset({"_hf_hook", "_old_forward"})


def _dtypes(module: torch.nn.Module) -> list:
    return [t.dtype for t in [*module.parameters(), *module.buffers()]]


def _checked_cache(cache: torch.Tensor, variant: Variant, name: str) -> torch.Tensor:
    expected = variant.input_meta[name]
    if cache.shape != expected.shape or cache.dtype != expected.dtype:
        raise RuntimeError(f"variant {variant.name!r} reads {name} as {tuple(expected.shape)} {expected.dtype}, but "
                           f"the cache holds {tuple(cache.shape)} {cache.dtype}; the methods' schedules disagree")
    return cache
