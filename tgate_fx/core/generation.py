"""Generation accounting, shared by every runtime (torch graphs, ONNX Runtime).

A :class:`GenerationTracker` turns a stream of denoiser calls into steps of
generations. The step index is its own count of calls, never a search of the
scheduler's timesteps. A new generation starts

* at the first call after the pipeline's end-of-call reset (diffusers calls
  ``_reset_stateful_cache`` on every component when ``__call__`` finishes,
  interrupted or not),
* when the scheduler holds a new ``timesteps`` object (``set_timesteps`` ran
  again, e.g. after an exception ended the previous generation early), or
* when the previous generation has run all its steps.

The pipeline is the one whose ``__call__`` is calling the denoiser (found on
the call stack, so that pipelines sharing one denoiser, ``from_pipe`` copies,
each count with their own scheduler and guidance), else the pipeline given at
construction. Each thread has its own current generation and caches: two
requests served from two threads never mix.

At the start it reads the number of steps (the pipeline's ``num_timesteps``
where it has one, else the scheduler's timesteps after its begin index),
decides whether the generation runs classifier-free guidance, reads the
timesteps of its steps if asked to (``with_timesteps``), asks for the
generation's plan (a :class:`~tgate_fx.core.plan.Plan`, or the stored steps of
an exported bundle) and clears the caches.

**Split CFG.** Some pipelines (Wan and its variants) run classifier-free
guidance as two denoiser calls per step, one with ``prompt_embeds`` and one
with ``negative_prompt_embeds``, each of the latents' batch, instead of one
CFG batch. The tracker tells the two apart by which of the calling
pipeline's tensors the call's ``encoder_hidden_states`` is (never by
position). Such a generation follows the plan of a CFG generation, call
pair by call pair:

* each call runs the step's graph on its own batch. A record the plan
  reduces to the mean of the CFG halves is recorded by both calls of the
  step and stored as ``(uncond + cond) / 2``, the same operations in the same
  order as in a CFG batch's graph; other caches are kept per call;
* at a step that drops the unconditional half, the step's first call runs the
  graph and the other call is not computed: it returns the same prediction,
  so that the pipeline's guidance ``u + g * (c - u)`` leaves it unchanged.

A pipeline that declares guidance but whose calls cannot be told apart this
way is refused with that reason.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from collections.abc import Callable

from .plan import Plan, StepPlan

__all__ = ["COND", "UNCOND", "GenerationTracker", "Step", "batched_sizes", "output_class", "split_spec", "take_half"]

COND, UNCOND = "cond", "uncond"


@functools.cache
def _diffusion_pipeline() -> type:
    # Imported once: `from diffusers import ...` goes through diffusers' lazy module at every
    # execution (about 1 ms), and the caller is looked up at every denoiser call.
    from diffusers import DiffusionPipeline

    return DiffusionPipeline


def output_class(denoiser: torch.nn.Module):
    """The ``return_dict=True`` output type of a diffusers denoiser."""
    from diffusers import UNet2DConditionModel

    if isinstance(denoiser, UNet2DConditionModel):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput


# A step that drops guidance keeps one half of the CFG batch: the unconditional one, except for
# Stable Video Diffusion, whose unconditional half has zero image latents and embeddings (it
# would generate without the input image); its published T-GATE runs the conditional half.
_KEEPS_CONDITIONAL_HALF = frozenset({"UNetSpatioTemporalConditionModel"})
# AnimateDiff's UNetMotionModel takes (batch, channels, frames, h, w) latents and text embeddings
# repeated per frame (repeat_interleave: the unconditional block of frames first).
_PER_FRAME_CONDITIONING = frozenset({"UNetMotionModel"})


def batched_sizes(sample: torch.Tensor, denoiser_class: str) -> set[int]:
    """The leading sizes of a call's batched tensors: the latents' batch, and ``batch * frames`` for a
    denoiser with per-frame conditioning."""
    batch = sample.shape[0]
    return {batch, batch * sample.shape[2]} if denoiser_class in _PER_FRAME_CONDITIONING else {batch}


def take_half(call: dict[str, Any], sample_arg: str, denoiser_class: str) -> dict[str, Any]:
    """The half of a CFG call that a step dropping guidance runs (see ``_KEEPS_CONDITIONAL_HALF``).

    A tensor is batched if its leading dimension is the latents' batch, or
    ``batch * frames`` for a denoiser with per-frame conditioning.
    """
    sizes = batched_sizes(call[sample_arg], denoiser_class)
    second = denoiser_class in _KEEPS_CONDITIONAL_HALF

    def half(x):
        if not (isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] in sizes):
            return x
        n = x.shape[0] // 2
        return x[n:] if second else x[:n]

    return pytree.tree_map(half, call)


@dataclass
class _Generation:
    plan: Plan
    timesteps: Any  # the scheduler's timesteps object when the generation started
    step: int = 0
    caches: dict[Any, Any] = field(default_factory=dict)
    switched_at: int | None = None  # step at which guidance was switched on or off, if it was
    split: bool = False  # CFG as two denoiser calls per step (see the module docstring)
    calls: list = field(default_factory=list)  # split CFG: the roles of the current step's calls so far
    role_caches: dict[str, dict] = field(default_factory=lambda: {COND: {}, UNCOND: {}})
    pending: dict[str, dict] = field(default_factory=dict)  # split CFG: this step's records to average, by role
    prediction: Any = None  # split CFG: the step's prediction, for a call that is not computed
    pipeline: Any = None  # weak reference to the calling pipeline


def split_spec(spec):
    """``spec`` with its records unreduced: a split-CFG call records its own value; the tracker averages."""
    from dataclasses import replace

    if not any(getattr(r, "reduce", None) for r in spec.rewrites):
        return spec
    return replace(spec, name=spec.name + "~split",
                   rewrites=frozenset(replace(r, reduce=None) if r.reduce else r for r in spec.rewrites))


@dataclass
class Step:
    """One denoiser call: its plan entry and the generation's caches (cache key -> tensor).

    Attributes:
        role: Split CFG only: ``"cond"`` or ``"uncond"``, which of the step's two calls this is.
    """

    plan: StepPlan
    caches: dict[Any, Any]
    role: str | None = None
    _generation: Any = None

    @property
    def drops_uncond(self) -> bool:
        return self.plan.drops_uncond

    @property
    def halves(self) -> bool:
        """Whether the call must be cut to one half of its CFG batch (never for a split-CFG call)."""
        return self.plan.drops_uncond and self.role is None

    @property
    def spec(self):
        """The variant spec this call runs."""
        return self.spec_of(self.plan.variant)

    def spec_of(self, spec):
        """``spec`` as this call runs it (a split-CFG call records its own values, see :func:`split_spec`)."""
        return split_spec(spec) if self.role is not None else spec

    @property
    def computed(self) -> bool:
        """``False`` for the second call of a split-CFG step that drops the unconditional half."""
        gen = self._generation
        return not (self.role is not None and self.plan.drops_uncond and gen.prediction is not None)

    def record(self, keys, values, means=frozenset()) -> None:
        """Store the caches the call's graph wrote; ``means``: the keys the plan records as the mean of the
        CFG halves (a split-CFG call recorded its own value of them)."""
        if self.role is None:
            self.caches.update(zip(keys, values))
            return
        gen = self._generation
        for key, value in zip(keys, values):
            if key in means:
                gen.pending.setdefault(self.role, {})[key] = value
            else:
                self.caches[key] = value

    def _average_pending(self) -> None:
        """Once both calls of a split-CFG step recorded (a call may run several graphs, each recording):
        ``(u + c) / 2``, as a CFG batch's graph does."""
        gen = self._generation
        if len(gen.pending) == 2:
            u, c = gen.pending[UNCOND], gen.pending[COND]
            for key in u:
                mean = (u[key] + c[key]) / 2
                for role in (COND, UNCOND):
                    gen.role_caches[role][key] = mean
            gen.pending.clear()

    def finish(self, prediction: torch.Tensor, return_dict: bool, output_cls: type | None = None):
        """The denoiser's return value for ``prediction``: a tuple, or ``output_cls(sample=...)``.

        After the gate the pipeline still sends a CFG batch and combines
        ``u + g * (c - u)``; returning the prediction for both halves makes
        that combine return it unchanged. A split-CFG step returns the
        prediction of its first call for both calls.
        """
        if self.role is not None:
            self._average_pending()
            if self.plan.drops_uncond:
                gen = self._generation
                prediction = gen.prediction if gen.prediction is not None else prediction
                gen.prediction = prediction
        elif self.drops_uncond:
            prediction = torch.cat([prediction, prediction])
        if not return_dict:
            return (prediction,)
        return output_cls(sample=prediction)


class GenerationTracker:
    """Counts steps and owns the caches of the current generation.

    Args:
        plan_for: ``(num_steps, cfg) -> Plan`` of a new generation (it raises
            ``ValueError`` for a generation it cannot serve).
        pipeline: The pipeline whose denoiser calls are counted (held weakly).
        sample_arg: Name of the denoiser's latent input (``sample`` or ``hidden_states``).
        with_timesteps: Call ``plan_for(num_steps, cfg, timesteps)`` instead, with
            :meth:`timesteps_in_generation` (for methods whose schedule reads timesteps).
        split_cfg: Serve pipelines that run CFG as two denoiser calls per step (see the module
            docstring; their plans are made with ``plan_for(..., split=True)``); otherwise such a
            generation is refused.
        segment: For a denoiser that runs only some steps of each generation (Wan 2.2's two experts):
            ``segment(pipe, timesteps)``, the indices of the generation's steps it runs, from the
            generation's timesteps. Its generations are those steps: planned as a generation of that
            many steps, counted from its first call, and each call's timestep is checked against the
            step's (a mismatch raises ``RuntimeError``: the count would run the wrong graph).
    """

    def __init__(self, plan_for: Callable[..., Plan], pipeline, sample_arg: str, *, with_timesteps: bool = False,
                 split_cfg: bool = False, segment: Callable[[Any, tuple[float, ...]], tuple[int, ...]] | None = None):
        self.plan_for = plan_for
        self.with_timesteps = with_timesteps
        self.split_cfg = split_cfg
        self.segment = segment
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else (lambda: None)
        self.sample_arg = sample_arg
        self._local = threading.local()
        self.last_plan: Plan | None = None

    @property
    def _generation(self) -> _Generation | None:
        return getattr(self._local, "generation", None)

    @_generation.setter
    def _generation(self, value: _Generation | None) -> None:
        self._local.generation = value

    def reset(self) -> None:
        """End the current generation (of this thread) and drop its caches."""
        self._generation = None

    def _caller(self) -> tuple[Any, dict]:
        """``(pipeline, its __call__'s locals)`` of the pipeline calling the denoiser, else the given one."""
        frame = sys._getframe(2)
        for _ in range(40):
            if frame is None:
                break
            if frame.f_code.co_name == "__call__":
                owner = frame.f_locals.get("self")
                if isinstance(owner, _diffusion_pipeline()):
                    return owner, frame.f_locals
            frame = frame.f_back
        return self._pipeline(), {}

    def _scheduler_timesteps(self, pipe):
        return getattr(getattr(pipe, "scheduler", None), "timesteps", None)

    def steps_in_generation(self, pipe=None, in_call: bool = True) -> int:
        """The steps of the generation starting now: the pipeline's ``num_timesteps`` while its ``__call__``
        runs (``in_call``; outside it, that count is the last call's), else the scheduler's timesteps after
        its begin index."""
        pipe = pipe if pipe is not None else self._pipeline()
        if in_call and isinstance(getattr(type(pipe), "num_timesteps", None), property):
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

    def timesteps_in_generation(self, num_steps: int, pipe=None, local: dict | None = None) -> tuple[float, ...] | None:
        """The timestep the pipeline passes at each of the generation's ``num_steps`` steps, or ``None``.

        The ``timesteps`` its ``__call__`` iterates over (SD-XL's ``denoising_end``
        shortens them), else the scheduler's from its begin index (img2img), if
        either has one value per step; ``None`` where neither has.
        """
        pipe = pipe if pipe is not None else self._pipeline()
        scheduler = getattr(pipe, "scheduler", None)
        begin = int(getattr(scheduler, "begin_index", None) or 0)
        scheduled = getattr(scheduler, "timesteps", None)
        for values in ((local or {}).get("timesteps"), scheduled[begin:] if scheduled is not None else None):
            if isinstance(values, (torch.Tensor, list, tuple)) and len(values) == num_steps:
                return tuple(float(t) for t in (values.tolist() if isinstance(values, torch.Tensor) else values))
        return None

    def detect_cfg(self, call: dict[str, Any], pipe=None, local: dict | None = None) -> bool:
        """Whether this generation runs classifier-free guidance.

        The calling pipeline's ``do_classifier_free_guidance`` decides where it
        has one (SD, SD-XL, ControlNet, img2img), else the variable of that
        name in its ``__call__`` (PixArt), or ``do_true_cfg`` (Flux,
        Qwen-Image: true CFG as two calls per step); only a denoiser called from
        elsewhere falls back to recognising a CFG batch by its two identical
        halves of latents.
        """
        sample = call[self.sample_arg]
        batch = sample.shape[0]
        cfg = self._declared_cfg(pipe if pipe is not None else self._pipeline(), local)
        if cfg is None:
            cfg = batch % 2 == 0 and bool(torch.equal(sample[: batch // 2], sample[batch // 2 :]))
        return cfg

    @staticmethod
    def _check_batch(plan, batch: int) -> None:
        """A plan that splits the CFG batch into halves needs an even batch."""
        splits = any(s.drops_uncond or any(getattr(r, "reduce", None) for r in getattr(s.variant, "rewrites", ()))
                     for s in plan.steps)
        if plan.cfg and batch % 2 and splits:
            raise ValueError(
                f"classifier-free guidance is on but the denoiser batch is odd ({batch}), and this plan splits the "
                "CFG batch into its unconditional and conditional halves. A batch of 3 (unconditional, conditional, "
                "perturbed) is perturbed-attention guidance (PAG): T-GATE cannot gate it. Call the pipeline with "
                "pag_scale=0 or without guidance, use DeepCache or ToDo alone, or tgate_fx.restore(pipe)")

    @staticmethod
    def _declared_cfg(pipe, local: dict | None) -> bool | None:
        """CFG as the calling pipeline declares it right now, or ``None`` if it does not say.

        A pipeline that decides guidance per step says so in its ``__call__``'s ``apply_cfg`` (Z-Image:
        ``cfg_truncation`` drops it at the late steps, while ``do_classifier_free_guidance`` stays on); that
        decision comes first.
        """
        step_cfg = (local or {}).get("apply_cfg")
        if isinstance(step_cfg, bool):
            return step_cfg
        if isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
            try:
                return bool(pipe.do_classifier_free_guidance)
            except AttributeError:  # read outside a pipeline call
                pass
        local = local or {}
        for name in ("do_classifier_free_guidance", "do_true_cfg"):  # do_true_cfg: Flux's and Qwen-Image's
            value = local.get(name)
            if isinstance(value, bool):
                return value
        return None

    def _split_role(self, call: dict[str, Any], local: dict) -> str | None:
        """``"cond"``/``"uncond"`` if the call is one of the two calls of a split-CFG step, else ``None``.

        Split: the call's latents have the batch of the pipeline's ``latents`` (a CFG batch has twice
        that), and its ``encoder_hidden_states`` is the pipeline's ``prompt_embeds`` or its
        ``negative_prompt_embeds`` (the very tensor).
        """
        text, latents = call.get("encoder_hidden_states"), local.get("latents")
        if not (isinstance(text, torch.Tensor) and isinstance(latents, torch.Tensor) and latents.ndim):
            return None
        if call[self.sample_arg].shape[0] != latents.shape[0]:
            return None
        if text is local.get("prompt_embeds"):
            return COND
        if text is local.get("negative_prompt_embeds"):
            return UNCOND
        return None

    def _split_refusal(self, call: dict[str, Any], local: dict, pipe) -> None:
        """Raise if guidance is on and the call has the latents' own batch, but is neither of the two calls."""
        latents = local.get("latents")
        if isinstance(latents, torch.Tensor) and latents.ndim and call[self.sample_arg].shape[0] == latents.shape[0]:
            raise ValueError(
                f"{type(pipe).__name__} runs classifier-free guidance as two denoiser calls per step, and tgate_fx "
                "cannot tell which call is the conditional one: it recognises them by their encoder_hidden_states "
                "being the pipeline's prompt_embeds or negative_prompt_embeds, which this pipeline does not pass. "
                "Call it without guidance, or tgate_fx.restore(pipe)")

    def _current(self, call: dict[str, Any]) -> tuple[_Generation, str | None]:
        pipe, local = self._caller()
        timesteps = self._scheduler_timesteps(pipe)
        gen = self._generation
        if gen is not None and gen.step < gen.plan.num_steps and (timesteps is None or timesteps is gen.timesteps):
            cfg = self._declared_cfg(pipe, local)
            if cfg is not None and cfg != gen.plan.cfg:
                self._switch_cfg(gen, cfg, call[self.sample_arg].shape[0])
            return gen, self._role(gen, call, local)
        self._generation = None
        num_steps, cfg = self.steps_in_generation(pipe, in_call=bool(local)), self.detect_cfg(call, pipe, local)
        segment_timesteps = None
        if self.segment is not None:
            num_steps, segment_timesteps = self._segment(pipe, local, num_steps)
        split = cfg and self.split_cfg and self._split_role(call, local) is not None
        if cfg and not split:
            if self._split_role(call, local) is not None:
                raise ValueError(f"{type(pipe).__name__} runs classifier-free guidance as two denoiser calls per "
                                 "step; this runtime serves it only as one CFG batch (an ONNX bundle replays the "
                                 "calls of the generation it traced). Use the torch runtime, or call it without "
                                 "guidance")
            if call[self.sample_arg].shape[0] % 2:
                self._split_refusal(call, local, pipe)
        extra = {"split": True} if split else {}  # split_cfg's plan_for takes it
        if self.segment is not None:
            plan = self.plan_for(num_steps, cfg, segment_timesteps, **extra)
        elif self.with_timesteps:
            plan = self.plan_for(num_steps, cfg, self.timesteps_in_generation(num_steps, pipe, local), **extra)
        else:
            plan = self.plan_for(num_steps, cfg, **extra)
        if not split:
            self._check_batch(plan, call[self.sample_arg].shape[0])
        self._generation = _Generation(plan, timesteps, split=split,
                                       pipeline=weakref.ref(pipe) if pipe is not None else None)
        self.last_plan = plan
        return self._generation, self._role(self._generation, call, local)

    def _role(self, gen: _Generation, call: dict[str, Any], local: dict) -> str | None:
        if not gen.split:
            return None
        role = self._split_role(call, local)
        if role is None:
            raise RuntimeError(f"step {gen.step} of a split-CFG generation: a denoiser call is neither the conditional "
                               "nor the unconditional one (its encoder_hidden_states is neither prompt_embeds nor "
                               "negative_prompt_embeds of the calling pipeline); nothing was run")
        if role in gen.calls:
            raise RuntimeError(f"step {gen.step} of a split-CFG generation: a second {role} call, where the "
                               "conditional and the unconditional call alternate; nothing was run")
        return role

    def _switch_cfg(self, gen: _Generation, cfg: bool, batch: int) -> None:
        """Guidance switched on or off within a generation (diffusers' "dynamic CFG" callback).

        The rest of the generation follows the plan of the new mode from the
        same step. Every cache is dropped (it was recorded for the other
        batch), so each method computes a value again until it next records
        it: nothing recorded under the old mode is ever read.
        """
        if gen.split:
            raise RuntimeError(f"guidance was switched {'on' if cfg else 'off'} at step {gen.step} of a generation "
                               "that runs it as two denoiser calls per step; tgate_fx cannot follow that switch. "
                               "Keep guidance on or off for the whole generation, or tgate_fx.restore(pipe)")
        extra = (gen.plan.timesteps,) if self.with_timesteps else ()
        gen.plan = self.plan_for(gen.plan.num_steps, cfg, *extra)
        self._check_batch(gen.plan, batch)
        gen.caches.clear()
        gen.switched_at = gen.step
        self.last_plan = gen.plan

    @property
    def current_pipeline(self):
        """The pipeline calling this thread's current generation (else the one given at construction)."""
        gen = self._generation
        pipe = gen.pipeline() if gen is not None and gen.pipeline is not None else None
        return pipe if pipe is not None else self._pipeline()

    @property
    def current_plan(self) -> Plan | None:
        """The plan of this thread's current generation (``None`` between generations)."""
        gen = self._generation
        return gen.plan if gen is not None else None

    def _segment(self, pipe, local: dict, num_steps: int) -> tuple[int, tuple[float, ...]]:
        """The steps and timesteps of this denoiser's part of a generation of ``num_steps`` steps."""
        timesteps = self.timesteps_in_generation(num_steps, pipe, local)
        if timesteps is None:
            raise RuntimeError("this denoiser runs only some steps of each generation, and tgate_fx cannot read "
                               "the generation's timesteps to tell which; call it from its diffusers pipeline")
        steps = tuple(self.segment(pipe, timesteps))
        if not steps:
            raise RuntimeError("this denoiser was called in a generation none of whose steps it runs")
        return len(steps), tuple(timesteps[i] for i in steps)

    def _check_timestep(self, gen: _Generation, call: dict[str, Any]) -> None:
        timestep = call.get("timestep")
        expected = gen.plan.timesteps[gen.step] if gen.plan.timesteps is not None else None
        if isinstance(timestep, torch.Tensor) and timestep.numel() and expected is not None:
            got = float(timestep.flatten()[0])
            if got != expected:
                raise RuntimeError(f"step {gen.step} of this denoiser's part of the generation is at timestep "
                                   f"{expected}, but it was called at {got}: the pipeline switches denoisers at "
                                   "other steps than tgate_fx counted, and it would run the wrong graph. "
                                   "tgate_fx.restore(pipe)")

    def next_step(self, call: dict[str, Any]) -> Step:
        """Account for one denoiser call (a normalized call dict) and return its step."""
        gen, role = self._current(call)
        if self.segment is not None:
            self._check_timestep(gen, call)
        entry = gen.plan.steps[gen.step]
        if role is None:
            gen.step += 1
            return Step(entry, gen.caches)
        if not gen.calls:
            gen.prediction = None
        gen.calls.append(role)
        if len(gen.calls) == 2:
            gen.step += 1
            gen.calls = []
        return Step(entry, gen.role_caches[role], role, gen)
