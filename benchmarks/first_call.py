"""What the first call costs: capture, variant builds, and the disk capture store.

Usage::

    python benchmarks/first_call.py                       # full-size SD-XL and PixArt-alpha (meta) + scaled SD-1.5
    python benchmarks/first_call.py --archs sdxl --no-workloads

Two measurements, every case in a fresh process (so nothing is warm but the
files on disk), one thread each, run one after another:

1. **Full-size architectures on the meta device** (as ``tgate-fx inspect
   --arch`` builds them): the time of one plain ``torch.export`` of the
   denoiser at the CFG batch (the unit), against tgate_fx capturing one
   resolution and building every variant of the default T-GATE plan
   (25 steps) with the capture store off, with an empty store (the first
   process, which also writes it) and with the store written (a second
   process).
2. **The scaled SD-1.5 workload** (``workloads.py``): the first generation's
   overhead (first generation minus a steady one) against one steady
   generation, with the store off, empty and written.

Writes ``benchmarks/results/first_call.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


def _child(kind: str, name: str, store: str | None) -> dict:
    """Run one case in this process (called in a fresh subprocess); returns its timings."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import torch

    if store is None:
        os.environ["TGATE_FX_CAPTURE_CACHE"] = "0"
    else:
        os.environ["TGATE_FX_CAPTURE_CACHE"] = "1"
        os.environ["TGATE_FX_CACHE_DIR"] = store
    torch.set_num_threads(1)
    if kind == "export":
        from tgate_fx.archs import get_arch

        arch = get_arch(name)
        denoiser, call = arch.build_denoiser(), arch.make_call(2)
        start = time.perf_counter()
        with torch.no_grad():
            torch.export.export(denoiser, (), {**call, "return_dict": False}, strict=False)
        return {"seconds": time.perf_counter() - start}
    if kind == "arch":
        from tgate_fx.archs import ArchGraphs, get_arch
        from tgate_fx.core.plan import Plan
        from tgate_fx.core.variants import walk_plan

        arch = get_arch(name)
        denoiser = arch.build_denoiser()  # built before the clock starts, as for the plain export
        object.__setattr__(arch, "build_denoiser", lambda *a, **k: denoiser)
        graphs = ArchGraphs(arch, progress=lambda line: None)
        plan = Plan(25, [arch.tgate], cfg=True)
        start = time.perf_counter()
        walk_plan(plan, lambda step: graphs(1 if step.drops_uncond else 2))
        total = time.perf_counter() - start
        captures = [graphs(b).capture for b in graphs.batches]
        return {"seconds": total, "capture": sum(c.seconds for c in captures),
                "from_store": [c.from_store for c in captures]}
    from workloads import WORKLOADS

    import tgate_fx

    workload = WORKLOADS[name]
    pipe = tgate_fx.optimize(workload.build(), config=workload.tgate)
    times = []
    for seed in range(3):
        start = time.perf_counter()
        workload.generate(pipe, seed)
        times.append(time.perf_counter() - start)
    captures = tgate_fx.get_runtime(pipe).captures
    return {"first": times[0], "steady": min(times[1:]), "capture": sum(g.capture.seconds for g in captures),
            "from_store": [g.capture.from_store for g in captures]}


def _run(kind: str, name: str, store: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps([kind, name, store])], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{kind} {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="sdxl,pixart_alpha", help="full-size architectures (meta device)")
    parser.add_argument("--workloads", default="sd15", help="scaled workloads (workloads.py)")
    parser.add_argument("--no-workloads", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*json.loads(args.child))))
        return

    lines = [f"# First call: capture, variants and the capture store ({datetime.date.today()})", "",
             f"CPU: {platform.processor() or platform.machine()}, one thread per process, every case in a fresh "
             f"process; load average at start {os.getloadavg()[0]:.1f}.", ""]

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    archs = [a for a in args.archs.split(",") if a]
    if archs:
        say("## Full-size denoisers on the meta device: one resolution, every variant of the default T-GATE plan")
        say()
        say("| architecture | one plain torch.export (s) | tgate_fx, store off (s) | ratio | store empty "
            "(s) | ratio | store written (s) | ratio |")
        say("|---|---|---|---|---|---|---|---|")
        for name in archs:
            with tempfile.TemporaryDirectory() as store:
                plain = _run("export", name, None)["seconds"]
                off = _run("arch", name, None)
                cold = _run("arch", name, store)
                warm = _run("arch", name, store)
            assert all(warm["from_store"]) and not any(cold["from_store"])
            say(f"| {name} | {plain:.1f} | {off['seconds']:.1f} | {off['seconds'] / plain:.2f}x | "
                f"{cold['seconds']:.1f} | {cold['seconds'] / plain:.2f}x | {warm['seconds']:.1f} | "
                f"{warm['seconds'] / plain:.2f}x |")
        say()
        say("Goals: store off or empty <= 1.3x one export (one capture per resolution); store written <= 0.6x.")
        say()
    workloads = [] if args.no_workloads else [w for w in args.workloads.split(",") if w]
    if workloads:
        say("## Scaled workloads: first-generation overhead (first minus steady) over one steady generation")
        say()
        say("| workload | steady generation (s) | store off: overhead (s) | ratio | store empty (s) | ratio | "
            "store written (s) | ratio |")
        say("|---|---|---|---|---|---|---|---|")
        for name in workloads:
            with tempfile.TemporaryDirectory() as store:
                runs = [_run("workload", name, None), _run("workload", name, store), _run("workload", name, store)]
            steady = min(r["steady"] for r in runs)
            cells = []
            for r in runs:
                overhead = r["first"] - r["steady"]
                cells.append(f"{overhead:.2f} | {overhead / steady:.2f}x")
            say(f"| {name} | {steady:.2f} | " + " | ".join(cells) + " |")
        say()
        say("Goal: first-call overhead <= 0.5x one steady generation.")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "first_call.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(RESULTS, 'first_call.md')}")


if __name__ == "__main__":
    main()
