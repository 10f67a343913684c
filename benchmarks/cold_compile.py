"""Cold compile with inductor: tgate_fx (whole variants and regional) against the compiled baseline.

Each column runs in its own process with a fresh inductor cache directory
(``TORCHINDUCTOR_CACHE_DIR``), so every compile is cold:

- ``baseline``: ``pipe.unet.compile()`` (the whole UNet, one graph);
- ``baseline_regional``: diffusers' ``pipe.unet.compile_repeated_blocks()``
  (its ``BasicTransformerBlock`` s only);
- ``tgate_fx``: ``optimize(compile=True)``: each graph variant compiled whole;
- ``tgate_fx_regional``: ``optimize(compile={"regional": True})``: each
  distinct block of the variants compiled once (``tgate_fx.core.blockwise``).

*Cold compile* = first compiled generation minus the median steady one. For
tgate_fx the capture and the variant builds are paid first by an uncompiled
generation (reported apart as first-call overhead), so the figure is the
compile alone, as for the baseline. Then a last process holds the baseline
and both tgate_fx columns compiled and times them alternately, generation by
generation, for the steady speed-ups (ratios across processes would carry
the machine's load changes between them).

Usage::

    python benchmarks/cold_compile.py                 # sd15, 3 steady runs per column, 5 rounds in the pair
    python benchmarks/cold_compile.py --runs 2 --rounds 3 --no-plot
    python benchmarks/cold_compile.py --columns "" --rounds 6     # the steady pair only

Writes ``benchmarks/results/cold_compile.md`` (+ ``.json``, ``.png``).
"""

from __future__ import annotations

import argparse
import shlex
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

COLUMNS = ("baseline", "baseline_regional", "tgate_fx", "tgate_fx_regional")
TITLES = {"baseline": "compiled baseline (whole UNet)",
          "baseline_regional": "baseline, diffusers `compile_repeated_blocks`",
          "tgate_fx": "tgate_fx, each variant whole",
          "tgate_fx_regional": "tgate_fx, regional (`compile={\"regional\": True}`)"}
MAC_IDEAL = {"sd15": 1.49}  # Linear+Conv MACs, baseline / published T-GATE plan (benchmarks/results/torch_bench.md)


def _check_dependencies(no_plot: bool) -> None:
    missing = [m for m in ("diffusers", "transformers") if importlib.util.find_spec(m) is None]
    if not no_plot and importlib.util.find_spec("matplotlib") is None:
        missing.append("matplotlib (or pass --no-plot)")
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        missing.append("a C++ compiler (g++), which inductor needs on the CPU")
    if missing:
        sys.exit("cold_compile.py needs: " + ", ".join(missing) + "; `pip install -e \".[bench]\"` installs the "
                 "Python ones")


def _counters() -> dict:
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"].get("unique_graphs", 0),
            "breaks": sum(counters["graph_break"].values()) if "graph_break" in counters else 0}


def _child(column: str, workload_name: str, runs: int, threads: int, latents_path: str) -> dict:
    import torch

    import tgate_fx
    from workloads import WORKLOADS

    torch.set_num_threads(threads)
    workload = WORKLOADS[workload_name]
    pipe = workload.build()
    out: dict = {"column": column}
    if column.startswith("tgate_fx"):
        tgate_fx.optimize(pipe, config=workload.tgate)
        start = time.perf_counter()
        eager = workload.generate(pipe)  # capture + variant builds, uncompiled
        out["first_call_s"] = time.perf_counter() - start
        runtime = tgate_fx.get_runtime(pipe)
        runtime.compile(regional=column == "tgate_fx_regional")
    else:
        eager = workload.generate(pipe)
        unet = getattr(pipe, workload.denoiser_attr)
        if column == "baseline":
            unet.compile(fullgraph=True)
        else:
            unet.compile_repeated_blocks(fullgraph=True)
    torch._dynamo.reset()
    start = time.perf_counter()
    first = workload.generate(pipe)
    out["first_s"] = time.perf_counter() - start
    out["after_first"] = _counters()
    out["steady_s"] = []
    for i in range(runs):
        start = time.perf_counter()
        workload.generate(pipe)
        out["steady_s"].append(time.perf_counter() - start)
    out["after_steady"] = _counters()
    out["max_diff_vs_eager"] = (first - eager).abs().max().item()
    if column == "tgate_fx_regional":
        out["regional"] = runtime._compiler.stats()
    if column.startswith("tgate_fx"):
        out["variants"] = len(runtime.last_plan.variants)
    torch.save(first, latents_path)
    return out


def _pair(workload_name: str, rounds: int, threads: int) -> dict:
    """Compiled baseline, tgate_fx whole and tgate_fx regional in one process, timed alternately."""
    import torch

    import tgate_fx
    from workloads import WORKLOADS

    torch.set_num_threads(threads)
    workload = WORKLOADS[workload_name]
    pipes = {"baseline": workload.build(), "tgate_fx": workload.build(), "tgate_fx_regional": workload.build()}
    getattr(pipes["baseline"], workload.denoiser_attr).compile(fullgraph=True)
    tgate_fx.optimize(pipes["tgate_fx"], config=workload.tgate, compile=True)
    tgate_fx.optimize(pipes["tgate_fx_regional"], config=workload.tgate, compile={"regional": True})
    for pipe in pipes.values():
        workload.generate(pipe)
    walls: dict[str, list[float]] = {name: [] for name in pipes}
    cpus: dict[str, list[float]] = {name: [] for name in pipes}
    names = list(pipes)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            workload.generate(pipes[name])
            walls[name].append(time.perf_counter() - start)
            cpus[name].append(time.process_time() - start_cpu)
        print(f"  pair round {i + 1}/{rounds}: " + ", ".join(f"{n} {w[-1]:.2f} s (CPU {cpus[n][-1]:.2f} s)"
                                                              for n, w in walls.items()), flush=True)
    return {"wall": walls, "cpu": cpus}


def _run_child(args, column: str, cache: str, latents: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TGATE_FX_CAPTURE_CACHE="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", column, "--workload", args.workload,
           "--runs", str(args.runs), "--rounds", str(args.rounds), "--threads", str(args.threads),
           "--latents", latents]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"column {column} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def _table(rows: list[tuple]) -> list[str]:
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |"
                                                                             for r in rows[1:]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="sd15")
    parser.add_argument("--runs", type=int, default=3, help="steady generations after the cold one, per column")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the steady pair (0: none)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--columns", default=",".join(COLUMNS))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--out", default=os.path.join(RESULTS, "cold_compile.md"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--latents", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "pair":
        print(json.dumps(_pair(args.workload, args.rounds, args.threads)))
        return 0
    if args.child:
        print(json.dumps(_child(args.child, args.workload, args.runs, args.threads, args.latents)))
        return 0
    _check_dependencies(args.no_plot)
    columns = [c for c in args.columns.split(",") if c]  # "": the steady pair only
    unknown = set(columns) - set(COLUMNS)
    if unknown:
        parser.error(f"unknown columns {sorted(unknown)}; choose from {', '.join(COLUMNS)}")
    import torch

    from common import cpu_model

    started = time.strftime("%Y-%m-%d %H:%M")
    load = [os.getloadavg()[0]]
    tmp = tempfile.mkdtemp(prefix="cold_compile_")
    results: dict[str, dict] = {}
    for column in columns:
        print(f"[{column}] fresh inductor cache, one process", flush=True)
        results[column] = _run_child(args, column, os.path.join(tmp, f"inductor_{column}"),
                                     os.path.join(tmp, f"{column}.pt"))
        r = results[column]
        print(f"[{column}] first compiled generation {r['first_s']:.1f} s, steady "
              + ", ".join(f"{x:.2f}" for x in r["steady_s"]) + f" s; graphs {r['after_first']['graphs']}",
              flush=True)
        load.append(os.getloadavg()[0])
    pair = {}
    if args.rounds:
        print("[pair] baseline, tgate_fx, tgate_fx_regional compiled in one process, alternating", flush=True)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor_pair"), TGATE_FX_CAPTURE_CACHE="0")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "pair", "--workload",
                               args.workload, "--rounds", str(args.rounds), "--threads", str(args.threads)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"[pair] failed:\n{proc.stderr[-4000:]}", flush=True)
        else:
            pair = json.loads(proc.stdout.strip().splitlines()[-1])
        load.append(os.getloadavg()[0])
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:  # the raw figures first, whatever follows
        json.dump({"columns": results, "pair": pair, "load": load}, f, indent=1)
    latents = {c: torch.load(os.path.join(tmp, f"{c}.pt")) for c in columns}
    shutil.rmtree(tmp, ignore_errors=True)

    for r in results.values():
        r["steady_median_s"] = statistics.median(r["steady_s"])
        r["cold_s"] = r["first_s"] - r["steady_median_s"]
    base = results.get("baseline")
    rows = [("column", "cold compile s", "/ baseline cold", "first compiled gen s", "steady s (median)",
             "graphs compiled", "later", "breaks", "max |latents - eager|")]
    for c, r in results.items():
        ratio = f"{r['cold_s'] / base['cold_s']:.2f}x" if base else "-"
        rows.append((TITLES[c], f"{r['cold_s']:.1f}", ratio, f"{r['first_s']:.1f}", f"{r['steady_median_s']:.2f}",
                     str(r["after_first"]["graphs"]),
                     str(r["after_steady"]["graphs"] - r["after_first"]["graphs"]),
                     str(r["after_steady"]["breaks"]), f"{r['max_diff_vs_eager']:.2e}"))
    notes = []
    if "tgate_fx" in latents and "tgate_fx_regional" in latents:
        notes.append(f"Final latents, tgate_fx regional vs tgate_fx whole (both inductor): max |difference| "
                     f"{(latents['tgate_fx'] - latents['tgate_fx_regional']).abs().max().item():.2e} "
                     f"(max |latent| {latents['tgate_fx'].abs().max().item():.1f}).")
    for c in ("tgate_fx", "tgate_fx_regional"):
        if c in results:
            notes.append(f"{TITLES[c]}: first call (capture + variant builds, uncompiled generation) "
                         f"{results[c]['first_call_s']:.1f} s, not counted in its cold compile; "
                         f"{results[c]['variants']} variants in the plan.")
    if "tgate_fx_regional" in results:
        s = results["tgate_fx_regional"]["regional"]
        notes.append(f"Regional: {s['graphs']} variant graphs split into {s['sites']} compiled region sites, "
                     f"{s['regions']} distinct regions compiled (one graph each), {s['eager_nodes']} nodes run "
                     f"eagerly between regions, {s['whole']} graphs compiled whole (fallback).")
    pair_rows = []
    speedups = {}
    if pair:
        # Speed-ups in process CPU time (one thread): on a shared machine wall time follows the load.
        med = {n: statistics.median(w) for n, w in pair["wall"].items()}
        cpu = {n: statistics.median(w) for n, w in pair["cpu"].items()}
        ideal = MAC_IDEAL.get(args.workload)
        pair_rows = [("column", "steady wall s (median)", "wall speed-up", "steady CPU s (median)",
                      "CPU-time speed-up vs compiled baseline", "/ MAC-ideal")]
        for n, m in cpu.items():
            speedups[n] = cpu["baseline"] / m
            pair_rows.append((n, f"{med[n]:.2f}", f"{med['baseline'] / med[n]:.2f}x", f"{m:.2f}",
                              f"{speedups[n]:.2f}x", f"{speedups[n] / ideal:.2f}" if ideal and n != "baseline" else "-"))

    goals = []
    if base and "tgate_fx_regional" in results:
        ratio = results["tgate_fx_regional"]["cold_s"] / base["cold_s"]
        goals.append(f"- **{'PASS' if ratio <= 1.5 else 'MISS'}** cold compile of tgate_fx (regional) <= 1.5x the "
                     f"compiled baseline's: {ratio:.2f}x")
    if base and "tgate_fx" in results:
        goals.append(f"- (whole variants, before: {results['tgate_fx']['cold_s'] / base['cold_s']:.2f}x)")
    if "tgate_fx_regional" in speedups and MAC_IDEAL.get(args.workload):
        ideal = MAC_IDEAL[args.workload]
        for n in ("tgate_fx_regional", "tgate_fx"):
            goals.append(f"- **{'PASS' if speedups[n] >= 0.9 * ideal else 'MISS'}** compiled speed-up (CPU time) of {n} >= "
                         f"0.9 x MAC-ideal ({0.9 * ideal:.2f}x): {speedups[n]:.2f}x")

    from workloads import WORKLOADS

    workload = WORKLOADS[args.workload]
    lines = [f"# Cold compile with inductor: {workload.title}", "",
             f"Written by `python benchmarks/cold_compile.py {shlex.join(sys.argv[1:] if argv is None else argv)}` on "
             f"{started}.", "",
             f"- CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, {args.threads} thread(s); load "
             f"average {', '.join(f'{x:.2f}' for x in load)} (start, after each process). The machine is shared: "
             "absolute times are noisy, ratios within the run mean more.",
             f"- Workload: {args.workload}, T-GATE {workload.tgate}, 25 steps, CFG on, `output_type=\"latent\"`. "
             f"Scaled: {workload.scaled}",
             "- Each column in its own process with a fresh `TORCHINDUCTOR_CACHE_DIR`; `fullgraph=True`, inductor "
             f"default mode. Cold compile = first compiled generation - median of {args.runs} steady ones. "
             "tgate_fx's capture and variant builds are paid before, by an uncompiled generation.",
             "- *graphs compiled*: dynamo's `unique_graphs` after the first compiled generation; *later*: graphs "
             "compiled during the steady generations (0 = nothing recompiled); *breaks*: graph breaks; "
             "*max |latents - eager|*: first compiled generation against the same pipeline uncompiled, same seed.", ""]
    if results:
        lines += _table(rows) + [""] + notes + [""]
    if pair_rows:
        lines += [f"Steady state, one process, the three compiled pipelines timed alternately, {args.rounds} rounds "
                  f"(MAC-ideal of the T-GATE plan {MAC_IDEAL.get(args.workload)}x, Linear+Conv):", ""]
        lines += _table(pair_rows) + [""]
        for kind in ("wall", "cpu"):
            lines += [f"{'Wall' if kind == 'wall' else 'CPU'} times (s): " + "; ".join(
                f"{n} " + ", ".join(f"{x:.2f}" for x in w) for n, w in pair[kind].items()), ""]
    lines += ["Goals:", ""] + goals
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"columns": results, "pair": pair, "load": load}, f, indent=1)
    print("\n".join(lines))
    if not args.no_plot and results:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.2))
        names = list(results)
        ax.barh([TITLES[n].replace("`", "") for n in names], [results[n]["cold_s"] for n in names], color="tab:blue")
        for i, n in enumerate(names):
            ax.text(results[n]["cold_s"], i, f" {results[n]['cold_s']:.0f} s", va="center")
        ax.invert_yaxis()
        ax.set_xlabel("cold compile, s (first compiled generation - steady)")
        ax.set_title(f"inductor cold compile, {workload.name} (scaled), same run")
        fig.tight_layout()
        fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
