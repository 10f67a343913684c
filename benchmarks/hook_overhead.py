"""Per-call overhead of tgate_fx's runtime: the hook on the user's module against the former stand-in module.

Each denoiser call of an optimized pipeline runs one graph variant; everything
around it (binding the arguments, counting the step, choosing the variant,
storing caches, building the output) is overhead. Measured on the tiny SD 1.5
UNet, where the graph itself is small so that the overhead shows:

* ``graph``: the step's variant called directly with its inputs;
* ``call``: ``pipe.unet(sample, t, text)`` through the runtime (one long
  generation, nothing cached, so every call runs the same variant);
* overhead = call - graph, per call.

The hook is measured in this process; the stand-in (``OptimizedDenoiser``, the
runtime up to commit 97277b4) in a subprocess running this same script from a
``git worktree`` of that commit, in the same run. Only the two overheads of
one run compare. Usage::

    python benchmarks/hook_overhead.py [--calls 400] [--repeats 5] [--standin-commit 97277b4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(calls: int, repeats: int) -> dict:
    import torch

    import tgate_fx
    from tgate_fx.tiny import tiny_pipeline
    try:
        from tgate_fx.core.captured import normalize_call
    except ImportError:  # the stand-in's tree
        from tgate_fx.core.capture import normalize_call

    torch.manual_seed(0)
    pipe = tiny_pipeline("sd15")
    steps = calls * (repeats + 1) + 10
    tgate_fx.optimize(pipe, gate_step=steps, sp_interval=1, fi_interval=1, warm_up=steps)  # nothing cached
    runtime = tgate_fx.get_runtime(pipe)
    pipe.scheduler.set_timesteps(steps)
    pipe._num_timesteps = steps  # direct denoiser calls: the generation's length as a pipeline call sets it
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 16, 32)
    timesteps = iter(pipe.scheduler.timesteps)
    denoiser = runtime.denoiser
    with torch.no_grad():
        with runtime.tracing() as trace:
            for _ in range(10):
                pipe.unet(sample, next(timesteps), text)
        _, graphs, variant = trace[-1]
        inputs = graphs.capture.flat_inputs(normalize_call(denoiser, (sample, pipe.scheduler.timesteps[0], text), {})[0])
        args = [inputs[n] for n in variant.input_names]
        call_us, graph_us = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                pipe.unet(sample, next(timesteps), text)
            call_us.append((time.perf_counter() - start) / calls * 1e6)
            start = time.perf_counter()
            for _ in range(calls):
                variant.graph_module(*args)
            graph_us.append((time.perf_counter() - start) / calls * 1e6)
    call, graph = statistics.median(call_us), statistics.median(graph_us)
    return {"runtime": type(runtime).__name__, "call_us": call, "graph_us": graph, "overhead_us": call - graph}


def _standin(commit: str, calls: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "standin")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", tree, commit], check=True)
        try:
            env = {**os.environ, "PYTHONPATH": tree}
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--calls", str(calls),
                                  "--repeats", str(repeats)], env=env, cwd=tree, check=True, capture_output=True,
                                 text=True)
            return json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--standin-commit", default="97277b4")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "hook_overhead.md"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.calls, args.repeats)))
        return
    hook = measure(args.calls, args.repeats)
    print(f"hook measured: {hook}", file=sys.stderr)
    standin = _standin(args.standin_commit, args.calls, args.repeats)
    rows = [("hook on the user's module (DenoiserRuntime)", hook),
            (f"stand-in module (OptimizedDenoiser, {args.standin_commit})", standin)]
    lines = ["| runtime | call (us) | graph alone (us) | overhead per call (us) |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {r['call_us']:.0f} | {r['graph_us']:.0f} | {r['overhead_us']:.0f} |" for name, r in rows]
    ratio = hook["overhead_us"] / standin["overhead_us"] if standin["overhead_us"] > 0 else float("nan")
    lines += ["", f"hook overhead / stand-in overhead: {ratio:.2f}x "
              f"(tiny SD 1.5 UNet, batch 2, 16x16 latents; median of {args.repeats} x {args.calls} calls; "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write("# Per-call overhead: hook vs stand-in\n\nMade by `python benchmarks/hook_overhead.py`.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
