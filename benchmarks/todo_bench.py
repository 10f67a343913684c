"""ToDo benchmark: baseline, ToDo (tgate_fx), tomesd, T-GATE and T-GATE + ToDo on the scaled SD-1.5 at 512x512.

The workload is ``run.py``'s scaled SD-1.5 UNet (``workloads.py``) at 512x512
px: a 64x64 latent, so 4096 tokens at the first level, where ToDo acts. All
five pipelines are built in one process with the same seeded weights; after
one warm-up generation each (tgate_fx captures its graphs there), the timed
generations go round-robin over the columns, one each per round with the
order rotated, so that every column sees the same load. A column's time is
the median wall time of its generations (25 steps, CFG 7.5, latent output).

Columns:

* ``baseline``: the diffusers pipeline as built.
* ``fx_plain``: ``tgate_fx.optimize(pipe, todo=ToDoConfig(factor=1))``: the
  captured graph with no rewrite (same MACs as the baseline). It shows how
  much of tgate_fx's speed-up is the flat graph's lower Python overhead
  rather than the method.
* ``todo``: ``tgate_fx.optimize(pipe, todo=ToDoConfig(factor=2, mode="nearest"))``:
  keys/values of the first level's self-attention downsampled 2x per side
  (4096 -> 1024 tokens), the official defaults (level 2 untouched).
* ``tomesd``: PyPI ``tomesd`` (``apply_patch(pipe, ratio=0.75, max_downsample=1)``):
  the merge ratio that removes as many key/value tokens at the same
  self-attention layers (3/4 of them; tomesd merges the queries too and
  unmerges the output).
* ``tgate``: ``tgate_fx.optimize(pipe, tgate=TGateConfig(10, 5, 1, 2))`` (the published SD setting).
* ``tgate_todo``: both.

MAC-ideal speed-up: baseline MACs / the column's MACs, from ``tgate_fx.plan_macs``
on the architecture (meta device), Linear + Conv and, separately, with the
attention core (Q K^T and A V), where ToDo saves most. tomesd's MACs are
derived from the same per-site counts: its attention layers at depth 1 run
on 1/4 of the tokens (projections x 1/4, core x 1/16), plus its bipartite
matching, a (3N/4 x N/4 x C) similarity product per site (counted with the
attention core).

Example::

    python benchmarks/todo_bench.py                       # 25 steps, 5 rounds: about an hour on 2 busy cores
    python benchmarks/todo_bench.py --steps 12 --tgate 5,2,1,1 --repeats 3   # the committed, reduced run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import machine, require_matplotlib, speedup_bars  # noqa: E402

COLUMNS = ("baseline", "fx_plain", "todo", "tomesd", "tgate", "tgate_todo")
TITLES = {"baseline": "baseline", "fx_plain": "tgate_fx graph, no rewrite", "todo": "ToDo (tgate_fx)",
          "tomesd": "tomesd 0.1.3 (ratio 0.75)", "tgate": "T-GATE (tgate_fx)", "tgate_todo": "T-GATE + ToDo (tgate_fx)"}
TOMESD_RATIO = 0.75  # ToDo's factor 2 keeps 1/4 of the keys/values: tomesd removing 3/4 of the tokens matches it


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _todo_config():
    from tgate_fx import ToDoConfig

    return ToDoConfig(factor=2, mode="nearest")


def _build(workload, column: str):
    import tgate_fx

    pipe = workload.build()
    if column == "fx_plain":
        from tgate_fx import ToDoConfig

        tgate_fx.optimize(pipe, todo=ToDoConfig(factor=1))
    elif column == "todo":
        tgate_fx.optimize(pipe, todo=_todo_config())
    elif column == "tomesd":
        import tomesd

        tomesd.apply_patch(pipe, ratio=TOMESD_RATIO, max_downsample=1)
    elif column == "tgate":
        tgate_fx.optimize(pipe, tgate=workload.tgate)
    elif column == "tgate_todo":
        tgate_fx.optimize(pipe, tgate=workload.tgate, todo=_todo_config())
    return pipe


def count_macs(workload, steps: int) -> dict:
    """Per column, ``{"linear_conv": MACs, "with_core": MACs}`` of one generation (batch 1, CFG)."""
    from tgate_fx.accounting.macs import count_macs as graph_macs
    from tgate_fx.accounting.macs import plan_macs
    from tgate_fx.archs import ArchGraphs, arch_from_pipeline
    from tgate_fx.core.plan import Plan

    pipe = workload.build()
    graphs = ArchGraphs(arch_from_pipeline(pipe, height=workload.height, width=workload.width),
                        progress=lambda msg: None)
    plans = {"todo": [_todo_config()], "tgate": [workload.tgate], "tgate_todo": [workload.tgate, _todo_config()]}
    out: dict[str, dict] = {}
    for key, inc in (("linear_conv", False), ("with_core", True)):
        for column, methods in plans.items():
            counted = plan_macs(graphs, Plan(steps, methods, cfg=True), include_attention=inc)
            out.setdefault("baseline", {})[key] = counted.baseline
            out.setdefault(column, {})[key] = counted.total
        # tomesd: every step at the CFG batch (2), depth-1 self-attention on a quarter of the tokens.
        captured = graphs(2)
        per_site = graph_macs(captured.capture.graph_module, include_attention=False).by_site
        per_site_core = graph_macs(captured.capture.graph_module, include_attention=True).by_site
        latent = (workload.height // 8) * (workload.width // 8)
        saved = 0
        for site in captured.sites:
            batch, tokens, channels = site.value_shape
            if site.role != "self" or tokens != latent:
                continue
            linear = per_site[site.path]
            saved += linear * 3 // 4
            if inc:
                core = per_site_core[site.path] - linear
                matching = batch * (tokens * 3 // 4) * (tokens // 4) * channels
                saved += core * 15 // 16 - matching
        out["tomesd"] = {**out.get("tomesd", {}), key: out["baseline"][key] - steps * saved}
        out["fx_plain"] = out["baseline"]
    return out


def _machine() -> dict:
    try:
        from importlib import metadata
        tomesd_version = metadata.version("tomesd")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        tomesd_version = "not installed"
    return machine(tomesd=tomesd_version)


def run(args, on_round=None) -> dict:
    """Build, warm up and time the columns; ``on_round(results)`` after each round (results so far)."""
    import torch

    from workloads import WORKLOADS

    torch.set_num_threads(args.threads)
    from tgate_fx import TGateConfig

    workload = dataclasses.replace(WORKLOADS["sd15"], name=f"sd15_{args.size}", height=args.size, width=args.size)
    if args.tgate:
        workload = dataclasses.replace(workload, tgate=TGateConfig(*(int(v) for v in args.tgate.split(","))))
    columns = [c for c in args.columns.split(",") if c]
    for c in columns:
        if c not in COLUMNS:
            raise SystemExit(f"unknown column {c!r}; choose from {', '.join(COLUMNS)}")
    skipped = {}
    if "tomesd" in columns and importlib.util.find_spec("tomesd") is None:
        skipped["tomesd"] = "tomesd is not installed (pip install -e '.[bench]')"
        columns.remove("tomesd")
    _log(f"counting MACs of {workload.name} on the meta device ...")
    macs = count_macs(workload, args.steps)
    call = workload.call()
    call["num_inference_steps"] = args.steps
    pipes, warm, outputs = {}, {}, {}
    for c in columns:
        _log(f"[{c}] building and warming up (one generation) ...")
        pipes[c] = _build(workload, c)
        # The warm-up builds what the timed generations use, in as few steps as that takes: T-GATE's variants
        # all run by step gate_step (its first post-gate step included), the others' by step 1.
        warm_steps = workload.tgate.gate_step + 1 if c.startswith("tgate") else 2
        start = time.perf_counter()
        pipes[c](**{**call, "num_inference_steps": warm_steps, "generator": torch.Generator().manual_seed(0)})
        warm[c] = time.perf_counter() - start
        _log(f"[{c}] warm-up {warm[c]:.1f} s")
    times = {c: [] for c in columns}
    loads = [os.getloadavg()[0]]
    for r in range(args.repeats):
        order = columns[r % len(columns):] + columns[:r % len(columns)]
        for c in order:
            start = time.perf_counter()
            images = pipes[c](**{**call, "generator": torch.Generator().manual_seed(0)}).images
            times[c].append(time.perf_counter() - start)
            outputs.setdefault(c, images)
        loads.append(os.getloadavg()[0])
        _log(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{c} {times[c][-1]:.1f} s" for c in columns)
             + f"; load {loads[-1]:.2f}")
        if on_round is not None:
            on_round(_results(args, workload, columns, skipped, macs, warm, times, loads, outputs, pipes, r + 1))
    return _results(args, workload, columns, skipped, macs, warm, times, loads, outputs, pipes, args.repeats)


def _results(args, workload, columns, skipped, macs, warm, times, loads, outputs, pipes, rounds) -> dict:
    base = outputs.get("baseline")
    diffs = {c: float((o - base).abs().max()) for c, o in outputs.items()} if base is not None else {}
    plans = {}
    for c in ("fx_plain", "todo", "tgate", "tgate_todo"):
        if c in pipes:
            import tgate_fx

            plan = tgate_fx.get_runtime(pipes[c]).last_plan
            plans[c] = sorted({s.variant.name for s in plan.steps})
    return {"workload": dataclasses.asdict(workload) | {"build_fn": None},
            "steps": args.steps, "threads": args.threads, "repeats": rounds, "columns": columns,
            "skipped": skipped, "macs": macs, "warm": warm, "times": times, "loads": loads, "diffs": diffs,
            "variants": plans, "machine": _machine(), "tgate": dataclasses.asdict(workload.tgate),
            "baseline_abs_max": float(base.abs().max()) if base is not None else None}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def write_markdown(res: dict, path: str, argv: list[str], wall: float) -> None:
    from tgate_fx.accounting.macs import format_macs

    med = {c: statistics.median(t) for c, t in res["times"].items()}
    macs = res["macs"]
    w = res["workload"]
    out = ["# ToDo benchmark: tgate_fx's ToDo vs tomesd, T-GATE and T-GATE + ToDo", "",
           f"Written by `python benchmarks/todo_bench.py {' '.join(argv)}`".rstrip() + " on "
           f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, in {wall / 60:.1f} min.", "",
           "## Setting", "",
           f"- Workload: the scaled SD-1.5 UNet of `benchmarks/workloads.py` at {w['height']}x{w['width']} px "
           f"(latent {w['height'] // 8}x{w['width'] // 8}: {(w['height'] // 8) * (w['width'] // 8)} tokens at the "
           f"first level), random weights; {res['steps']} DPM-Solver++ steps, CFG 7.5, latent output. "
           f"Scaled against the published model (the text is `run.py`'s, whose default size is 256 px): "
           f"{w['scaled']}",
           f"- ToDo: `ToDoConfig(factor=2, mode=\"nearest\")` (first level {w['height'] // 8}x{w['width'] // 8} -> "
           f"{w['height'] // 16}x{w['width'] // 16} keys/values; the official defaults). tomesd: "
           "`apply_patch(pipe, ratio=0.75, max_downsample=1)`, the ratio removing the same 3/4 of the key/value "
           "tokens at the same layers (it merges queries too). T-GATE: "
           + "gate {gate_step}, sp {sp_interval}, fi {fi_interval}, warm-up {warm_up}.".format(**res["tgate"]),
           f"- One process, {res['threads']} torch thread(s); one short warm-up generation per column, then "
           f"{res['repeats']} round(s) of one generation per column, order rotated each round.",
           f"- Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; torch {res['machine']['torch']}, "
           f"diffusers {res['machine']['diffusers']}, tomesd {res['machine']['tomesd']}, Python "
           f"{res['machine']['python']}. 1-minute load average {min(res['loads']):.2f}-{max(res['loads']):.2f} "
           f"(sampled each round; the machine is shared with other work).", ""]
    if res["skipped"]:
        out += ["Skipped: " + "; ".join(f"`{c}`: {why}" for c, why in res["skipped"].items()), ""]
    out += ["## Results", "",
            "| column | median s (min-max) | speed-up | MACs (Linear+Conv) | MAC-ideal | MACs (+ attention core) "
            "| MAC-ideal (+ core) | speed-up / ideal (+ core) | max abs diff vs baseline |",
            "|---|---|---|---|---|---|---|---|---|"]
    base = med["baseline"]
    for c in res["columns"]:
        t = res["times"][c]
        lin, core = macs[c]["linear_conv"], macs[c]["with_core"]
        ideal_lin = macs["baseline"]["linear_conv"] / lin
        ideal_core = macs["baseline"]["with_core"] / core
        speed = base / med[c]
        out.append(f"| {TITLES[c]} | {med[c]:.2f} ({min(t):.2f}-{max(t):.2f}) | {speed:.2f}x | {format_macs(lin)} "
                   f"| {ideal_lin:.2f}x | {format_macs(core)} | {ideal_core:.2f}x | {speed / ideal_core:.2f} "
                   f"| {res['diffs'].get(c, float('nan')):.3g} |")
    out += ["", f"Baseline max |latent| {res['baseline_abs_max']:.3g}. tomesd's MACs are derived (see the script's "
            "docstring); its merge also does gathers, scatters and sorts that no MAC count sees. Warm-up (first "
            "generation, capture included for tgate_fx): "
            + ", ".join(f"{c} {s:.1f} s" for c, s in res["warm"].items())
            + f" (the warm-up runs {res['workload']['tgate']['gate_step'] + 1} steps for the T-GATE columns, "
            "which builds all their variants, and 2 for the others)" + ". Variants run: "
            + "; ".join(f"{c}: {', '.join(v)}" for c, v in res["variants"].items()) + ".", "",
            "## Goals (issue 9)", ""]
    goals = []
    if "todo" in med:
        ideal = macs["baseline"]["with_core"] / macs["todo"]["with_core"]
        got = base / med["todo"]
        goals.append(f"- ToDo's speed-up >= 0.9 x its MAC-ideal with the attention core ({0.9 * ideal:.2f}x): "
                     f"{got:.2f}x, {'met' if got >= 0.9 * ideal else 'missed'}.")
    if "todo" in med and "tomesd" in med:
        goals.append(f"- ToDo faster than tomesd at the same key/value reduction: {med['todo']:.2f} s vs "
                     f"{med['tomesd']:.2f} s, {'met' if med['todo'] < med['tomesd'] else 'missed'}.")
    if {"todo", "tgate", "tgate_todo"} <= set(med):
        ok = med["tgate_todo"] < min(med["todo"], med["tgate"])
        goals.append(f"- T-GATE + ToDo faster than either alone: {med['tgate_todo']:.2f} s vs ToDo "
                     f"{med['todo']:.2f} s and T-GATE {med['tgate']:.2f} s, {'met' if ok else 'missed'}.")
    if "fx_plain" in med and "todo" in med:
        own = macs["baseline"]["with_core"] / macs["todo"]["with_core"]
        goals.append(f"- (Not a goal: what the rewrite alone gives.) ToDo over the unchanged tgate_fx graph: "
                     f"{med['fx_plain'] / med['todo']:.2f}x (MAC-ideal {own:.2f}x); the unchanged graph over the "
                     f"baseline: {base / med['fx_plain']:.2f}x at equal MACs.")
    out += goals + [""]
    out += ["## Times per round (s)", "", "| round | " + " | ".join(res["columns"]) + " |",
            "|---|" + "---|" * len(res["columns"])]
    for r in range(res["repeats"]):
        out.append(f"| {r + 1} | " + " | ".join(f"{res['times'][c][r]:.2f}" for c in res["columns"]) + " |")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(res, f, indent=1, default=str)


def plot(res: dict, path: str) -> None:
    med = {c: statistics.median(t) for c, t in res["times"].items()}
    cols, macs = res["columns"], res["macs"]
    speedup_bars(path, [TITLES[c] for c in cols],
                 {"measured": [med["baseline"] / med[c] for c in cols],
                  "MAC-ideal (+ attention core)": [macs["baseline"]["with_core"] / macs[c]["with_core"] for c in cols],
                  "MAC-ideal (Linear+Conv)": [macs["baseline"]["linear_conv"] / macs[c]["linear_conv"] for c in cols]},
                 f"scaled SD-1.5, {res['workload']['height']}x{res['workload']['width']}, {res['steps']} steps")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="image height and width in px (default 512)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one generation per column each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady on a busy machine)")
    parser.add_argument("--columns", default=",".join(COLUMNS))
    parser.add_argument("--tgate", default="", metavar="G,SP,FI,WU",
                        help="T-GATE settings (default: the published 10,5,1,2 for 25 steps)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "todo_bench.md"))
    parser.add_argument("--no-plot", action="store_true", help="write the markdown only (no matplotlib needed)")
    args = parser.parse_args(argv)
    require_matplotlib(args.no_plot)
    if "baseline" not in args.columns.split(","):
        raise SystemExit("the baseline column is needed (speed-ups are against it)")
    start = time.perf_counter()
    res = run(args, on_round=lambda partial: write_markdown(partial, args.out, argv, time.perf_counter() - start))
    write_markdown(res, args.out, argv, time.perf_counter() - start)
    if not args.no_plot:
        plot(res, os.path.splitext(args.out)[0] + ".png")
    with open(args.out) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
