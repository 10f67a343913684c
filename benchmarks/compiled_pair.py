"""Compiled tgate_fx against the compiled baseline, in one process, step by step.

`run.py` times every column in its own process (so that each has its own
peak RSS). This script checks the compiled columns' ratio without that
between-process difference: both pipelines of one workload live in the same
process, are compiled with inductor, and alternate generation by generation.
The time of every denoiser call is recorded from outside the compiled code,
so per-step ratios show which phases of the plan gain or lose.

Usage::

    python benchmarks/compiled_pair.py                     # sd15, 7 timed generations each
    python benchmarks/compiled_pair.py --workload pixart --runs 5

Writes ``benchmarks/results/compiled_pair_<workload>.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tgate_fx  # noqa: E402
from tgate_fx.accounting._format import table  # noqa: E402
from common import TimedDenoiser, cpu_model  # noqa: E402
from workloads import STEPS, WORKLOADS  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=list(WORKLOADS), default="sd15")
    parser.add_argument("--runs", type=int, default=7, help="timed generations of each pipeline (>= 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier when shared)")
    parser.add_argument("--compile-options", default="{}",
                        help='JSON dict of inductor options for both pipelines, e.g. \'{"freezing": true}\'')
    parser.add_argument("--out", default=None, help="markdown file (default results/compiled_pair_<workload>.md)")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error(f"--runs must be >= 3, got {args.runs}")
    try:
        options = json.loads(args.compile_options)
        if not isinstance(options, dict):
            raise ValueError
    except ValueError:
        parser.error(f"--compile-options must be a JSON object, got {args.compile_options!r}")
    compile_kwargs = {"options": options} if options else {}
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload]
    attr = workload.denoiser_attr
    load = [os.getloadavg()[0]]

    print(f"[{workload.name}] building both pipelines", flush=True)
    tgate, base = workload.build(), workload.build()
    tgate_fx.optimize(tgate, config=workload.tgate, compile=compile_kwargs or True)
    getattr(base, attr).compile(**compile_kwargs)
    runtime = tgate_fx.get_runtime(tgate)
    timed = {"tgate_fx": TimedDenoiser(getattr(tgate, attr)), "baseline": TimedDenoiser(getattr(base, attr))}
    pipes = {"tgate_fx": tgate, "baseline": base}
    for name, pipe in pipes.items():
        object.__setattr__(pipe, attr, timed[name])
        start = time.perf_counter()
        workload.generate(pipe)
        print(f"[{workload.name}] warm-up (capture + inductor compile) {name}: "
              f"{time.perf_counter() - start:.1f} s", flush=True)

    walls: dict[str, list[float]] = {name: [] for name in pipes}
    steps: dict[str, list[list[float]]] = {name: [] for name in pipes}
    for i in range(args.runs):
        order = list(pipes) if i % 2 == 0 else list(pipes)[::-1]
        for name in order:
            timed[name].times.clear()
            start = time.perf_counter()
            workload.generate(pipes[name])
            walls[name].append(time.perf_counter() - start)
            steps[name].append(list(timed[name].times))
        print(f"[{workload.name}] run {i + 1}/{args.runs}: "
              + ", ".join(f"{n} {walls[n][-1]:.2f} s" for n in pipes), flush=True)
    load.append(os.getloadavg()[0])

    plan = runtime.last_plan
    median = {n: statistics.median(w) for n, w in walls.items()}
    per_step = {n: [statistics.median(r[s] for r in rows) for s in range(STEPS)] for n, rows in steps.items()}
    rows = [("steps", "variant", "compiled tgate_fx s/step", "compiled baseline s/step", "ratio")]
    # runs of consecutive steps on the same graph variant
    for variant, run in itertools.groupby(range(STEPS), key=lambda i: plan.steps[i].variant.name):
        run = list(run)
        t, b = (statistics.mean(per_step[n][i] for i in run) for n in ("tgate_fx", "baseline"))
        span = str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"
        rows.append((span, variant, f"{t:.4f}", f"{b:.4f}", f"{t / b:.3f}"))

    lines = [
        f"# Compiled tgate_fx vs compiled baseline, one process: {workload.title}", "",
        f"Written by `python benchmarks/compiled_pair.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
        f" on {time.strftime('%Y-%m-%d %H:%M')}.", "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, {args.threads} thread(s); "
        f"load average {load[0]:.2f} at the start, {load[1]:.2f} at the end (other processes share the cores).",
        f"- Both pipelines in this process, inductor (default mode, options {options or 'none'}); {args.runs} timed generations each after "
        "one warm-up, alternating (order reversed every run). T-GATE: "
        f"{workload.tgate}; {STEPS} steps, CFG on, `output_type=\"latent\"`.",
        f"- Scaled: {workload.scaled}", "",
        f"Whole generation, median: compiled tgate_fx {median['tgate_fx']:.2f} s, compiled baseline "
        f"{median['baseline']:.2f} s: **{median['baseline'] / median['tgate_fx']:.2f}x**.", "",
        "Per phase (median over runs of each step's denoiser call, averaged over the phase's steps; ratio < 1 "
        "means tgate_fx is faster):", "",
    ]
    lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines += ["", "Wall time of each run (s): " + "; ".join(
        f"{n} " + ", ".join(f"{x:.2f}" for x in w) for n, w in walls.items())]
    text = "\n".join(lines) + "\n"
    print()
    print("\n".join(table(rows)))
    print(f"\nspeed-up (compiled baseline / compiled tgate_fx): {median['baseline'] / median['tgate_fx']:.2f}x")
    suffix = "_" + "_".join(f"{k}" for k in options) if options else ""
    out = args.out or os.path.join(RESULTS, f"compiled_pair_{workload.name}{suffix}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
