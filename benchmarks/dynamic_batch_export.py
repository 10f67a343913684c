"""Could one capture serve every batch size? ``torch.export`` with a dynamic batch, measured.

Usage::

    python benchmarks/dynamic_batch_export.py                  # sd15, sdxl, pixart_alpha (meta device)
    python benchmarks/dynamic_batch_export.py --archs pixart_alpha

For each full-size architecture (built on the meta device, as ``tgate-fx
inspect --arch`` does), each in a fresh process with one thread, three
exports of the denoiser at the CFG batch (2):

- ``static``: the plain export tgate_fx makes today (one per batch size);
- ``dynamic``: the batch dimension of every input a ``Dim(min=1)``;
- ``oblivious``: the same under ``backed_size_oblivious``, which keeps a
  size-1 batch from being specialised away (T-GATE's post-gate batch is 1
  for a single prompt);
- ``probe``: what tgate_fx does instead (``tgate_fx.core.rebatch``): one
  static export at a probe batch, specialised to batch 2 and to batch 1,
  each checked.

A dynamic capture would replace the two static ones of a T-GATE generation
(the CFG batch and the post-gate batch) only if it costs less than two
static exports and covers batch 1. Writes
``benchmarks/results/dynamic_batch_export.md``.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
MODES = ("static", "dynamic", "oblivious", "probe")


def _child(arch_name: str, mode: str) -> dict:
    sys.path.insert(0, ROOT)
    import torch
    import torch.fx.experimental._config as fx_config
    from torch.export import Dim

    from tgate_fx.archs import get_arch

    torch.set_num_threads(1)
    arch = get_arch(arch_name)
    denoiser, call = arch.build_denoiser(), arch.make_call(2)
    batch = Dim("batch", min=1, max=1024)
    if mode == "probe":
        from tgate_fx.core.rebatch import BatchCaptures

        start = time.perf_counter()
        captures = BatchCaptures(denoiser, next(iter(inspect.signature(denoiser.forward).parameters)), store=None)
        for b in (2, 1):
            captures(arch.make_call(b))
        return {"seconds": time.perf_counter() - start, "fallbacks": len(captures.fallbacks)}

    def spec(value):
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 2:
            return {0: batch}
        return None

    kwargs = {"dynamic_shapes": {**{k: spec(v) for k, v in call.items()}, "return_dict": None}} if mode != "static" \
        else {}
    start = time.perf_counter()
    try:
        with torch.no_grad(), fx_config.patch(backed_size_oblivious=mode == "oblivious"):
            exported = torch.export.export(denoiser, (), {**call, "return_dict": False}, strict=False, **kwargs)
    except Exception as e:  # the figure is whether it works at all
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("- Not all values")), lines[0] if lines else "")
        return {"seconds": time.perf_counter() - start, "error": f"{type(e).__name__}: {detail}"[:300]}
    seconds = time.perf_counter() - start
    ranges = {str(s): (str(r.lower), str(r.upper)) for s, r in exported.range_constraints.items()}
    return {"seconds": seconds, "nodes": len(exported.graph.nodes), "ranges": ranges}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="sd15,sdxl,pixart_alpha")
    parser.add_argument("--out", default=os.path.join(RESULTS, "dynamic_batch_export.md"))
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return 0
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    results: dict[str, dict[str, dict]] = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", TGATE_FX_CAPTURE_CACHE="0")
    for arch in args.archs.split(","):
        for mode in MODES:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", arch, mode], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{arch} {mode} failed:\n{proc.stderr[-3000:]}")
            r = results.setdefault(arch, {})[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"[{arch}] {mode}: {r['seconds']:.1f} s" + (f", {r['error']}" if "error" in r else
                                                               f", {r.get('ranges', r.get('fallbacks'))}"), flush=True)
    lines = [f"# One capture for every batch size? `torch.export` with a dynamic batch", "",
             f"Written by `python benchmarks/dynamic_batch_export.py {' '.join(argv or sys.argv[1:])}` on {started}; "
             f"each export in a fresh process, one thread, full-size denoisers on the meta device, CFG batch 2. "
             "The machine is shared: compare within a row.", "",
             "| architecture | static export (s) | dynamic batch, `Dim(min=1)` | / static | under `backed_size_oblivious` "
             "| / static | tgate_fx: probe export + batches 2 and 1 (s) | / static |", "|---|---|---|---|---|---|---|---|"]
    for arch, modes in results.items():
        static = modes["static"]["seconds"]
        cells = [arch, f"{static:.1f}"]
        for mode in ("dynamic", "oblivious"):
            r = modes[mode]
            if "error" in r:
                cells += [f"fails after {r['seconds']:.1f} s: {r['error']}", "-"]
            else:
                cells += [f"{r['seconds']:.1f} s; batch range {', '.join(f'{lo}..{hi}' for lo, hi in r['ranges'].values())}",
                          f"{r['seconds'] / static:.2f}x"]
        probe = modes["probe"]
        cells += [f"{probe['seconds']:.1f}" + (f" ({probe['fallbacks']} exported on their own)" if probe["fallbacks"]
                                                 else ""), f"{probe['seconds'] / static:.2f}x"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", "A dynamic capture pays off only below 2x a static export (T-GATE captures two batches) and only "
              "if its range includes batch 1 (the post-gate batch of one prompt). The last columns are what tgate_fx "
              "does instead: one static export at a probe batch, specialised and checked for each batch size."]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
