"""Per-step wall time and operator totals of tgate_fx columns on the scaled FLUX of ``transformer_speed.py``.

One generation per column on one thread under torch's profiler (its overhead is small next to these steps):
each step's wall time (step 0 includes the capture and the variant builds, unless ``--warmup``), the variants
the runtime ran, and the operators by self time. Prints the results and writes them to
``benchmarks/results/step_profile_flux_<size>.json``. Without ``--warmup`` the first column is the process's
first generation: it also pays first-use costs, so a baseline run first leans slow.

    python benchmarks/step_profile.py --size 1024 --text 512 --columns toca,fora3+toca

The allocator settings of the environment (see ``common.ALLOCATOR_VARIABLES``) apply to every column and are
recorded in the results; ``--name`` names the results file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main(argv: list[str] | None = None) -> int:
    import transformer_speed
    from common import machine
    from torch.profiler import ProfilerActivity, profile

    import tgate_fx

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--text", type=int, default=32)
    p.add_argument("--columns", default="toca,fora3+toca", help="baseline and/or transformer_speed's columns")
    p.add_argument("--name", default=None, help="results file stem in benchmarks/results "
                   "(default step_profile_flux_<size>)")
    p.add_argument("--warmup", action="store_true", help="one untimed generation per column before its profiled one "
                   "(step 0 then holds no capture or variant builds, and the first column no first-use costs)")
    args = p.parse_args(argv)
    columns = args.columns.split(",")
    if "baseline" in columns[1:]:
        p.error("baseline must be the first column (the later columns install tgate_fx on the pipeline)")
    torch.set_num_threads(1)
    build_args = argparse.Namespace(flux_double=2, flux_single=2, flux_size=args.size, flux_text=args.text, steps=8)
    pipe, call, _, _ = transformer_speed.build("flux", build_args)
    results = {}
    for column in columns:
        if column != "baseline":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tgate_fx.optimize(pipe, methods=transformer_speed.fx_methods(column, 3))
        runtime = tgate_fx.get_runtime(pipe) if column != "baseline" else None
        times, last = [], [0.0]

        def step_end(_pipe, _i, _t, kwargs):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            return kwargs

        if args.warmup:
            pipe(generator=torch.Generator().manual_seed(0), **call)
        tracing = runtime.tracing() if runtime is not None else contextlib.nullcontext([])
        with profile(activities=[ProfilerActivity.CPU]) as prof, tracing as trace:
            last[0] = time.perf_counter()
            pipe(generator=torch.Generator().manual_seed(0), callback_on_step_end=step_end, **call)
        ops = sorted(((e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()),
                     key=lambda r: -r[1])[:15]
        results[column] = {"step_s": times, "variants": [v.name for _p, _g, v in trace], "ops": ops}
        print(column, f"total {sum(times):.1f} s, per step", [round(t, 1) for t in times], flush=True)
        print("  variants:", results[column]["variants"], flush=True)
        for key, seconds, count in ops:
            print(f"    {key:48s} {seconds:8.2f} s {count:6d} calls", flush=True)
    results["machine"] = machine()  # the allocator settings among them
    out = os.path.join(os.path.dirname(__file__), "results", (args.name or f"step_profile_flux_{args.size}") + ".json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
