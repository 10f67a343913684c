"""Runtime: runs a denoiser's calls as graph variants, step by step, inside an unmodified diffusers pipeline.

A :class:`DenoiserRuntime` is plain Python, not a module: it holds the
captures, the methods, the compiled variants and, through its
:class:`~tgate_fx.core.generation.GenerationTracker`, each thread's
generation (step count and caches). :func:`tgate_fx.optimize` installs it as
a hook on the pipeline's own ``unet`` / ``transformer`` (see
:mod:`~tgate_fx.core.hook`), which stays the user's module. On each call it

1. normalizes the arguments and asks the tracker for the step: the
   :class:`~tgate_fx.core.plan.Plan` entry (composed from every method),
   whether the unconditional half is dropped, the caches;
2. where a method drops it, keeps only the unconditional half of a CFG
   batch, as the reference T-GATE feeds the negative conditioning;
3. captures the denoiser for the call's input signature if it has not yet
   (one export per resolution serves every batch size, see
   :mod:`~tgate_fx.core.rebatch`; each method tags the capture), builds the step's graph variant
   if it has not yet, and runs it with the caches it reads;
4. stores the caches the variant writes, keyed by ``(method, site, slot)``,
   and returns the prediction (at a step whose graph is chosen at run time,
   the head variant runs first, and the method that chooses names, from
   what the head recorded, the variant that runs after it); where the unconditional half was dropped it
   returns the prediction twice, ``cat([eps, eps])``, so that the pipeline's
   guidance ``u + g * (c - u)`` leaves it unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.eval_frame import OptimizedModule, _TorchDynamoContext

from .blockwise import RegionalCompiler
from .captured import InputSignature, normalize_call, signature_of
from .conventions import convention_of, forward_parameters
from .generation import GenerationTracker, output_class, split_spec, take_half
from .method import Method
from .plan import Plan
from .rebatch import BatchCaptures
from .state import fingerprint
from .variants import CapturedGraphs, Variant, walk_plan

__all__ = ["DENOISER_ATTRIBUTES", "DenoiserRuntime", "find_denoiser", "unwrap_compiled"]

# Where diffusers pipelines keep their denoiser, in order of preference.
DENOISER_ATTRIBUTES = ("unet", "transformer")


def unwrap_compiled(module: Any) -> Any:
    """The module inside a ``torch.compile`` wrapper (or the module itself)."""
    return module._orig_mod if isinstance(module, OptimizedModule) else module


def find_denoiser(pipe: Any) -> tuple[str, torch.nn.Module] | None:
    """``(attribute, module)`` of a pipeline's denoiser (``unet`` or ``transformer``), compile wrappers
    removed; ``None`` if it has none."""
    for name in DENOISER_ATTRIBUTES:
        module = unwrap_compiled(getattr(pipe, name, None))
        if isinstance(module, torch.nn.Module):
            return name, module
    return None


class DenoiserRuntime:
    """Runs a denoiser as graph variants, step by step, for one or more methods.

    Args:
        denoiser: The pipeline's ``unet`` or ``transformer``.
        methods: The methods (see :func:`tgate_fx.core.method.as_methods`).
        pipeline: The pipeline it serves by default (held weakly): calls from
            another pipeline's ``__call__`` (a ``from_pipe`` copy sharing the
            denoiser) count with that pipeline's scheduler and guidance.
        segment: For one of several denoisers a pipeline switches between by step (Wan 2.2's
            experts): ``segment(pipe, timesteps)``, the indices of the steps this one runs; its
            generations are those steps (see :class:`~tgate_fx.core.generation.GenerationTracker`).
    """

    def __init__(self, denoiser: torch.nn.Module, methods: list[Method], pipeline=None, segment=None):
        self.denoiser = denoiser
        # A denoiser that runs some steps of each generation: (pipe, timesteps) -> their indices (see
        # GenerationTracker); its generations are those steps.
        self.segment = segment
        # From the class: the instance may be a deep copy still being filled in (see `copy_for`).
        self._sample_arg = forward_parameters(type(denoiser))[0]
        self._convention = convention_of(type(denoiser))
        self._output_class = output_class(denoiser)
        self._captures: dict[InputSignature, CapturedGraphs] = {}
        self._batches = BatchCaptures(denoiser, self._sample_arg)  # one export per resolution, any batch
        self._compiler: Callable | None = None
        self._compiled: dict[tuple, Callable] = {}
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
        self.generations = GenerationTracker(self.plan, pipeline, self._sample_arg, with_timesteps=True, split_cfg=True,
                                             segment=self.segment)

    @property
    def capture_store(self):
        """The capture store this runtime loads captures from and saves them to (see
        :mod:`~tgate_fx.core.capture_store`); set a :class:`~tgate_fx.core.capture_store.CaptureStore` (e.g. a
        directory replicas share), or ``None`` for none. Default: the environment's store."""
        return self._batches.store

    @capture_store.setter
    def capture_store(self, store) -> None:
        self._batches.store = store

    def plan(self, num_steps: int, cfg: bool, timesteps=None, *, split: bool = False) -> Plan:
        """The plan of a generation of ``num_steps`` steps (with these ``timesteps``, if known; ``split``: CFG
        as two calls a step) under this runtime's methods."""
        return Plan(num_steps, self.methods, cfg, timesteps, split=split)

    def method_config(self, method: str):
        """The config of ``method`` (``"tgate"``, ``"deepcache"``, ...)."""
        for m in self.methods:
            if m.name == method:
                return m.config
        raise KeyError(f"method {method!r} is not applied (applied: {[m.name for m in self.methods]})")

    # --- torch.compile ---------------------------------------------------------
    def compile(self, *args, regional: bool = False, **kwargs) -> None:
        """Compile each graph variant with ``torch.compile(*args, **kwargs)``, once, at its first use.

        ``fullgraph`` defaults to ``True``: a variant is one aten graph, and a
        graph break inside it would be a bug worth an error.
        ``torch.compile(pipe.unet)`` and ``pipe.unet.compile(...)`` are
        recognised too (see :meth:`_active_compiler`).

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
        """What compiles the variants: :meth:`compile`'s settings, else the dynamo context the user compiled
        the denoiser with, ``pipe.unet.compile(...)`` or ``pipe.unet = torch.compile(pipe.unet, ...)``
        (same backend and options, ``fullgraph`` included). The denoiser's own frame compiles nothing:
        the hook that calls this runtime is disabled for dynamo (see :mod:`~tgate_fx.core.hook`)."""
        if self._compiler is not None:
            return self._compiler
        compiled_call = self.denoiser.__dict__.get("_compiled_call_impl")
        if compiled_call is not None:  # nn.Module.compile: torch.compile(module._call_impl, ...)
            return _dynamo_context(compiled_call)
        pipe = self.generations.current_pipeline
        for name in DENOISER_ATTRIBUTES:
            wrapper = getattr(pipe, name, None)
            if isinstance(wrapper, OptimizedModule) and wrapper._orig_mod is self.denoiser:
                return wrapper.dynamo_ctx
        return None

    def _runner(self, variant: Variant) -> Callable:
        compiler = self._active_compiler()
        if compiler is None:
            return variant.graph_module
        key = (variant, id(compiler))
        if key not in self._compiled:
            gm = variant.graph_module
            self._compiled[key] = compiler(gm) if isinstance(compiler, RegionalCompiler) else compiler(gm.forward)
        return self._compiled[key]

    def copy_for(self, denoiser: torch.nn.Module, memo: dict) -> DenoiserRuntime:
        """A runtime with these methods for ``denoiser`` (a deep copy of this one's), serving the copy of the
        pipeline in ``memo`` if there is one. Graphs are not copied (they hold the original's parameters):
        the copy captures its own."""
        pipe = self._pipeline()
        return DenoiserRuntime(denoiser, self.methods, memo.get(id(pipe), pipe), self.segment)

    def _drop_graphs(self) -> None:
        self._captures.clear()
        self._batches.clear()
        self._compiled.clear()

    # --- generation accounting ---------------------------------------------
    def reset(self) -> None:
        """End the current generation and drop its caches."""
        self.generations.reset()

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
        """Run one denoiser call (what the hook on the denoiser calls)."""
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
        inputs = graphs.capture.flat_inputs(call)
        spec, choice = step.plan.variant, step.plan.choice
        if choice is not None:  # the head runs first; its method then names the graph that follows
            self._run(graphs, choice.head, step, inputs)
            labels = tuple(label for label, _ in choice.alternatives)
            label = self._method(choice.method).decide(step.plan.step, step.caches, labels)
            spec = choice.alternative(label)
        prediction = self._run(graphs, spec, step, inputs)
        out = step.finish(prediction, return_dict, self._output_class)
        if self._convention is None:
            return out
        # the denoiser's own output form (per-sample lists), from the graph's batched prediction
        prediction = self._convention.output(out[0] if not return_dict else out.sample)
        return (prediction,) if not return_dict else self._output_class(sample=prediction)

    def _run(self, graphs: CapturedGraphs, spec, step, inputs: dict[str, Any]):
        """Run the variant of the plan's ``spec`` for one call, store the caches it writes; its prediction."""
        with self._lock:
            variant = graphs.variant(step.spec_of(spec), step.caches)
        for key, name in variant.cache_inputs.items():
            if key not in step.caches:
                raise RuntimeError(
                    f"variant {variant.name!r} reads the cache {key}, which no step of this generation since "
                    "guidance was last switched on or off wrote (a switch drops every cache: Z-Image's "
                    f"cfg_truncation, a dynamic-CFG callback); the {key.method} method cannot follow that switch. "
                    "Keep guidance on or off for the whole generation, or tgate_fx.restore(pipe)")
            inputs[name] = _checked_cache(step.caches[key], variant, name)
        if variant.call_means and step.role is None:
            raise RuntimeError(f"variant {variant.name!r} writes {sorted(map(str, variant.call_means))} as one call's "
                               "part of a split-CFG step, but this call is not one of a split-CFG step's two")
        outputs = self._runner(variant)(*(inputs[name] for name in variant.input_names))
        means = graphs.mean_keys(spec) | variant.call_means if step.role else frozenset()
        step.record(variant.records, outputs[1:], means)
        if self._trace is not None:
            self._trace.append((step.plan, graphs, variant))
        return outputs[0]

    def _method(self, name: str) -> Method:
        for method in self.methods:
            if method.name == name:
                return method
        raise KeyError(f"method {name!r} is not applied (applied: {[m.name for m in self.methods]})")

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

    def __repr__(self) -> str:
        return f"DenoiserRuntime({type(self.denoiser).__name__}; {', '.join(m.describe() for m in self.methods)})"


def _dynamo_context(compiled: Callable) -> _TorchDynamoContext:
    """The dynamo context of a function ``torch.compile`` returned (its backend and options)."""
    for cell in getattr(compiled, "__closure__", None) or ():
        if isinstance(cell.cell_contents, _TorchDynamoContext):
            return cell.cell_contents
    raise RuntimeError(
        "the denoiser was compiled with module.compile(...), and tgate_fx cannot read the torch.compile options "
        f"from this torch version ({torch.__version__}) to compile its graph variants with them. Pass the options "
        "to tgate_fx.optimize(pipe, ..., compile={...}) instead")


def _checked_cache(cache: torch.Tensor, variant: Variant, name: str) -> torch.Tensor:
    expected = variant.input_meta[name]
    if cache.shape != expected.shape or cache.dtype != expected.dtype:
        raise RuntimeError(f"variant {variant.name!r} reads {name} as {tuple(expected.shape)} {expected.dtype}, but "
                           f"the cache holds {tuple(cache.shape)} {cache.dtype}; the methods' schedules disagree")
    return cache
