"""onnxruntime baseline vs onnxruntime T-GATE, on scaled-down SD-1.5 and PixArt-alpha architectures.

For each architecture, in one run of this script:

1. build the pipeline of the torch benchmarks' workload (``workloads.py``:
   the published denoiser config scaled down, random seeded weights; what
   is scaled is printed and written to the results);
2. export two bundles with :func:`tgate_fx.export.export_onnx`: the plain
   denoiser (one variant) and T-GATE with the paper's settings for the family;
3. run each in the unmodified pipeline through :class:`~tgate_fx.export.OnnxDenoiser`
   on the CPU provider, 25 steps, ``output_type="latent"``: one warm-up
   generation each, then ``--runs`` generations of each, interleaved, and
   report the medians and their ratio; the time inside the denoiser is
   measured too;
4. check the T-GATE bundle against the torch T-GATE runtime (max |diff| of
   the final latents).

Usage::

    python benchmarks/onnx_bench.py            # both architectures, 5 runs each
    python benchmarks/onnx_bench.py --runs 7 --arch sd15

Writes ``benchmarks/results/onnx.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tgate_fx  # noqa: E402
from tgate_fx.export import OnnxDenoiser, export_onnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import TimedDenoiser, cpu_model  # noqa: E402
from workloads import STEPS, WORKLOADS  # noqa: E402  (the torch benchmark's workloads)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "onnx.md")


def _size(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def bench(key: str, runs: int, workdir: str) -> dict:
    workload = WORKLOADS[key]
    config = workload.tgate
    print(f"\n== {workload.title}, scaled: {workload.scaled}", flush=True)
    pipe = workload.build()
    call = {"height": workload.height, "width": workload.width, **workload.call_kwargs}
    attribute = workload.denoiser_attr
    denoiser = getattr(pipe, attribute)
    weights = sum(t.numel() * t.element_size() for t in [*denoiser.parameters(), *denoiser.buffers()])
    print(f"   denoiser: {sum(p.numel() for p in denoiser.parameters()) / 1e6:.1f} M parameters, "
          f"{weights / 2**20:.1f} MiB", flush=True)
    export_call = dict(call)
    height, width = export_call.pop("height"), export_call.pop("width")
    dirs = {"baseline": os.path.join(workdir, f"{key}_plain"), "tgate": os.path.join(workdir, f"{key}_tgate")}
    for name, directory in dirs.items():
        print(f"-- export {name}", flush=True)
        export_onnx(pipe, directory, height, width, num_inference_steps=STEPS, tgate=(name == "tgate"),
                    config=config, progress=lambda msg: print(f"   {msg}", flush=True), **export_call)

    print("-- torch T-GATE reference generation", flush=True)
    tgate_fx.optimize(pipe, config=config)
    torch_latents = workload.generate(pipe)
    tgate_fx.restore(pipe)

    timed = {name: TimedDenoiser(OnnxDenoiser.from_dir(d, pipeline=pipe)) for name, d in dirs.items()}
    totals: dict[str, list[float]] = {name: [] for name in dirs}
    inside: dict[str, list[float]] = {name: [] for name in dirs}
    cpu: dict[str, list[float]] = {name: [] for name in dirs}
    outputs = {}
    print(f"-- onnxruntime: 1 warm-up + {runs} timed {STEPS}-step generations each, interleaved", flush=True)
    for i in range(runs + 1):
        for name, den in timed.items():
            object.__setattr__(pipe, attribute, den)
            den.times.clear()
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs[name] = workload.generate(pipe)
            total, total_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if i > 0:
                totals[name].append(total)
                inside[name].append(den.seconds)
                cpu[name].append(total_cpu)
            print(f"   {'warm-up' if i == 0 else f'run {i}/{runs}'} {name:8s} {total:6.2f} s "
                  f"(denoiser {den.seconds:6.2f} s, process CPU {total_cpu:6.2f} s)", flush=True)
    object.__setattr__(pipe, attribute, denoiser)
    diff = (outputs["tgate"] - torch_latents).abs().max().item()
    return {
        "key": key, "title": workload.title, "scaled": workload.scaled, "config": config, "weights": weights,
        "params": sum(p.numel() for p in denoiser.parameters()),
        "sizes": {name: _size(d) for name, d in dirs.items()},
        "files": {name: len([f for f in os.listdir(d) if f.endswith(".onnx")]) for name, d in dirs.items()},
        "median": {name: statistics.median(v) for name, v in totals.items()},
        "inside": {name: statistics.median(v) for name, v in inside.items()},
        "cpu": {name: statistics.median(v) for name, v in cpu.items()},
        "runs": totals, "diff": diff, "scale": torch_latents.abs().max().item(),
        "tgate_vs_plain": (outputs["tgate"] - outputs["baseline"]).abs().max().item(),
    }


def _table(results: list[dict]) -> list[str]:
    rows = [("architecture", "baseline (s)", "T-GATE (s)", "speed-up", "denoiser speed-up", "CPU baseline (s)",
             "CPU T-GATE (s)", "CPU-time ratio")]
    for r in results:
        m, d, c = r["median"], r["inside"], r["cpu"]
        rows.append((r["key"], f"{m['baseline']:.2f}", f"{m['tgate']:.2f}", f"{m['baseline'] / m['tgate']:.2f}x",
                     f"{d['baseline'] / d['tgate']:.2f}x", f"{c['baseline']:.2f}", f"{c['tgate']:.2f}",
                     f"{c['baseline'] / c['tgate']:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return lines


def _markdown(results: list[dict], runs: int, load: tuple) -> str:
    import onnxruntime

    out = ["# onnxruntime: baseline vs T-GATE", "",
           f"Measured by `python benchmarks/onnx_bench.py --runs {runs}` on {cpu_model()} with "
           f"{os.cpu_count()} cores (shared: load average {load[0]:.1f} before, {load[1]:.1f} after), "
           f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider (default session options), "
           f"torch {torch.__version__}. Random weights; {STEPS} steps, `output_type=\"latent\"`. "
           f"Each time is the median of {runs} generations after one warm-up; baseline and T-GATE "
           "generations alternate, so both see the same load. Times are wall-clock medians; *denoiser "
           "speed-up* is the ratio of the medians of the time inside `OnnxDenoiser` calls (the rest of "
           "a generation is text encoding and the scheduler); *CPU* is the process CPU time (all threads, "
           "onnxruntime's spinning included), which other processes on a shared machine disturb less "
           "than wall time.", ""]
    out += _table(results)
    for r in results:
        c = r["config"]
        out += ["", f"## {r['key']}: {r['title']}", "",
                f"- Scaled: {r['scaled']}",
                f"- Denoiser: {r['params'] / 1e6:.1f} M parameters, {r['weights'] / 2**20:.1f} MiB of weights.",
                f"- T-GATE: gate_step={c.gate_step}, sp_interval={c.sp_interval}, fi_interval={c.fi_interval}, "
                f"warm_up={c.warm_up}.",
                f"- Bundles: baseline {r['files']['baseline']} model, {r['sizes']['baseline'] / 2**20:.1f} MiB; "
                f"T-GATE {r['files']['tgate']} models, {r['sizes']['tgate'] / 2**20:.1f} MiB "
                f"({r['sizes']['tgate'] / r['weights']:.3f} x the denoiser's weights).",
                f"- Wall time of each run (s): baseline {', '.join(f'{t:.2f}' for t in r['runs']['baseline'])}; "
                f"T-GATE {', '.join(f'{t:.2f}' for t in r['runs']['tgate'])}.",
                f"- ONNX T-GATE vs torch T-GATE final latents: max |diff| {r['diff']:.2e} "
                f"(max |latent| {r['scale']:.3g}); T-GATE vs baseline: {r['tgate_vs_plain']:.3g}."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed generations per variant (default 5, >= 5)")
    parser.add_argument("--arch", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--out", default=RESULTS, help="markdown results file")
    args = parser.parse_args(argv)
    if args.runs < 5:
        parser.error(f"--runs must be >= 5 for a median, got {args.runs}")
    keys = list(WORKLOADS) if args.arch == "all" else [args.arch]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tgate_fx_onnx_bench_") as workdir:
        results = [bench(k, args.runs, workdir) for k in keys]
    load_after = os.getloadavg()[0]
    print()
    print("\n".join(_table(results)))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(_markdown(results, args.runs, (load_before, load_after)))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
