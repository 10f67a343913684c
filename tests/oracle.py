"""An eager oracle of the reference T-GATE semantics, built from caching attention processors.

It shares no code with tgate_fx. The schedule is transcribed from the
reference ``tgate_scheduler``; caching happens in attention processors set on
the eager denoiser (the way the reference patches ``Attention.forward``):

* each attention module keeps its own processor (softmax or Sana's linear
  attention, rotary embeddings, LTX-Video's and Wan's own classes), wrapped
  by a caching one;
* the role of a call is decided as the reference does: cross-attention when
  ``encoder_hidden_states`` is passed, self-attention otherwise;
* the cached value is the attention output before ``/ rescale_output_factor``
  (which is 1.0, with no residual, in every supported model: asserted), the
  mean of the two CFG halves at the gate step;
* after the gate the denoiser sees only the unconditional half of the CFG
  batch, and its prediction is returned for both halves so that the
  pipeline's guidance leaves it unchanged (the reference drops guidance).
"""

from __future__ import annotations

import inspect

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from tgate_fx.core.hook import bypassed


def reference_schedule(cur: int, gate_step: int, sp_interval: int, fi_interval: int, warm_up: int):
    """(cross, self, keep_shape) flags of step ``cur``, as in T-GATE's ``tgate_scheduler``."""
    if cur < gate_step - 1:
        ca = {"cache": False, "reuse": False}
        if cur < warm_up:
            sa = {"cache": False, "reuse": False}
        elif cur == warm_up:
            sa = {"cache": True, "reuse": False}
        elif cur % sp_interval == 0:
            sa = {"cache": True, "reuse": False}
        else:
            sa = {"cache": False, "reuse": True}
        return ca, sa, True
    if cur == gate_step - 1:
        return {"cache": True, "reuse": False}, {"cache": True, "reuse": False}, False
    ca = {"cache": False, "reuse": True}
    sa = {"cache": True, "reuse": False} if cur % fi_interval == 0 else {"cache": False, "reuse": True}
    return ca, sa, True


class _State:
    def __init__(self):
        self.ca = self.sa = {"cache": False, "reuse": False}
        self.keep_shape = True


class CachingProcessor:
    """The module's own processor plus the reference's cache/reuse behaviour."""

    def __init__(self, state: _State, inner=None):
        self.state = state
        self.cache = None
        self.inner = inner if inner is not None else AttnProcessor2_0()
        self.signature = inspect.signature(self.inner.__call__)

    def __call__(self, attn, *args, **kw):
        # role as in the reference: cross-attention when encoder_hidden_states is passed
        encoder_hidden_states = self.signature.bind(attn, *args, **kw).arguments.get("encoder_hidden_states")
        assert not getattr(attn, "residual_connection", False) and getattr(attn, "rescale_output_factor", 1.0) == 1.0
        flags = self.state.ca if encoder_hidden_states is not None else self.state.sa
        if flags["reuse"] and self.cache is not None:
            return self.cache
        out = self.inner(attn, *args, **kw)
        if flags["cache"]:
            if self.state.keep_shape:
                self.cache = out
            else:
                uncond, cond = out.chunk(2)
                self.cache = (uncond + cond) / 2
        return out


def caching_processor(state: _State, inner) -> CachingProcessor:
    """A :class:`CachingProcessor` around ``inner`` whose ``__call__`` has ``inner``'s signature.

    Attention modules drop the keyword arguments their processor's signature
    does not name (HunyuanDiT's ``image_rotary_emb``), so the wrapper shows it.
    """
    cls = type(inner)

    def call(self, attn, *args, **kw):
        return CachingProcessor.__call__(self, attn, *args, **kw)

    call.__wrapped__ = cls.__call__
    return type(f"Caching{cls.__name__}", (CachingProcessor,), {"__call__": call})(state, inner)


class StandIn(torch.nn.Module):
    """Stands in for a pipeline's denoiser: what it does not have itself (config, dtype, cache_context) is the
    denoiser's."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["denoiser"], name)


class OracleDenoiser(StandIn):
    """Stands in for ``pipe.unet``/``pipe.transformer`` for ONE generation."""

    def __init__(self, denoiser, *, cfg: bool, gate_step: int, sp_interval: int, fi_interval: int, warm_up: int):
        super().__init__(denoiser)
        self.cfg = cfg
        self.settings = (gate_step, sp_interval, fi_interval, warm_up)
        self.state = _State()
        self.step = 0
        self.original_processors = denoiser.attn_processors
        denoiser.set_attn_processor({name: caching_processor(self.state, processor)
                                     for name, processor in self.original_processors.items()})

    def close(self):
        self.denoiser.set_attn_processor(self.original_processors)

    def forward(self, *args, **kwargs):
        # the latents: first positional argument, else `sample` (UNets) or `hidden_states` (transformers)
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        ca, sa, keep_shape = reference_schedule(self.step, *self.settings)
        self.state.ca, self.state.sa = ca, sa
        self.state.keep_shape = keep_shape or not self.cfg  # lcm=True: full tensor at the gate
        post_gate = self.cfg and self.step >= self.settings[0]
        self.step += 1
        if not post_gate:
            with bypassed(self.denoiser):  # the module's own forward, never an installed tgate_fx runtime
                return self.denoiser(*args, **kwargs)
        batch = sample.shape[0]
        # AnimateDiff: text embeddings repeated per frame, unconditional frames first.
        # Stable Video Diffusion: the reference runs the conditional image latents and embeddings.
        kind = type(self.denoiser).__name__
        sizes = {batch, batch * sample.shape[2]} if kind == "UNetMotionModel" else {batch}
        second = kind == "UNetSpatioTemporalConditionModel"

        def half(x):
            if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] in sizes:
                return x[x.shape[0] // 2:] if second else x[: x.shape[0] // 2]
            if isinstance(x, dict):
                return {k: half(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(half(v) for v in x)
            return x

        with bypassed(self.denoiser):
            out = self.denoiser(*half(args), **half(kwargs))
        pred = out[0] if isinstance(out, tuple) else out.sample
        pred = torch.cat([pred, pred])
        return (pred,) if isinstance(out, tuple) else type(out)(sample=pred)


def run_oracle(pipe, denoiser_attr: str, *, cfg: bool, gate_step: int, sp_interval: int, fi_interval: int,
               warm_up: int, **call_kwargs):
    """Run ``pipe(**call_kwargs)`` once with the oracle in place; returns the pipeline output.

    Works on optimized pipelines too: the oracle wraps the original eager
    denoiser and the optimized one is put back afterwards.
    """
    installed = getattr(pipe, denoiser_attr)
    oracle = OracleDenoiser(installed, cfg=cfg, gate_step=gate_step, sp_interval=sp_interval,
                            fi_interval=fi_interval, warm_up=warm_up)
    object.__setattr__(pipe, denoiser_attr, oracle)
    try:
        with bypassed(installed):  # the module's own eager forward, not an installed tgate_fx runtime
            return pipe(**call_kwargs)
    finally:
        oracle.close()
        object.__setattr__(pipe, denoiser_attr, installed)


class _SplitCfgProcessor:
    """The module's own processor plus the reference's cache/reuse rules, one cache per CFG call."""

    def __init__(self, state: _State, inner):
        self.state = state
        self.inner = inner
        self.signature = inspect.signature(inner.__call__)
        self.cache: dict[str, torch.Tensor] = {}
        self.pending = None

    def __call__(self, attn, *args, **kw):
        encoder_hidden_states = self.signature.bind(attn, *args, **kw).arguments.get("encoder_hidden_states")
        flags = self.state.ca if encoder_hidden_states is not None else self.state.sa
        role = self.state.role
        if flags["reuse"] and role in self.cache:
            return self.cache[role]
        out = self.inner(attn, *args, **kw)
        if flags["cache"]:
            if self.state.keep_shape:
                self.cache[role] = out
            elif role == "cond":  # the gate step: the mean of the two calls, (uncond + cond) / 2
                self.pending = out
            else:
                mean = (out + self.pending) / 2
                self.cache = {"cond": mean, "uncond": mean}
        return out


def _split_processor(state: _State, inner) -> _SplitCfgProcessor:
    cls = type(inner)

    def call(self, attn, *args, **kw):
        return _SplitCfgProcessor.__call__(self, attn, *args, **kw)

    call.__wrapped__ = cls.__call__
    return type(f"SplitCfg{cls.__name__}", (_SplitCfgProcessor,), {"__call__": call})(state, inner)


class SplitCfgOracleDenoiser(StandIn):
    """The reference semantics on a pipeline that runs CFG as two calls a step, conditional first (Wan).

    Before the gate both calls run, each with its own self-attention cache; at the gate step each
    attention's cache is the mean of the two calls' outputs; after it the conditional call runs with the
    caches and the unconditional call returns the same prediction (the pipeline's guidance is then an
    identity), as the reference drops guidance on a CFG batch.
    """

    def __init__(self, denoiser, *, gate_step: int, sp_interval: int, fi_interval: int, warm_up: int):
        super().__init__(denoiser)
        self.settings = (gate_step, sp_interval, fi_interval, warm_up)
        self.state = _State()
        self.calls = 0
        self.last = None
        self.original_processors = denoiser.attn_processors
        denoiser.set_attn_processor({name: _split_processor(self.state, processor)
                                     for name, processor in self.original_processors.items()})

    def close(self):
        self.denoiser.set_attn_processor(self.original_processors)

    def forward(self, *args, **kwargs):
        step, first = divmod(self.calls, 2)[0], self.calls % 2 == 0
        self.calls += 1
        self.state.ca, self.state.sa, self.state.keep_shape = reference_schedule(step, *self.settings)
        self.state.role = "cond" if first else "uncond"
        post_gate = step >= self.settings[0]
        if post_gate and not first:
            return self.last
        with bypassed(self.denoiser):
            out = self.denoiser(*args, **kwargs)
        self.last = out
        return out


def run_split_cfg_oracle(pipe, denoiser_attr: str, denoiser, *, gate_step: int, sp_interval: int, fi_interval: int,
                         warm_up: int, **call_kwargs):
    """Run ``pipe(**call_kwargs)`` once with :class:`SplitCfgOracleDenoiser` around the eager ``denoiser``."""
    installed = getattr(pipe, denoiser_attr)
    oracle = SplitCfgOracleDenoiser(denoiser, gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval,
                                    warm_up=warm_up)
    object.__setattr__(pipe, denoiser_attr, oracle)
    try:
        with bypassed(denoiser):
            return pipe(**call_kwargs)
    finally:
        oracle.close()
        object.__setattr__(pipe, denoiser_attr, installed)
