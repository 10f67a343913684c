"""The benchmark columns: how each method is set up on a pipeline, and the worker process that times it.

A worker is one process per (workload, column), so that peak RSS is the
column's own. It builds the pipeline, sets the method up, then obeys lines
on stdin: ``run`` (one 25-step generation; the first is the warm-up that
pays for capture, rewrite and compile) and ``finish`` (report and exit).
Each answer is one JSON line on stdout, prefixed with ``@@``; everything
else the libraries print goes to stderr.

Time inside the denoising loop is read from the scheduler, which every
pipeline here (the reference package's copied ``__call__`` included) calls
around the denoiser: ``scale_model_input`` just before it and ``step`` just
after it. The wrappers sit outside any compiled region.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tgate_fx  # noqa: E402
from workloads import WORKLOADS, Workload  # noqa: E402

__all__ = ["COLUMNS", "CONTRAST_COLUMNS", "Column", "worker_main"]


@dataclass(frozen=True)
class Column:
    """A method to time: its label, whether it is compiled, and its setup."""

    key: str
    label: str
    setup: Callable[["Bench"], None]
    compiled: bool = False
    macs: str = "baseline"  # which MAC count applies: baseline, tgate, pab, deepcache, tgate_deepcache
    unet_only: bool = False  # DeepCache cuts a UNet: not run on transformer workloads


# DeepCache's published setting (DeepCacheSDHelper's README: interval 3, branch 0), and the T-GATE paper's
# T-GATE + DeepCache combination (gate 10, sp 1, fi 1, warm-up 0, with DeepCache interval 3, branch 0).
DEEPCACHE = tgate_fx.DeepCacheConfig(cache_interval=3, cache_branch_id=0)
TGATE_WITH_DEEPCACHE = tgate_fx.TGateConfig(gate_step=10, sp_interval=1, fi_interval=1, warm_up=0)


# --- instrumentation --------------------------------------------------------------------------


class _StepClock:
    """Per-step timestep and denoiser time, read from the scheduler's calls around the denoiser."""

    def __init__(self, scheduler):
        self.timestep: int | None = None
        self.steps: list[float] = []
        self._start = 0.0
        scale, step = scheduler.scale_model_input, scheduler.step

        @functools.wraps(scale)
        def scale_model_input(sample, timestep=None, *args, **kwargs):
            out = scale(sample, timestep, *args, **kwargs)
            self.timestep = int(timestep)
            self._start = time.perf_counter()
            return out

        @functools.wraps(step)
        def step_(*args, **kwargs):
            self.steps.append(time.perf_counter() - self._start)
            return step(*args, **kwargs)

        # Instance attributes; functools.wraps keeps the signatures the pipelines inspect.
        scheduler.scale_model_input = scale_model_input
        scheduler.step = step_


class _DynamoLog(logging.Handler):
    """Counts dynamo's warnings that a frame hit the recompile limit (it then runs eagerly)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.limit_hits = 0
        self.last_reason = ""

    def emit(self, record):
        message = record.getMessage()
        if "recompile_limit" in message or "cache_size_limit" in message:
            self.limit_hits += 1
            # The warning names the guard that failed last: what made dynamo recompile.
            for line in message.splitlines():
                if "last reason:" in line:
                    self.last_reason = line.split("last reason:", 1)[1].strip()[:300]


def _dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "breaks": int(sum(counters["graph_break"].values())),
            "frames": int(counters["frames"].get("total", 0)),
            "fx_cache_hits": int(counters["inductor"].get("fxgraph_cache_hit", 0)),
            "fx_cache_misses": int(counters["inductor"].get("fxgraph_cache_miss", 0))}


class Bench:
    """One column's pipeline and how to run one generation of it."""

    def __init__(self, workload: Workload, column: Column, compile_backend: str = "inductor",
                 compile_options: dict | None = None):
        self.workload = workload
        self.column = column
        self.compile_backend = compile_backend
        self.compile_options = compile_options or {}
        self.pipe = workload.build()
        self.clock = _StepClock(self.pipe.scheduler)
        self.generate: Callable[[], torch.Tensor] = lambda: workload.generate(self.pipe)
        self.info: dict[str, Any] = {}
        self.before_generation: Callable[[], None] = lambda: None  # untimed, before each generation
        self.after_generation: Callable[[], None] = lambda: None  # untimed, after each generation
        self.finish_hooks: list[Callable[[], None]] = []
        column.setup(self)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.workload.denoiser_attr)


# --- setups ---------------------------------------------------------------------------------


def _baseline(b: Bench) -> None:
    pass


def _compile_denoiser(b: Bench) -> None:
    b.denoiser.compile(**_compile_kwargs(b))


def _compile_kwargs(b: Bench) -> dict:
    return {"backend": b.compile_backend, **({"options": b.compile_options} if b.compile_options else {})}


def _tgate_fx(b: Bench, compile: bool = False) -> None:
    options = _compile_kwargs(b) if compile else False
    tgate_fx.optimize(b.pipe, config=b.workload.tgate, compile=options)
    b.finish_hooks.append(lambda: _tgate_fx_info(b))


def _deepcache_fx(b: Bench) -> None:
    tgate_fx.optimize(b.pipe, deepcache=DEEPCACHE)
    b.finish_hooks.append(lambda: _tgate_fx_info(b))


def _tgate_deepcache_fx(b: Bench) -> None:
    tgate_fx.optimize(b.pipe, tgate=TGATE_WITH_DEEPCACHE, deepcache=DEEPCACHE)
    b.finish_hooks.append(lambda: _tgate_fx_info(b))


def _deepcache_published(b: Bench) -> None:
    """PyPI ``DeepCache==0.1.1``: a fresh ``DeepCacheSDHelper`` enabled before each generation, disabled after.

    The helper's step counter and caches survive from one generation to the
    next until ``disable()`` (and enabling twice wraps twice), so each
    generation gets its own, as ``tests/reference_deepcache.py`` does. Enabling
    and disabling only wrap and unwrap ``forward`` methods; both happen outside
    the timed region.
    """
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError as e:
        raise _Skip(f"the published DeepCache package is not importable ({e}); `pip install DeepCache==0.1.1`")
    state = {}

    def enable():
        helper = DeepCacheSDHelper(pipe=b.pipe)
        helper.set_params(cache_interval=DEEPCACHE.cache_interval, cache_branch_id=DEEPCACHE.cache_branch_id,
                          skip_mode=DEEPCACHE.skip_mode)
        helper.enable()
        state["helper"] = helper

    def disable():
        helper = state.pop("helper", None)
        if helper is not None:
            helper.disable()

    b.before_generation = enable
    b.after_generation = disable
    b.info["deepcache_version"] = _dist_version("DeepCache")


def _tgate_fx_info(b: Bench) -> None:
    from tgate_fx.accounting.macs import plan_macs

    runtime = tgate_fx.get_runtime(b.pipe)
    by_batch = {g.capture.signature.tensors[0][1][0]: g for g in runtime.captures}
    plan = runtime.last_plan
    # plan_macs also counts one call at the per-image batch (per_eval, not used here); a plan that never drops
    # the CFG half (DeepCache alone) has no capture at that batch, so it is handed the CFG-batch one.
    counted = plan_macs(lambda batch: by_batch.get(batch) or by_batch[max(by_batch)], plan)
    b.info.update({
        "captures": [{"batch": batch, "seconds": g.capture.seconds,
                      "variants": sorted(v.name for v in g.variants.values())}
                     for batch, g in sorted(by_batch.items())],
        "plan": repr(plan),
        "plan_variants": [s.variant.name for s in plan.steps],
        "real_capture_macs": {"baseline": counted.baseline, "tgate": counted.total},
    })


def _tgate_fx_compiled(b: Bench) -> None:
    _tgate_fx(b, compile=True)


def _reference(b: Bench) -> None:
    try:
        import tgate
    except ImportError as e:
        raise _Skip(f"the reference package `tgate` is not importable ({e}); `pip install tgate==1.0.0`")
    loader = getattr(tgate, b.workload.reference_loader)
    pipe = loader(b.pipe)
    c = b.workload.tgate
    settings = dict(gate_step=c.gate_step, sp_interval=c.sp_interval, fi_interval=c.fi_interval, warm_up=c.warm_up)

    def generate():
        call = b.workload.call()
        # The reference's copied PixArt __call__ predates max_sequence_length; its fixed length is 120.
        call.pop("max_sequence_length", None)
        return pipe.tgate(**call, **settings).images

    b.generate = generate
    b.info["reference_version"] = getattr(tgate, "__version__", None) or _dist_version("tgate")


def pab_config(workload: Workload, timesteps: list[int], clock: _StepClock):
    """The diffusers Pyramid Attention Broadcast setting that reuses what T-GATE reuses, on the same steps.

    PAB recomputes an attention module when the current timestep is outside
    its open range ``(lo, hi)`` or when the module's call count is a multiple
    of its block skip range, and otherwise returns the module's last output.
    With step ``s`` at timestep ``timesteps[s]`` (decreasing) and one call per
    step:

    - self-attention: range = steps ``warm_up+1 .. gate_step-2``, skip range
      ``sp_interval``: reused on the steps T-GATE's semantics-planning phase
      reuses (SD: 3, 4, 6, 7, 8; PixArt: 4, 5, 7, 8, 10, 11, 13); recomputed
      from the gate on (T-GATE's fi_interval = 1);
    - cross-attention: range = steps ``gate_step ..``, skip range larger than
      the steps: reused from the gate on, as T-GATE does.

    What PAB does not do: drop the unconditional CFG half after the gate (its
    batch stays 2B), nor average the cached cross-attention over CFG halves.
    """
    from diffusers import PyramidAttentionBroadcastConfig

    c = workload.tgate
    if c.fi_interval != 1:
        raise ValueError(f"the PAB mapping here assumes fi_interval=1, got {c.fi_interval}")
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=c.sp_interval,
        spatial_attention_timestep_skip_range=(timesteps[c.gate_step - 1], timesteps[c.warm_up]),
        cross_attention_block_skip_range=len(timesteps) + 1,
        cross_attention_timestep_skip_range=(-1, timesteps[c.gate_step - 1]),
        current_timestep_callback=lambda: clock.timestep,
    )


def _pab(b: Bench, compile: bool = False) -> None:
    import copy

    from diffusers.hooks import HookRegistry, apply_pyramid_attention_broadcast

    scheduler = copy.deepcopy(b.pipe.scheduler)
    scheduler.set_timesteps(b.workload.call()["num_inference_steps"])
    timesteps = [int(t) for t in scheduler.timesteps]
    config = pab_config(b.workload, timesteps, b.clock)
    denoiser = b.denoiser
    apply_pyramid_attention_broadcast(denoiser, config)
    b.info["pab_config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()
                            if k.endswith("range")}
    b.info["enable_cache"] = (f"{type(denoiser).__name__}.enable_cache: "
                              f"{'available' if hasattr(denoiser, 'enable_cache') else 'absent (no CacheMixin)'}")
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    # Without CacheMixin, the pipeline's end-of-call reset never reaches the
    # PAB hooks: reset them before each generation, as CacheMixin would.
    b.before_generation = lambda: registry.reset_stateful_hooks(recurse=True)
    if compile:
        _compile_denoiser(b)
    b.finish_hooks.append(lambda: _pab_schedule(b))


def _pab_compiled(b: Bench) -> None:
    _pab(b, compile=True)


def _pab_schedule(b: Bench) -> None:
    """One more, untimed, generation that records which attention modules PAB actually computed at each step."""
    from diffusers.models.attention_processor import Attention

    computed: list[set[str]] = []
    handles = []

    def mark(name):
        def hook(module, args):
            computed[-1].add(name)
        return hook

    for name, module in b.denoiser.named_modules():
        if isinstance(module, Attention):
            handles.append(module.to_q.register_forward_pre_hook(mark(name)))
    scale = b.pipe.scheduler.scale_model_input

    @functools.wraps(scale)
    def new_step(*args, **kwargs):
        computed.append(set())
        return scale(*args, **kwargs)

    b.pipe.scheduler.scale_model_input = new_step
    try:
        b.before_generation()
        b.generate()
        b.after_generation()
    finally:
        for h in handles:
            h.remove()
        b.pipe.scheduler.scale_model_input = scale
    sites = sorted(n for n, m in b.denoiser.named_modules() if isinstance(m, Attention))
    b.info["pab_computed"] = [sorted(s) for s in computed]
    b.info["attention_sites"] = sites


class _Skip(Exception):
    pass


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


COLUMNS: dict[str, Column] = {c.key: c for c in [
    Column("baseline", "baseline", _baseline),
    Column("tgate_fx", "tgate_fx eager", _tgate_fx, macs="tgate"),
    Column("reference", "reference tgate 1.0.0", _reference, macs="tgate"),
    Column("pab", "diffusers PAB", _pab, macs="pab"),
    Column("baseline_compiled", "baseline + torch.compile", _compile_denoiser, compiled=True),
    Column("tgate_fx_compiled", "tgate_fx + torch.compile", _tgate_fx_compiled, compiled=True, macs="tgate"),
    Column("deepcache_fx", "DeepCache (tgate_fx)", _deepcache_fx, macs="deepcache", unet_only=True),
    Column("deepcache_published", "DeepCache (DeepCache 0.1.1)", _deepcache_published, macs="deepcache",
           unet_only=True),
    Column("tgate_deepcache_fx", "T-GATE + DeepCache (tgate_fx)", _tgate_deepcache_fx, macs="tgate_deepcache",
           unet_only=True),
]}

# The compile-counter contrast: the same three methods under torch.compile, two generations each.
CONTRAST_COLUMNS: dict[str, Column] = {c.key: c for c in [
    Column("baseline_compiled", "baseline + torch.compile", _compile_denoiser, compiled=True),
    Column("tgate_fx_compiled", "tgate_fx + torch.compile", _tgate_fx_compiled, compiled=True, macs="tgate"),
    Column("pab_compiled", "diffusers PAB + torch.compile", _pab_compiled, compiled=True, macs="pab"),
]}


# --- the worker process ---------------------------------------------------------------------


def _send(obj: dict) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_main(workload: str, column: str, threads: int, backend: str, latents_path: str,
                compile_options: str = "{}") -> int:
    torch.set_num_threads(threads)
    dynamo_log = _DynamoLog()
    logging.getLogger("torch._dynamo").addHandler(dynamo_log)
    col = {**COLUMNS, **CONTRAST_COLUMNS}[column]
    try:
        start = time.perf_counter()
        bench = Bench(WORKLOADS[workload], col, backend, json.loads(compile_options))
        _send({"ready": True, "setup_seconds": time.perf_counter() - start})
    except _Skip as e:
        _send({"skipped": str(e)})
        return 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    latents = None
    with torch.no_grad():
        for line in sys.stdin:
            command = line.strip()
            if command == "run":
                before = _dynamo_counts()
                bench.clock.steps = []
                bench.before_generation()
                start, cpu = time.perf_counter(), time.process_time()
                latents = bench.generate()
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                bench.after_generation()
                after = _dynamo_counts()
                _send({"wall": wall, "cpu": cpu, "denoiser": sum(bench.clock.steps),
                       "steps": list(bench.clock.steps), "load": os.getloadavg()[0],
                       **{k: after[k] - before[k] for k in after}, "limit_hits": dynamo_log.limit_hits})
            elif command == "finish":
                counts = _dynamo_counts()
                for hook in bench.finish_hooks:
                    hook()
                if latents is not None:
                    torch.save(latents, latents_path)
                _send({"info": bench.info, "dynamo": counts, "limit_hits": dynamo_log.limit_hits,
                       "recompile_reason": dynamo_log.last_reason,
                       "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                       "threads": torch.get_num_threads()})
                return 0
            else:
                raise ValueError(f"unknown worker command {command!r}; expected 'run' or 'finish'")
    return 0
