"""ToCa benchmark: baseline, ToCa, T-GATE, T-GATE + ToCa and diffusers' caches on the scaled PixArt-alpha, one run.

The workload is ``run.py``'s scaled PixArt-alpha transformer (``workloads.py``:
14 blocks of width 216, 784 patch tokens at 448x448 px, 120 text tokens, CFG
4.5, DPM-Solver++), random seeded weights, latent output. Every column runs in
its own child process (``--child COLUMN``), so that its peak memory is its own:
the child builds the pipeline, applies the column, warms up with one
generation of the timed length (tgate_fx captures its graph and builds every
variant there), resets the resident-set high-water mark (``/proc/self/clear_refs``)
and times ``--per-child`` generations. The parent runs ``--rounds`` rounds of
one child per column, the order rotated each round, so that every column sees
the same load; a column's time is the median over all its generations.

Columns:

* ``baseline``: the diffusers pipeline as built.
* ``toca``: ``tgate_fx.optimize(pipe, toca=ToCaConfig())``: the official PixArt
  defaults (N = 3, R = 0.30, the "ToCa" ratio schedule, attention score,
  cache weight 0.25, bonus 0.4 on 4x4 cells).
* ``tgate``: ``tgate_fx.optimize(pipe, tgate=...)``, the published PixArt
  setting scaled to the step count (``--tgate``).
* ``tgate_toca``: T-GATE's gate only (``sp_interval = fi_interval = 1``,
  ``warm_up = 0``; a T-GATE that reuses self-attention is refused with ToCa,
  which owns that cache) + ToCa defaults.
* ``fbc``: ``diffusers.hooks.apply_first_block_cache(threshold=0.1)``.
* ``taylorseer``: ``apply_taylorseer_cache(cache_interval=3, max_order=1,
  disable_cache_before_step=3)`` on ``attn1``, ``attn2`` and ``ff`` of every block
  (diffusers' default patterns name Flux-style ``.attn`` modules only), float32 factors.
* ``pab``: ``apply_pyramid_attention_broadcast(spatial_attention_block_skip_range=2)``
  (self-attention reused every other step for timesteps in (100, 800), diffusers' default range).

PixArt's transformer has no ``CacheMixin``: the hooks are applied with
``apply_...``, reset before each generation, and given the ``"cond_uncond"``
cache context (one denoiser call per step, both CFG halves in one batch), as
``frontier_settings.py`` does.

MACs (Linear + Conv, and with the attention core Q K^T, A V): tgate_fx
columns from ``tgate_fx.plan_macs`` on the architecture (meta device: what
the graph variants compute, gathers/scatters/top-k not counted); diffusers'
caches decide at run time, so their MACs are *executed* MACs counted by
forward hooks on the transformer's Linear/Conv2d modules (and on ``Attention``
for the core) during one extra, untimed generation; the baseline is counted
both ways as a cross-check. MAC-ideal speed-up = baseline MACs / column MACs.

Memory: peak resident set (``VmHWM`` of ``/proc/self/status``) over the timed
generations, reset after the warm-up, so it shows the steady state of a
generation (weights, activations, caches) and not the one-off capture; its
increase over the baseline's is the column's extra memory. For tgate_fx
columns also the bytes of the caches held between steps (every cache tensor of
the last generation, counted once).

Example::

    python benchmarks/toca_bench.py                                    # 25 steps, 3 rounds x 2
    python benchmarks/toca_bench.py --steps 20 --tgate 12,1,1,0 --rounds 2 --per-child 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import machine, require_matplotlib, speedup_bars  # noqa: E402

COLUMNS = ("baseline", "toca", "tgate", "tgate_toca", "fbc", "taylorseer", "pab")
TITLES = {"baseline": "baseline", "toca": "ToCa (tgate_fx, official defaults)", "tgate": "T-GATE (tgate_fx)",
          "tgate_toca": "T-GATE gate + ToCa (tgate_fx)", "fbc": "FirstBlockCache 0.1 (diffusers)",
          "taylorseer": "TaylorSeer interval 3 (diffusers)", "pab": "PAB self 2 (diffusers)"}
FX = ("toca", "tgate", "tgate_toca")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _tgate(args):
    from tgate_fx import TGateConfig

    return TGateConfig(*(int(v) for v in args.tgate.split(",")))


def _methods(column: str, args) -> list:
    from tgate_fx import TGateConfig, ToCaConfig

    gate = _tgate(args)
    toca = ToCaConfig(family="pixart")  # the official PixArt defaults (a Plan made outside optimize needs the family)
    return {"toca": [toca], "tgate": [gate], "tgate_toca": [TGateConfig(gate.gate_step, 1, 1, 0), toca]}[column]


# --- child: one column ------------------------------------------------------------------------

def _clock(pipe):
    state = {"t": 1000}
    scale = pipe.scheduler.scale_model_input

    def scale_model_input(sample, timestep=None, *a, **k):
        state["t"] = int(timestep)
        return scale(sample, timestep, *a, **k)

    pipe.scheduler.scale_model_input = scale_model_input
    return lambda: state["t"]


def _apply(pipe, column: str, args):
    """Apply ``column`` to ``pipe``; returns a callable to run before each generation (or None)."""
    import torch

    import tgate_fx

    if column == "baseline":
        return None
    if column in FX:
        tgate_fx.optimize(pipe, methods=_methods(column, args))
        return None
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    net = pipe.transformer
    clock = _clock(pipe)
    if column == "fbc":
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        apply_first_block_cache(net, FirstBlockCacheConfig(threshold=0.1))
    elif column == "taylorseer":
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        config = TaylorSeerCacheConfig(cache_interval=3, max_order=1, disable_cache_before_step=3,
                                       taylor_factors_dtype=torch.float32)
        config.cache_identifiers = [r"transformer_blocks\.\d+\.(attn1|attn2|ff)"]
        apply_taylorseer_cache(net, config)
    elif column == "pab":
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        apply_pyramid_attention_broadcast(net, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=clock))
    else:
        raise SystemExit(f"unknown column {column!r}")
    registry = HookRegistry.check_if_exists_or_initialize(net)
    registry.invalidate_child_registries_cache()

    def before():
        registry.reset_stateful_hooks(recurse=True)
        _set_cache_context(net, CacheContext("cond_uncond"))

    return before


def _vm_hwm() -> int:
    """Peak resident set of this process since the last reset, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _count_executed(pipe, run) -> dict:
    """Linear/Conv2d MACs (and the attention core's) the transformer executes during ``run()``."""
    import torch
    from diffusers.models.attention_processor import Attention

    totals = {"linear_conv": 0, "core": 0}
    handles = []

    def linear(mod, inp, out):
        totals["linear_conv"] += out.numel() * mod.in_features

    def conv(mod, inp, out):
        k = mod.weight.shape[1] * mod.weight.shape[2] * mod.weight.shape[3]
        totals["linear_conv"] += out.numel() * k

    def attention(mod, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        context = hidden if context is None else context
        b, n, _ = hidden.shape
        inner = mod.inner_dim
        totals["core"] += 2 * b * n * context.shape[1] * inner

    for m in pipe.transformer.modules():
        if isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_hook(linear))
        elif isinstance(m, torch.nn.Conv2d):
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, Attention):
            handles.append(m.register_forward_hook(attention, with_kwargs=True))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {"linear_conv": totals["linear_conv"], "with_core": totals["linear_conv"] + totals["core"]}


def _cache_bytes(pipe) -> dict:
    """Bytes of the caches tgate_fx holds between steps, per method (``tgate_fx.accounting.report.cache_memory``)."""
    import tgate_fx
    from tgate_fx.accounting.report import cache_memory

    out: dict[str, int] = {}
    for graphs in tgate_fx.get_runtime(pipe).captures:
        for method, (size, _) in cache_memory(graphs).items():
            out[method] = max(out.get(method, 0), size)
    return out


def child(args) -> int:
    import torch

    from workloads import WORKLOADS

    torch.set_num_threads(args.threads)
    column = args.child
    workload = WORKLOADS["pixart"]
    pipe = workload.build()
    before = _apply(pipe, column, args)
    call = {**workload.call(), "num_inference_steps": args.steps}

    def generate():
        if before is not None:
            before()
        return pipe(**{**call, "generator": torch.Generator().manual_seed(0)}).images

    start = time.perf_counter()
    generate()
    warm = time.perf_counter() - start
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident set
        f.write("5")
    rss_before = _vm_hwm()
    times, cpu, images = [], [], None
    for _ in range(args.per_child):
        start, start_cpu = time.perf_counter(), time.process_time()
        images = generate()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = _vm_hwm()
    res = {"column": column, "warm": warm, "times": times, "cpu_times": cpu, "peak_rss": peak,
           "rss_after_warmup": rss_before}
    if column in FX:
        res["cache_bytes"] = _cache_bytes(pipe)
        import tgate_fx

        res["variants"] = len({s.variant.name for s in tgate_fx.get_runtime(pipe).last_plan.steps})
    else:
        res["executed_macs"] = _count_executed(pipe, generate)
    torch.save(images, args.latents)
    print(json.dumps(res))
    return 0


# --- parent -----------------------------------------------------------------------------------

def count_macs(args) -> dict:
    """Per tgate_fx column (and the baseline), ``{"linear_conv": MACs, "with_core": MACs}`` of one generation."""
    from tgate_fx.accounting.macs import plan_macs
    from tgate_fx.archs import ArchGraphs, arch_from_pipeline
    from tgate_fx.core.plan import Plan
    from workloads import WORKLOADS

    w = WORKLOADS["pixart"]
    pipe = w.build()
    graphs = ArchGraphs(arch_from_pipeline(pipe, height=w.height, width=w.width), progress=lambda m: None)
    out: dict[str, dict] = {}
    for key, inc in (("linear_conv", False), ("with_core", True)):
        for column in FX:
            methods = _methods(column, args)
            counted = plan_macs(graphs, Plan(args.steps, methods, cfg=True), include_attention=inc)
            out.setdefault("baseline", {})[key] = counted.baseline
            out.setdefault(column, {})[key] = counted.total
    return out


def run(args, argv, on_round=None) -> dict:
    import torch

    columns = [c for c in args.columns.split(",") if c]
    for c in columns:
        if c not in COLUMNS:
            raise SystemExit(f"unknown column {c!r}; choose from {', '.join(COLUMNS)}")
    _log("counting MACs on the meta device ...")
    macs = count_macs(args)
    res = {"steps": args.steps, "threads": args.threads, "rounds": 0, "per_child": args.per_child,
           "columns": columns, "tgate": args.tgate, "macs": macs, "children": {c: [] for c in columns},
           "loads": [os.getloadavg()[0]], "machine": machine(), "diffs": {}}
    tmp = tempfile.mkdtemp(prefix="toca_bench_")
    latents = {}
    for r in range(args.rounds):
        order = columns[r % len(columns):] + columns[:r % len(columns)]
        for c in order:
            path = os.path.join(tmp, f"{c}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", c, "--latents", path,
                   *[a for a in argv if not a.startswith("--child")]]
            _log(f"round {r + 1}: {c} ...")
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                _log(done.stderr[-3000:])
                res["children"][c].append({"error": done.stderr.strip().splitlines()[-1]})
                continue
            child_res = json.loads(done.stdout.strip().splitlines()[-1])
            res["children"][c].append(child_res)
            latents[c] = torch.load(path)
            _log(f"  {c}: {', '.join(f'{t:.2f}' for t in child_res['times'])} s, peak RSS "
                 f"{child_res['peak_rss'] / 2**20:.0f} MiB")
        res["loads"].append(os.getloadavg()[0])
        res["rounds"] = r + 1
        if "baseline" in latents:
            res["diffs"] = {c: float((o - latents["baseline"]).abs().max()) for c, o in latents.items()}
            res["baseline_abs_max"] = float(latents["baseline"].abs().max())
        if on_round is not None:
            on_round(res)
    return res


def _median_time(runs: list, key: str = "times") -> float | None:
    times = [t for run in runs if key in run for t in run[key]]
    return statistics.median(times) if times else None


def _col_macs(res: dict, c: str) -> dict | None:
    if c in res["macs"]:
        return res["macs"][c]
    runs = [run for run in res["children"][c] if "executed_macs" in run]
    return runs[-1]["executed_macs"] if runs else None


def write_markdown(res: dict, path: str, argv: list[str], wall: float) -> None:
    from tgate_fx.accounting.macs import format_macs
    from workloads import WORKLOADS

    w = WORKLOADS["pixart"]
    med = {c: _median_time(res["children"][c]) for c in res["columns"]}
    med_cpu = {c: _median_time(res["children"][c], "cpu_times") for c in res["columns"]}
    base = med.get("baseline")
    base_macs = res["macs"]["baseline"]
    executed_base = _col_macs({"macs": {}, "children": res["children"]}, "baseline")
    peak = {c: statistics.median([run["peak_rss"] for run in res["children"][c] if "peak_rss" in run] or [0])
            for c in res["columns"]}
    out = ["# ToCa benchmark: ToCa, T-GATE, T-GATE + ToCa and diffusers' caches on the scaled PixArt-alpha", "",
           f"Written by `python benchmarks/toca_bench.py {' '.join(argv)}`".rstrip() + " on "
           f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, in {wall / 60:.1f} min.", "",
           "## Setting", "",
           f"- Workload: the scaled PixArt-alpha of `benchmarks/workloads.py` at {w.height}x{w.width} px "
           f"({(w.height // 16) * (w.width // 16)} patch tokens), random weights; {res['steps']} DPM-Solver++ "
           f"steps, CFG 4.5, latent output. Scaled against the published model: {w.scaled}",
           f"- T-GATE: `TGateConfig({res['tgate']})`; T-GATE + ToCa: its gate only "
           f"(`sp_interval = fi_interval = 1`, `warm_up = 0`) + `ToCaConfig()`. The peers' settings are in the "
           "script's docstring.",
           f"- One child process per column and round ({res['per_child']} timed generation(s) each after one "
           f"warm-up generation), {res['threads']} torch thread(s), {res['rounds']} round(s), order rotated.",
           f"- Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; torch {res['machine']['torch']}, "
           f"diffusers {res['machine']['diffusers']}, Python {res['machine']['python']}. 1-minute load average "
           f"{min(res['loads']):.2f}-{max(res['loads']):.2f} (shared machine).",
           "- Peak memory: the child's resident-set high-water mark (`VmHWM`) over its timed generations, "
           "reset after the warm-up (`/proc/self/clear_refs`); 'extra' is its excess over the baseline's.", "",
           "## Results", "",
           "*CPU s*: the process's CPU time (`time.process_time()`) of one generation, one thread: on a shared "
           "machine it moves far less with the load than wall time does; *CPU speed-up* compares those.", "",
           "| column | median s (min-max) | speed-up | median CPU s | CPU speed-up | MACs (Linear+Conv) | MAC-ideal | MACs (+ core) "
           "| MAC-ideal (+ core) | speed-up / ideal (+ core) | peak RSS MiB (extra) | caches held MiB "
           "| max abs diff vs baseline |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in res["columns"]:
        times = [t for run in res["children"][c] if "times" in run for t in run["times"]]
        m = _col_macs(res, c)
        if not times or m is None:
            errors = [run.get("error") for run in res["children"][c] if "error" in run]
            out.append(f"| {TITLES[c]} | failed: {errors[-1] if errors else 'not run'} |" + " |" * 11)
            continue
        ref = base_macs if c in res["macs"] else (executed_base or base_macs)
        lin, core = ref["linear_conv"] / m["linear_conv"], ref["with_core"] / m["with_core"]
        speed = base / med[c] if base else float("nan")
        caches = [run.get("cache_bytes") for run in res["children"][c] if run.get("cache_bytes")]
        held = f"{sum(caches[-1].values()) / 2**20:.1f}" if caches else "-"
        cpu_cells = (f"{med_cpu[c]:.2f} | {med_cpu['baseline'] / med_cpu[c]:.2f}x"
                     if med_cpu.get(c) and med_cpu.get("baseline") else "- | -")
        out.append(f"| {TITLES[c]} | {med[c]:.2f} ({min(times):.2f}-{max(times):.2f}) | {speed:.2f}x | {cpu_cells} "
                   f"| {format_macs(m['linear_conv'])} | {lin:.2f}x | {format_macs(m['with_core'])} | {core:.2f}x "
                   f"| {speed / core:.2f} | {peak[c] / 2**20:.0f} ({(peak[c] - peak.get('baseline', 0)) / 2**20:+.0f}) "
                   f"| {held} | {res['diffs'].get(c, float('nan')):.3g} |")
    out += ["", "MACs of the tgate_fx columns and the baseline's MAC-ideal reference: `plan_macs` on the "
            "architecture; of diffusers' caches: executed MACs counted by forward hooks in an extra, untimed "
            "generation (reference: the baseline counted the same way"
            + (f", {format_macs(executed_base['linear_conv'])} Linear+Conv vs plan_macs "
               f"{format_macs(base_macs['linear_conv'])}" if executed_base else "") + "). "
            "Warm-up (first generation; tgate_fx captures and builds every variant there): "
            + ", ".join(f"{c} {statistics.median([r['warm'] for r in res['children'][c] if 'warm' in r]):.1f} s"
                        for c in res["columns"] if any('warm' in r for r in res['children'][c]))
            + ". Graph variants per generation: "
            + ", ".join(f"{c} {runs[-1]['variants']}" for c in FX
                        if (runs := [r for r in res["children"].get(c, []) if "variants" in r])) + ".", "",
            "## Goal (issue 10, item 9)", ""]
    if "toca" in res["macs"] and med.get("toca") and base:
        ideal = base_macs["with_core"] / res["macs"]["toca"]["with_core"]
        got = base / med["toca"]
        out.append(f"- ToCa's speed-up >= 0.8 x its MAC-ideal with the attention core ({0.8 * ideal:.2f}x of "
                   f"{ideal:.2f}x): {got:.2f}x ({got / ideal:.2f} of ideal), "
                   f"{'met' if got >= 0.8 * ideal else 'missed'} (wall time).")
        if med_cpu.get("toca") and med_cpu.get("baseline"):
            got = med_cpu["baseline"] / med_cpu["toca"]
            out.append(f"- The same in CPU time: {got:.2f}x ({got / ideal:.2f} of ideal), "
                       f"{'met' if got >= 0.8 * ideal else 'missed'}.")
    out += ["", "## Times per child (s)", "", "| column | " + " | ".join(f"round {r + 1}" for r in range(res["rounds"]))
            + " |", "|---|" + "---|" * res["rounds"]]
    for c in res["columns"]:
        cells = [", ".join(f"{t:.2f}" + (f" (CPU {u:.2f})" if u is not None else "")
                           for t, u in zip(run["times"], run.get("cpu_times") or [None] * len(run["times"])))
                 if "times" in run else "failed"
                 for run in res["children"][c]]
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(res, f, indent=1, default=str)


def plot(res: dict, path: str) -> None:
    # CPU time where the children recorded it (it follows the load far less than wall time does)
    key = "cpu_times" if _median_time(res["children"]["baseline"], "cpu_times") else "times"
    cols = [c for c in res["columns"] if _median_time(res["children"][c], key) and _col_macs(res, c)]
    base = _median_time(res["children"]["baseline"], key)
    executed_base = _col_macs({"macs": {}, "children": res["children"]}, "baseline")
    ideal = []
    for c in cols:
        ref = res["macs"]["baseline"] if c in res["macs"] else (executed_base or res["macs"]["baseline"])
        ideal.append(ref["with_core"] / _col_macs(res, c)["with_core"])
    speedup_bars(path, [TITLES[c] for c in cols],
                 {f"measured ({'CPU' if key == 'cpu_times' else 'wall'} time)":
                  [base / _median_time(res["children"][c], key) for c in cols],
                  "MAC-ideal (+ attention core)": ideal},
                 f"scaled PixArt-alpha, 448x448, {res['steps']} steps")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one child process per column")
    parser.add_argument("--per-child", type=int, default=2, help="timed generations per child")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady on a busy machine)")
    parser.add_argument("--columns", default=",".join(COLUMNS))
    parser.add_argument("--tgate", default="15,3,1,2", metavar="G,SP,FI,WU",
                        help="T-GATE settings (default: the published PixArt 15,3,1,2 for 25 steps)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "toca_bench.md"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--latents", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    require_matplotlib(args.no_plot)
    if "baseline" not in args.columns.split(","):
        raise SystemExit("the baseline column is needed (speed-ups are against it)")
    start = time.perf_counter()
    res = run(args, argv, on_round=lambda partial: write_markdown(partial, args.out, argv,
                                                                  time.perf_counter() - start))
    write_markdown(res, args.out, argv, time.perf_counter() - start)
    if not args.no_plot:
        plot(res, os.path.splitext(args.out)[0] + ".png")
    with open(args.out) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
