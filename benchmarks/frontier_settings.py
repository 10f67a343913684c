"""The settings of the quality frontier (``benchmarks/quality.py``): tgate_fx's methods and the peers.

Each :class:`Setting` knows how to install itself on a pipeline and what to do
around each pipeline call; :func:`settings_for` lists them for one testbed,
and :func:`not_applicable` says which methods and peers do not apply there,
and why.

* **tgate_fx** (one shared pipeline; ``tgate_fx.optimize`` again for each
  setting, which keeps the captured graphs): T-GATE at a gate-step sweep, its
  two ablations, DeepCache intervals (UNet), ToDo factors, T-GATE + ToDo,
  T-GATE + DeepCache (UNet), and ToCa at a few ratios when
  ``tgate_fx.methods.METHODS`` has ``"toca"`` (found at run time).
* **peers** (a freshly loaded pipeline each, so that nothing is left behind):
  diffusers' Pyramid Attention Broadcast, FasterCache, FirstBlockCache and
  TaylorSeer (``diffusers.hooks``; the shapes denoisers have no ``CacheMixin``,
  so the hooks are applied with ``apply_...`` and reset before each call, and
  a cache context is set, as ``CacheMixin`` and the pipelines that use it
  would), ``tomesd`` and the published ``DeepCache`` (UNet).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import tgate_fx
from tgate_fx import BlockCacheConfig, DeepCacheConfig, TGateConfig, ToCaConfig, ToDoConfig

__all__ = ["PEER_PACKAGES", "Installed", "Setting", "not_applicable", "settings_for"]

# testbed -> the published T-GATE schedule that is its default here: SD (10, 5, 1, 2); PixArt (15, 3, 1, 2),
# as published for 25 steps (the DiT testbed runs 20).
# FLUX: T-GATE's joint-attention rule has no published schedule; TGateConfig's defaults (gate 10) are the middle
# of its sweep (self-attention reuse does not apply: FLUX's blocks have no separate self-attention).
DEFAULT_TGATE = {"unet": TGateConfig(10, 5, 1, 2), "dit": TGateConfig(15, 3, 1, 2), "flux": TGateConfig()}
GATE_SWEEP = {"unet": (3, 5, 8, 10, 15, 20), "dit": (4, 6, 8, 10, 12, 15), "flux": (4, 6, 8, 10, 12, 15, 18)}
# Python packages of the peers, per testbed (checked before the run starts). On FLUX, cache-dit's DBCache rows are
# added when ``cache_dit`` is importable (``pip install cache-dit``) and named as not applicable otherwise.
PEER_PACKAGES = {"unet": {"tomesd": "tomesd==0.1.3", "DeepCache": "DeepCache==0.1.1"}, "dit": {}, "flux": {}}


@dataclass
class Installed:
    """A setting installed on a pipeline: what to call, and what to do around each call and at the end."""

    pipe: Any
    before_call: Callable[[], None] = lambda: None
    after_call: Callable[[], None] = lambda: None
    remove: Callable[[], None] = lambda: None


@dataclass
class Setting:
    """One row of the frontier.

    Attributes:
        name: Row label.
        family: Method or peer it belongs to (one colour in the plot).
        ours: True for tgate_fx's methods, False for peers.
        params: The settings, printable.
        install: ``install(ctx)`` -> :class:`Installed`; ``ctx`` is the :class:`Context`.
    """

    name: str
    family: str
    ours: bool
    params: str
    install: Callable[["Context"], Installed]


@dataclass
class Context:
    """What settings are installed with: the testbed, its step count, and pipelines."""

    testbed: str
    steps: int
    load: Callable[[], Any]  # a freshly loaded pipeline
    _fx_pipe: Any = field(default=None, repr=False)

    def fx_pipe(self):
        """The pipeline shared by every tgate_fx setting (its captured graphs are reused)."""
        if self._fx_pipe is None:
            self._fx_pipe = self.load()
        return self._fx_pipe

    def timesteps(self, pipe) -> list[int]:
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(self.steps)
        return [int(t) for t in scheduler.timesteps]


def _denoiser(pipe):
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


# --- tgate_fx ------------------------------------------------------------------------------------


def _fx(*configs) -> Callable[[Context], Installed]:
    def install(ctx: Context) -> Installed:
        pipe = ctx.fx_pipe()
        tgate_fx.optimize(pipe, methods=list(configs))
        return Installed(pipe)

    return install


def _describe(config) -> str:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    shown = {k: v for k, v in fields.items() if k in ("gate_step", "sp_interval", "fi_interval", "warm_up")
             or v != defaults[k]}
    return f"{type(config).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def _tgate_fx_settings(testbed: str, steps: int) -> list[Setting]:
    if testbed == "flux":
        return _flux_settings(steps)
    d = DEFAULT_TGATE[testbed]
    out = []
    for g in GATE_SWEEP[testbed]:
        c = dataclasses.replace(d, gate_step=g)
        out.append(Setting(f"T-GATE gate {g}" + (" (published)" if g == d.gate_step else ""), "T-GATE", True,
                           _describe(c), _fx(c)))
    gate_only = TGateConfig(d.gate_step, 1, 1, 0)
    out.append(Setting(f"T-GATE gate only (gate {d.gate_step})", "T-GATE ablation", True,
                       _describe(gate_only) + ": cross-attention cached and CFG dropped after the gate, "
                       "no self-attention reuse", _fx(gate_only)))
    sa_only = TGateConfig(steps, d.sp_interval, 1, d.warm_up)
    out.append(Setting(f"T-GATE self-attn reuse only (sp {d.sp_interval})", "T-GATE ablation", True,
                       _describe(sa_only) + ": the gate is the last step, so cross-attention is never reused "
                       "and CFG never dropped; self-attention reused before it as in the published schedule",
                       _fx(sa_only)))
    nothing = TGateConfig(steps, 1, 1, 0)
    out.append(Setting("tgate_fx graphs, nothing reused", "tgate_fx graphs", True,
                       _describe(nothing) + ": every step computes everything; the captured FX graphs "
                       "without any reuse (what the graphs alone change in time)", _fx(nothing)))
    if testbed == "unet":
        for interval in (2, 3, 5):
            c = DeepCacheConfig(interval, 0)
            out.append(Setting(f"DeepCache interval {interval}", "DeepCache", True, _describe(c), _fx(c)))
        todo = [ToDoConfig(2), ToDoConfig(4), ToDoConfig(2, factor_depth2=2)]
    else:
        todo = [ToDoConfig(1, factor_depth2=2), ToDoConfig(1, factor_depth2=4)]
    for c in todo:
        label = f"ToDo {c.factor}" if testbed == "unet" else f"ToDo depth-2 {c.factor_depth2}"
        if testbed == "unet" and c.factor_depth2 > 1:
            label += f", depth-2 {c.factor_depth2}"
        out.append(Setting(label, "ToDo", True, _describe(c), _fx(c)))
    both = (d, todo[0])
    out.append(Setting(f"T-GATE {d.gate_step} + {'ToDo 2' if testbed == 'unet' else 'ToDo depth-2 2'}",
                       "T-GATE + ToDo", True, " + ".join(_describe(c) for c in both), _fx(*both)))
    if testbed == "unet":
        both = (TGateConfig(10, 1, 1, 0), DeepCacheConfig(3, 0))
        out.append(Setting("T-GATE 10 + DeepCache 3 (paper)", "T-GATE + DeepCache", True,
                           " + ".join(_describe(c) for c in both), _fx(*both)))
    if testbed == "dit":
        out += _toca_settings(testbed)
    return out


def _flux_settings(steps: int) -> list[Setting]:
    """tgate_fx on FLUX: T-GATE's joint-attention rule at a gate sweep, ToCa, the block cache, their compositions.

    The block-cache rows and T-GATE + ToCa are listed even where ``optimize``
    refuses them on this testbed: they show as rows that did not run, with
    the reason.
    """
    out = []
    for g in GATE_SWEEP["flux"]:
        c = TGateConfig(gate_step=g)
        out.append(Setting(f"T-GATE joint gate {g}", "T-GATE", True,
                           _describe(c) + ": text keys, values and text-stream output of each double-stream "
                           "block reused after the gate, unconditional call dropped", _fx(c)))
    nothing = TGateConfig(steps, 1, 1, 0)
    out.append(Setting("tgate_fx graphs, nothing reused", "tgate_fx graphs", True,
                       _describe(nothing) + ": every step computes everything; the captured FX graphs "
                       "without any reuse (what the graphs alone change in time)", _fx(nothing)))
    toca = [ToCaConfig(), ToCaConfig(ratio=0.05), ToCaConfig(ratio=0.3), ToCaConfig(interval=6)]
    labels = ["ToCa defaults", "ToCa ratio 0.05", "ToCa ratio 0.3", "ToCa interval 6"]
    for label, c in zip(labels, toca):
        params = _describe(c) + (" (FLUX defaults: interval 4, ratio 0.10)" if label == "ToCa defaults" else "")
        out.append(Setting(label, "ToCa", True, params, _fx(c)))
    caches = [BlockCacheConfig(threshold=t) for t in (0.05, 0.1, 0.2, 0.3, 0.4)] + \
        [BlockCacheConfig(fora_interval=i) for i in (2, 3, 4, 5)]
    for c in caches:
        label = f"block cache FORA {c.fora_interval}" if c.fora_interval else f"block cache {c.threshold}"
        out.append(Setting(label, "block cache", True, _describe(c), _fx(c)))
    bc = BlockCacheConfig(threshold=0.1)
    for other, label, family in ((TGateConfig(gate_step=10), "block cache 0.1 + T-GATE joint gate 10",
                                  "block cache + T-GATE"),
                                 (ToCaConfig(), "block cache 0.1 + ToCa defaults", "block cache + ToCa")):
        out.append(Setting(label, family, True, _describe(bc) + " + " + _describe(other), _fx(bc, other)))
    # further along: each cache with ToCa on the steps it computes
    for c in (BlockCacheConfig(threshold=0.2), BlockCacheConfig(threshold=0.3), BlockCacheConfig(fora_interval=3),
              BlockCacheConfig(fora_interval=4)):
        label = f"block cache FORA {c.fora_interval}" if c.fora_interval else f"block cache {c.threshold}"
        out.append(Setting(label + " + ToCa defaults", "block cache + ToCa", True,
                           _describe(c) + " + " + _describe(ToCaConfig()), _fx(c, ToCaConfig())))
    # DeepCache and ToDo: rows so that optimize's answer on FLUX is recorded (it refuses or runs them).
    out.append(Setting("DeepCache interval 3", "DeepCache", True, _describe(DeepCacheConfig(3, 0)),
                       _fx(DeepCacheConfig(3, 0))))
    out.append(Setting("ToDo 2", "ToDo", True, _describe(ToDoConfig(2)), _fx(ToDoConfig(2))))
    both = (TGateConfig(gate_step=10), ToCaConfig())
    out.append(Setting("T-GATE joint gate 10 + ToCa defaults", "T-GATE + ToCa", True,
                       " + ".join(_describe(c) for c in both), _fx(*both)))
    return out


def _toca_settings(testbed: str) -> list[Setting]:
    """ToCa at its defaults and a few fresh ratios, if this tgate_fx has it (``METHODS["toca"]``).

    The config's field names are read from its dataclass: the first field whose
    name has ``ratio`` in it is the fresh ratio varied here; the first with
    ``interval`` the full-step interval. The official PixArt default is
    interval 3, ratio 0.30.
    """
    from tgate_fx.methods import METHODS

    if "toca" not in METHODS:
        return []
    cls = METHODS["toca"].config_class
    names = [f.name for f in dataclasses.fields(cls)]
    ratio = next((n for n in names if "ratio" in n), None)
    interval = next((n for n in names if "interval" in n), None)
    variants: list[dict] = [{}]
    if ratio:
        variants += [{ratio: r} for r in (0.1, 0.5)]
    if interval:
        variants += [{interval: 5}]
    out = []
    for kwargs in variants:
        try:
            config = cls(**kwargs)
        except Exception as e:  # a field this guess got wrong: shown as a row that did not run
            config, error = None, e
        label = "ToCa " + (", ".join(f"{k} {v}" for k, v in kwargs.items()) or "defaults")
        if config is None:
            out.append(Setting(label, "ToCa", True, f"{cls.__name__}(**{kwargs})", _raise(error)))
        else:
            out.append(Setting(label, "ToCa", True, _describe(config), _fx(config)))
    # T-GATE composes with ToCa when it reuses no self-attention (sp_interval = fi_interval = 1): ToCa owns the
    # self-attention and MLP caches, T-GATE the cross-attention one after the gate.
    gate = DEFAULT_TGATE[testbed].gate_step
    both = (TGateConfig(gate, 1, 1, 0), cls())
    out.append(Setting(f"T-GATE gate only {gate} + ToCa defaults", "T-GATE + ToCa", True,
                       " + ".join(_describe(c) for c in both), _fx(*both)))
    return out


def _raise(error: Exception):
    def install(ctx):
        raise error

    return install


# --- peers ---------------------------------------------------------------------------------------


def _clock(pipe) -> Callable[[], int]:
    """The current timestep, read from the scheduler's ``scale_model_input`` (called just before the denoiser)."""
    state = {"t": 1000}
    scale = pipe.scheduler.scale_model_input

    @functools.wraps(scale)
    def scale_model_input(sample, timestep=None, *args, **kwargs):
        state["t"] = int(timestep)
        return scale(sample, timestep, *args, **kwargs)

    pipe.scheduler.scale_model_input = scale_model_input
    return lambda: state["t"]


def _hooks(apply: Callable[[torch.nn.Module, Callable[[], int], list[int]], None]) -> Callable[[Context], Installed]:
    """A diffusers hook peer on a fresh pipeline: applied once, reset and given a cache context before each call."""

    def install(ctx: Context) -> Installed:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        pipe = ctx.load()
        clock = _clock(pipe)
        net = _denoiser(pipe)
        apply(net, clock, ctx.timesteps(pipe))
        registry = HookRegistry.check_if_exists_or_initialize(net)
        registry.invalidate_child_registries_cache()

        def before():
            # CacheMixin.cache_context would do this for a model that has it; the shapes denoisers do not,
            # and their pipelines call the denoiser once per step with the CFG halves in one batch.
            registry.reset_stateful_hooks(recurse=True)
            _set_cache_context(net, CacheContext("cond_uncond"))

        return Installed(pipe, before_call=before, after_call=lambda: _set_cache_context(net, None))

    return install


def _pab(**kwargs):
    def apply(net, clock, timesteps):
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        apply_pyramid_attention_broadcast(net, PyramidAttentionBroadcastConfig(
            **{k: (v(timesteps) if callable(v) else v) for k, v in kwargs.items()}, current_timestep_callback=clock))

    return apply


def _pab_like_tgate(c: TGateConfig):
    """PAB's ranges chosen to reuse what T-GATE ``c`` reuses, on the same steps (``benchmarks/columns.pab_config``).

    Self-attention reused on the steps T-GATE's semantics-planning phase
    reuses; cross-attention reused from the gate on. PAB keeps the CFG batch
    (it does not drop the unconditional half after the gate).
    """
    return _pab(spatial_attention_block_skip_range=c.sp_interval,
                spatial_attention_timestep_skip_range=lambda ts: (ts[c.gate_step - 1], ts[c.warm_up]),
                cross_attention_block_skip_range=10_000,
                cross_attention_timestep_skip_range=lambda ts: (-1, ts[c.gate_step - 1]))


def _faster_cache(**kwargs):
    def apply(net, clock, timesteps):
        from diffusers.hooks import FasterCacheConfig, apply_faster_cache

        apply_faster_cache(net, FasterCacheConfig(**kwargs, tensor_format="BCHW", current_timestep_callback=clock,
                                                  attention_weight_callback=lambda _: 0.5))

    return apply


def _first_block_cache(threshold: float):
    def apply(net, clock, timesteps):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        apply_first_block_cache(net, FirstBlockCacheConfig(threshold=threshold))

    return apply


def _taylorseer(testbed: str, **kwargs):
    # diffusers' default patterns ("^transformer_blocks.*attn") name Flux-style ".attn" modules and match none of
    # PixArt's or the UNet's (attn1, attn2): name the attention and feed-forward modules of every transformer block,
    # the features the TaylorSeer paper predicts. Factors in float32 (the default bfloat16 is for GPUs).
    prefix = "" if testbed == "dit" else r".*"

    def apply(net, clock, timesteps):
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        config = TaylorSeerCacheConfig(**kwargs, taylor_factors_dtype=torch.float32)
        if not config.use_lite_mode:
            config.cache_identifiers = [prefix + r"transformer_blocks\.\d+\.(attn1|attn2|ff)"]
        apply_taylorseer_cache(net, config)

    return apply


def _tomesd(ratio: float) -> Callable[[Context], Installed]:
    def install(ctx: Context) -> Installed:
        import tomesd

        pipe = ctx.load()
        tomesd.apply_patch(pipe, ratio=ratio)
        # tomesd forks torch's default generator for its random partition: seed it for repeatable pictures.
        return Installed(pipe, before_call=lambda: torch.manual_seed(0), remove=lambda: tomesd.remove_patch(pipe))

    return install


def _deepcache_published(interval: int) -> Callable[[Context], Installed]:
    """PyPI ``DeepCache==0.1.1``: a fresh helper enabled before each call and disabled after it (its step
    counter and caches would otherwise carry over; see ``benchmarks/columns._deepcache_published``)."""

    def install(ctx: Context) -> Installed:
        from DeepCache import DeepCacheSDHelper

        pipe = ctx.load()
        state = {}

        def before():
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=interval, cache_branch_id=0)
            helper.enable()
            state["helper"] = helper

        def after():
            helper = state.pop("helper", None)
            if helper is not None:
                helper.disable()

        return Installed(pipe, before_call=before, after_call=after)

    return install


def _cache_mixin(config_of: Callable[[], Any]) -> Callable[[Context], Installed]:
    """A diffusers cache on a denoiser that has ``CacheMixin`` (FLUX): ``enable_cache`` on a fresh pipeline.

    The pipeline sets the ``"cond"``/``"uncond"`` cache contexts itself (true
    CFG calls the transformer twice per step); the hooks' state is reset
    before each pipeline call.
    """

    def install(ctx: Context) -> Installed:
        pipe = ctx.load()
        pipe.transformer.enable_cache(config_of())
        return Installed(pipe, before_call=lambda: pipe.transformer._reset_stateful_cache(),
                         remove=pipe.transformer.disable_cache)

    return install


def _fbc_config(threshold: float):
    def make():
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=threshold)

    return make


def _cache_dit(**kwargs) -> Callable[[Context], Installed]:
    """cache-dit's DBCache (``cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...))``) on a fresh pipeline.

    ``enable_separate_cfg=True``: FluxPipeline's true CFG calls the transformer twice per step (conditional,
    then unconditional); without it cache-dit compares each call's residual with the other branch's and never
    caches (measured: pictures identical to the baseline's at threshold 0.1).
    """

    def install(ctx: Context) -> Installed:
        import cache_dit

        pipe = ctx.load()
        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(**kwargs))
        return Installed(pipe, remove=lambda: cache_dit.disable_cache(pipe))

    return install


def _flux_peers() -> list[Setting]:
    import importlib.util

    out = [Setting(f"FirstBlockCache {t}", "FirstBlockCache", False,
                   f"transformer.enable_cache(FirstBlockCacheConfig(threshold={t}))", _cache_mixin(_fbc_config(t)))
           for t in (0.05, 0.1, 0.2, 0.3, 0.4)]
    if importlib.util.find_spec("cache_dit") is not None:
        for t, warmup in ((0.08, 8), (0.1, 4), (0.2, 4), (0.3, 4), (0.4, 4)):
            kw = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=t, max_warmup_steps=warmup,
                      enable_separate_cfg=True)
            out.append(Setting(f"cache-dit DBCache F1B0 {t}, warm-up {warmup}", "cache-dit DBCache", False,
                               "DBCacheConfig(" + ", ".join(f"{k}={v}" for k, v in kw.items()) + ")"
                               + (" (threshold and warm-up: cache-dit's defaults)" if t == 0.08 else ""),
                               _cache_dit(**kw)))
    return out


def _peer_settings(testbed: str, steps: int) -> list[Setting]:
    if testbed == "flux":
        return _flux_peers()
    d = DEFAULT_TGATE[testbed]
    out = [
        Setting("PAB self 2", "PAB", False, "spatial_attention_block_skip_range=2, timesteps (100, 800)",
                _hooks(_pab(spatial_attention_block_skip_range=2))),
        Setting("PAB self 2, cross 6", "PAB", False,
                "spatial 2, cross_attention_block_skip_range=6, timesteps (100, 800) for both",
                _hooks(_pab(spatial_attention_block_skip_range=2, cross_attention_block_skip_range=6))),
        Setting(f"PAB = T-GATE {d.gate_step}'s reuse", "PAB", False,
                f"self-attention skip {d.sp_interval} on steps {d.warm_up + 1}..{d.gate_step - 2}, cross-attention "
                f"reused from step {d.gate_step} on; CFG kept", _hooks(_pab_like_tgate(d))),
    ]
    if testbed == "dit":
        out += [
            Setting("FasterCache defaults", "FasterCache", False,
                    "spatial skip 2 on t < 681, unconditional branch skip 5 on t < 641, weight 0.5",
                    _hooks(_faster_cache())),
            Setting("FasterCache spatial 3, uncond 10", "FasterCache", False,
                    "spatial_attention_block_skip_range=3, unconditional_batch_skip_range=10",
                    _hooks(_faster_cache(spatial_attention_block_skip_range=3, unconditional_batch_skip_range=10))),
        ]
        out += [Setting(f"FirstBlockCache {t}", "FirstBlockCache", False, f"threshold={t}",
                        _hooks(_first_block_cache(t))) for t in (0.05, 0.1, 0.2)]
    out += [
        Setting("TaylorSeer interval 3", "TaylorSeer", False,
                "cache_interval=3, max_order=1, disable_cache_before_step=3; attn1, attn2, ff of each block",
                _hooks(_taylorseer(testbed, cache_interval=3))),
        Setting("TaylorSeer interval 5", "TaylorSeer", False,
                "cache_interval=5, max_order=1, disable_cache_before_step=3; attn1, attn2, ff of each block",
                _hooks(_taylorseer(testbed, cache_interval=5))),
    ]
    if testbed == "dit":
        out.append(Setting("TaylorSeer lite, interval 5", "TaylorSeer", False,
                           "use_lite_mode=True (blocks skipped, proj_out predicted), cache_interval=5",
                           _hooks(_taylorseer(testbed, cache_interval=5, use_lite_mode=True))))
    if testbed == "unet":
        out += [Setting(f"tomesd {r}", "tomesd", False, f"apply_patch(pipe, ratio={r}) (max_downsample=1)",
                        _tomesd(r)) for r in (0.25, 0.5, 0.75)]
        out += [Setting(f"DeepCache 0.1.1 interval {i}", "DeepCache (published)", False,
                        f"DeepCacheSDHelper.set_params(cache_interval={i}, cache_branch_id=0)",
                        _deepcache_published(i)) for i in (3, 5)]
    return out


def settings_for(testbed: str, steps: int) -> list[Setting]:
    """Every setting of the frontier on ``testbed`` (``"unet"``, ``"dit"`` or ``"flux"``) at ``steps`` steps."""
    if testbed not in DEFAULT_TGATE:
        raise ValueError(f"testbed must be 'unet', 'dit' or 'flux', got {testbed!r}")
    return _tgate_fx_settings(testbed, steps) + _peer_settings(testbed, steps)


def not_applicable(testbed: str) -> list[tuple[str, str]]:
    """(method or peer, why it is not run) on ``testbed``."""
    if testbed == "flux":
        import importlib.util

        out = [
            ("PAB, FasterCache, TaylorSeer (diffusers), tomesd",
             "not in this run: the issue's peers on FLUX are FirstBlockCache and cache-dit's DBCache"),
        ]
        if importlib.util.find_spec("cache_dit") is None:
            out.append(("cache-dit DBCache", "the `cache_dit` package is not installed (pip install cache-dit)"))
        return out
    if testbed == "unet":
        return [
            ("FirstBlockCache (diffusers)", "applies to a denoiser whose top-level children include a list of "
             "transformer blocks (`transformer_blocks`, `blocks`, ...); a UNet has `down_blocks`/`up_blocks`, "
             "so `apply_first_block_cache` finds no block (it fails on an empty list)"),
            ("FasterCache (diffusers)", "its denoiser hook halves every positional tensor argument of the "
             "denoiser to drop the unconditional branch; the SD pipeline passes the timestep positionally as a "
             "0-d tensor, which cannot be halved (RuntimeError at the first skipped step)"),
            ("ToCa", "a method for diffusion transformers (issue 10); not on a UNet"),
        ]
    return [
        ("DeepCache (tgate_fx and the published package), T-GATE + DeepCache",
         "DeepCache cuts a UNet's down/up path; PixArt's transformer has none (`optimize` refuses it)"),
        ("tomesd", "patches diffusers' `BasicTransformerBlock` with the SD forward (no `ada_norm_single`, "
         "PixArt's norm), and merges only at the latent's full resolution (max_downsample=1), which PixArt's "
         "patch-2 tokens never have"),
    ]
