"""Time tgate_fx against the baseline, torch.compile, the reference T-GATE and DeepCache packages and diffusers' PAB.

Usage::

    python benchmarks/run.py                      # both workloads, 7 eager / 5 compiled repeats
    python benchmarks/run.py --workloads sd15 --repeats 5 --threads 1
    python benchmarks/run.py --workloads sd15 --columns baseline,deepcache_fx,deepcache_published,tgate_deepcache_fx

DeepCache columns (``deepcache_fx``, ``deepcache_published``, ``tgate_deepcache_fx``)
run on UNet workloads only (DeepCache cuts the UNet's down/up path); on
others they are listed as skipped.

For each workload (scaled-down SD-1.5 and PixArt-alpha, see ``workloads.py``)
and each column (see ``columns.py``), one worker process builds the pipeline
and sets the method up. The first generation of each is the warm-up (capture,
rewrite, compile); then the timed generations go round the columns, one
generation per column per round, so that every column sees the same machine
load. Each column reports median wall time, the ratio to the baseline of the
same run, MACs (Linear + Conv, the T-GATE paper's convention) and the
MAC-ideal speed-up, dynamo graphs and graph breaks, peak RSS of its process,
and the first-generation overhead. A second, smaller run puts the baseline,
tgate_fx and PAB under ``torch.compile`` for two generations each and counts
what dynamo compiles.

Writes ``benchmarks/results/torch_bench.md`` and ``benchmarks/results/torch_bench.png``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from common import cpu_model  # noqa: E402

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")])}


def _log(msg: str) -> None:
    print(msg, flush=True)


# --- workers ------------------------------------------------------------------------------------


class Worker:
    """A column's worker process, driven line by line."""

    def __init__(self, workload: str, column: str, threads: int, backend: str, tmpdir: str,
                 cold_cache: bool = True, compile_options: str = "{}"):
        self.column = column
        env = dict(ENV)
        if cold_cache:
            # Each compiled column pays for its own compile: inductor's on-disk caches
            # would otherwise carry kernels over from earlier runs or columns.
            env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmpdir, f"inductor_{workload}_{column}_{backend}")
        self.latents_path = os.path.join(tmpdir, f"{workload}_{column}_{backend}.pt")
        self.stderr_path = os.path.join(tmpdir, f"{workload}_{column}_{backend}.log")
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", workload, column, str(threads), backend,
             self.latents_path, compile_options],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env, cwd=ROOT)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        self.proc.wait()
        with open(self.stderr_path) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"worker {self.column} exited with code {self.proc.returncode}:\n{tail}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()
        self._stderr.close()


def _median(values):
    return statistics.median(values) if values else float("nan")


def bench_workload(name: str, columns: list[str], repeats: int, compiled_repeats: int, threads: int,
                   backend: str, tmpdir: str, cold_cache: bool, compile_options: str = "{}") -> dict:
    from columns import COLUMNS

    from workloads import WORKLOADS

    workers: dict[str, Worker] = {}
    results: dict[str, dict] = {}
    if WORKLOADS[name].denoiser_attr != "unet":
        for key in [k for k in columns if COLUMNS[k].unet_only]:
            results[key] = {"skipped": "DeepCache needs a UNet (it caches the UNet's deep down/up features)"}
        columns = [k for k in columns if not COLUMNS[k].unet_only]
    _log(f"[{name}] starting {len(columns)} worker processes (one per column) ...")
    for key in columns:
        workers[key] = Worker(name, key, threads, backend, tmpdir, cold_cache, compile_options)
    try:
        for key in columns:
            ready = workers[key].read()
            if "skipped" in ready:
                _log(f"[{name}] {COLUMNS[key].label}: SKIPPED: {ready['skipped']}")
                results[key] = {"skipped": ready["skipped"]}
                workers.pop(key).close()
            else:
                results[key] = {"setup": ready["setup_seconds"], "runs": []}
        live = [k for k in columns if k in workers]
        for key in live:
            what = "capture + rewrite" if key.startswith("tgate_fx") or key.endswith("_fx") else "first call"
            if COLUMNS[key].compiled:
                what += f" + {backend} compile"
            _log(f"[{name}] warm-up {COLUMNS[key].label} ({what}) ...")
            first = workers[key].ask("run")
            results[key]["first"] = first
            cache = (f", inductor FX-graph cache {first['fx_cache_hits']} hits / {first['fx_cache_misses']} misses"
                     if COLUMNS[key].compiled else "")
            _log(f"[{name}]   {first['wall']:.2f} s, {first['graphs']} dynamo graphs, {first['breaks']} graph breaks"
                 + cache)
        rounds = max(repeats, compiled_repeats)
        for r in range(rounds):
            order = live[r % len(live):] + live[:r % len(live)]  # rotate: no column always runs first
            line = []
            for key in order:
                wanted = compiled_repeats if COLUMNS[key].compiled else repeats
                if r >= wanted:
                    continue
                out = workers[key].ask("run")
                results[key]["runs"].append(out)
                line.append(f"{key} {out['wall']:.2f}s")
            _log(f"[{name}] repeat {r + 1}/{rounds} (load {os.getloadavg()[0]:.1f}): " + ", ".join(line))
        for key in live:
            results[key].update(workers[key].ask("finish"))
            results[key]["latents"] = workers[key].latents_path
    finally:
        for w in workers.values():
            w.close()
    return results


def contrast_workload(name: str, threads: int, backend: str, tmpdir: str, cold_cache: bool) -> dict:
    """Baseline, tgate_fx and PAB under torch.compile(backend): two generations each, dynamo counters."""
    from columns import CONTRAST_COLUMNS

    results = {}
    for key, col in CONTRAST_COLUMNS.items():
        _log(f"[{name}] compile contrast: {col.label} (backend={backend}), 2 generations ...")
        w = Worker(name, key, threads, backend, tmpdir, cold_cache)
        try:
            w.read()
            runs = [w.ask("run") for _ in range(2)]
            info = w.ask("finish")
        finally:
            w.close()
        for i, r in enumerate(runs):
            _log(f"[{name}]   generation {i + 1}: {r['wall']:.2f} s, {r['graphs']} graphs compiled, "
                 f"{r['breaks']} graph breaks, {r['frames']} frames, recompile-limit hits so far {r['limit_hits']}")
        results[key] = {"runs": runs, **info}
    return results


# --- MACs ---------------------------------------------------------------------------------------


def macs_main(name: str) -> int:
    """Worker: count the workload's MACs on the meta device and print them as one JSON line."""
    import torch

    from tgate_fx.archs import ArchGraphs, arch_from_pipeline, get_arch
    from tgate_fx.accounting.macs import count_macs, plan_macs
    from tgate_fx.core.plan import Plan
    from workloads import STEPS, WORKLOADS

    w = WORKLOADS[name]
    torch.set_num_threads(1)
    pipe = w.build()
    arch = arch_from_pipeline(pipe, height=w.height, width=w.width)
    quiet = lambda msg: None  # noqa: E731
    graphs = ArchGraphs(arch, progress=quiet)
    plan = Plan(STEPS, w.tgate, cfg=True)
    # The DeepCache plans (UNet workloads only): DeepCache alone and the T-GATE paper's T-GATE + DeepCache.
    other_plans = {}
    if w.denoiser_attr == "unet":
        from columns import DEEPCACHE, TGATE_WITH_DEEPCACHE

        other_plans = {"deepcache": Plan(STEPS, [DEEPCACHE], cfg=True),
                       "tgate_deepcache": Plan(STEPS, [TGATE_WITH_DEEPCACHE, DEEPCACHE], cfg=True)}
    out = {"arch": arch.describe(), "text_tokens": arch.text_tokens,
           "params": sum(p.numel() for p in getattr(pipe, w.denoiser_attr).parameters())}
    for inc in (False, True):
        pm = plan_macs(graphs, plan, include_attention=inc)
        step2 = count_macs(graphs(2).capture.graph_module, include_attention=inc)
        key = "sdpa" if inc else "linear_conv"
        out[key] = {"baseline": pm.baseline, "tgate": pm.total, "step_b2": step2.total, "by_site_b2": step2.by_site,
                    "by_role_b2": step2.by_role,
                    "phases": [{"phase": p.phase, "steps": list(p.steps), "macs": p.macs, "baseline": p.baseline}
                               for p in pm.phases()],
                    "per_step": [s.macs for s in pm.steps]}
        for method, other in other_plans.items():
            om = plan_macs(graphs, other, include_attention=inc)
            if om.baseline != pm.baseline:
                raise RuntimeError(f"{method}: baseline MACs {om.baseline} differ from T-GATE's {pm.baseline}")
            out[key][method] = om.total
            out[key][f"per_step_{method}"] = [s.macs for s in om.steps]
            out[key][f"variants_{method}"] = [s.variant for s in om.steps]
    published = get_arch(w.published)
    pub = ArchGraphs(published, progress=quiet)(2).capture.graph_module
    out["shares"] = {}
    for label, gm in (("published", pub), ("scaled", graphs(2).capture.graph_module)):
        for inc in (False, True):
            c = count_macs(gm, include_attention=inc)
            out["shares"][f"{label}_{'sdpa' if inc else 'linear_conv'}"] = {
                "total": c.total, **{k: v / c.total for k, v in c.by_role.items()}}
    out["published"] = published.describe()
    print("@@" + json.dumps(out), flush=True)
    return 0


def run_macs(name: str) -> dict:
    _log(f"[{name}] counting MACs on the meta device (scaled and published architectures) ...")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--macs", name], capture_output=True,
                          text=True, env=ENV, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    raise RuntimeError(f"MAC count for {name} failed (code {proc.returncode}):\n{proc.stderr[-4000:]}")


def pab_macs(macs: dict, computed: list[list[str]], key: str) -> int:
    """MACs of PAB's actual schedule: every step at the CFG batch, minus the attention modules it reused."""
    m = macs[key]
    total = 0
    sites = m["by_site_b2"]
    for step in computed:
        done = set(step)
        total += m["step_b2"] - sum(v for site, v in sites.items() if site not in done)
    return total


# --- report -------------------------------------------------------------------------------------


def _fmt_macs(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3f}{unit}"
    return str(int(x))


def _table(rows: list[tuple]) -> list[str]:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return out


def summarize(name: str, res: dict, macs: dict) -> dict:
    """Per column: medians, ratios, MACs; and the goals."""
    import torch

    from columns import COLUMNS

    base = res.get("baseline", {})
    base_med = _median([r["wall"] for r in base.get("runs", [])])
    base_den = _median([r["denoiser"] for r in base.get("runs", [])])
    rows = {}
    for key, r in res.items():
        col = COLUMNS[key]
        if "skipped" in r:
            rows[key] = {"label": col.label, "skipped": r["skipped"]}
            continue
        walls = [x["wall"] for x in r["runs"]]
        den = [x["denoiser"] for x in r["runs"]]
        med = _median(walls)
        row = {"label": col.label, "median": med, "min": min(walls), "max": max(walls), "n": len(walls),
               "cpu": _median([x["cpu"] for x in r["runs"]]), "denoiser": _median(den),
               "speedup": base_med / med, "denoiser_speedup": base_den / _median(den),
               "graphs": r["dynamo"]["graphs"], "breaks": r["dynamo"]["breaks"],
               "later_graphs": sum(x["graphs"] for x in r["runs"]),
               "rss": r["maxrss_mib"], "fx_cache": (r["dynamo"]["fx_cache_hits"], r["dynamo"]["fx_cache_misses"]), "first": r["first"]["wall"], "overhead": r["first"]["wall"] - med,
               "walls": walls, "compiled": col.compiled, "info": r["info"],
               "steps": [statistics.median(s) for s in zip(*[x["steps"] for x in r["runs"]])]}
        for unit in ("linear_conv", "sdpa"):
            if col.macs == "pab":
                m = pab_macs(macs, r["info"]["pab_computed"], unit)
            else:
                m = macs[unit][col.macs]
            row[f"macs_{unit}"] = m
            row[f"ideal_{unit}"] = macs[unit]["baseline"] / m
        rows[key] = row
    # Latents: same semantics => same numbers (eager), close (compiled).
    lat = {k: torch.load(r["latents"]) for k, r in res.items() if "latents" in r}
    diffs = {}
    for a, b in (("tgate_fx", "reference"), ("deepcache_fx", "deepcache_published"),
                 ("tgate_fx_compiled", "tgate_fx"), ("baseline_compiled", "baseline"),
                 ("tgate_fx", "baseline"), ("pab", "baseline"), ("deepcache_fx", "baseline"),
                 ("tgate_deepcache_fx", "baseline")):
        if a in lat and b in lat:
            diffs[f"{a} vs {b}"] = (lat[a] - lat[b]).abs().max().item()
    scale = lat["baseline"].abs().max().item() if "baseline" in lat else float("nan")
    return {"rows": rows, "diffs": diffs, "latent_scale": scale}


def goals(s: dict) -> list[tuple[str, str, str]]:
    rows = s["rows"]
    out = []
    t = rows.get("tgate_fx", {})
    if "median" in t:
        need = 0.9 * t["ideal_linear_conv"]
        ok = t["speedup"] >= need
        out.append(("tgate_fx eager speed-up >= 0.9 x MAC-ideal", "PASS" if ok else "MISS",
                    f"{t['speedup']:.2f}x measured vs {need:.2f}x needed (MAC-ideal {t['ideal_linear_conv']:.2f}x; "
                    f"incl. the SDPA core {t['ideal_sdpa']:.2f}x; denoiser-loop time alone "
                    f"{t['denoiser_speedup']:.2f}x)"))
    tc, bc = rows.get("tgate_fx_compiled", {}), rows.get("baseline_compiled", {})
    if "median" in tc and "median" in bc and "median" in t:
        comp = bc["median"] / tc["median"]
        ok = comp >= t["speedup"]
        out.append(("compiled tgate_fx / compiled baseline >= eager speed-up", "PASS" if ok else "MISS",
                    f"{comp:.2f}x compiled vs {t['speedup']:.2f}x eager (denoiser loop: "
                    f"{bc['denoiser'] / tc['denoiser']:.2f}x vs {t['denoiser_speedup']:.2f}x)"))
    ref = rows.get("reference", {})
    if "median" in ref and "median" in t:
        ok = t["median"] <= ref["median"]
        out.append(("tgate_fx no slower than the reference package", "PASS" if ok else "MISS",
                    f"tgate_fx {t['median']:.2f} s vs reference {ref['median']:.2f} s "
                    f"(ratio {ref['median'] / t['median']:.3f}; denoiser loop {t['denoiser']:.2f} s vs "
                    f"{ref['denoiser']:.2f} s)"))
    elif "skipped" in ref:
        out.append(("tgate_fx no slower than the reference package", "n/a", ref["skipped"]))
    dc, dp = rows.get("deepcache_fx", {}), rows.get("deepcache_published", {})
    if "median" in dc and "median" in dp:
        diff = s["diffs"].get("deepcache_fx vs deepcache_published", float("nan"))
        ok = dc["median"] <= dp["median"] and diff == 0
        out.append(("DeepCache: tgate_fx at least as fast as the published package, at identical output",
                    "PASS" if ok else "MISS",
                    f"tgate_fx {dc['median']:.2f} s vs DeepCache 0.1.1 {dp['median']:.2f} s (ratio "
                    f"{dp['median'] / dc['median']:.3f}; denoiser loop {dc['denoiser']:.2f} s vs "
                    f"{dp['denoiser']:.2f} s); "
                    f"final latents max |difference| {diff:.3g}"))
    elif "skipped" in dp and "median" in dc:
        out.append(("DeepCache: tgate_fx at least as fast as the published package", "n/a", dp["skipped"]))
    for key in ("deepcache_fx", "deepcache_published", "tgate_deepcache_fx"):
        r = rows.get(key, {})
        if "median" in r:
            need = 0.9 * r["ideal_linear_conv"]
            out.append((f"{r['label']} speed-up >= 0.9 x MAC-ideal", "PASS" if r["speedup"] >= need else "MISS",
                        f"{r['speedup']:.3f}x measured vs {need:.3f}x needed (MAC-ideal "
                        f"{r['ideal_linear_conv']:.3f}x; incl. the SDPA core {r['ideal_sdpa']:.2f}x; denoiser-loop "
                        f"time alone {r['denoiser_speedup']:.2f}x)"))
    return out


def deepcache_table(s: dict, macs: dict) -> list[str]:
    """DeepCache columns, per kind of step: MACs and measured denoiser time against the baseline's same steps."""
    rows = s["rows"]
    b = rows.get("baseline", {})
    if "steps" not in b:
        return []
    base_step = macs["linear_conv"]["step_b2"]
    out = [("column", "step kind", "steps", "MACs / baseline", "time / baseline")]
    for key, method in (("deepcache_fx", "deepcache"), ("deepcache_published", "deepcache"),
                        ("tgate_deepcache_fx", "tgate_deepcache")):
        r = rows.get(key, {})
        variants = macs["linear_conv"].get(f"variants_{method}")
        if "steps" not in r or not variants:
            continue
        per_step = macs["linear_conv"][f"per_step_{method}"]
        kinds: dict[str, list[int]] = {}
        for i, v in enumerate(variants):
            kinds.setdefault(v, []).append(i)
        for v, idx in kinds.items():
            steps = ", ".join(str(i) for i in idx) if len(idx) <= 6 else f"{len(idx)} steps ({idx[0]}-{idx[-1]})"
            out.append((r["label"], v, steps, f"{sum(per_step[i] for i in idx) / (base_step * len(idx)):.3f}",
                        f"{sum(r['steps'][i] for i in idx) / sum(b['steps'][i] for i in idx):.3f}"))
    return _table(out) if len(out) > 1 else []


def _phase_note(rows: dict, macs: dict) -> str:
    """What the per-step times say about the goals, in numbers."""
    t, b = rows.get("tgate_fx", {}), rows.get("baseline", {})
    if "info" not in t or "steps" not in b:
        return ""
    variants = t["info"]["plan_variants"]
    per_step, base = macs["linear_conv"]["per_step"], macs["linear_conv"]["step_b2"]

    def ratio(row, ref, names):
        idx = [i for i, v in enumerate(variants) if v in names]
        return sum(row["steps"][i] for i in idx) / sum(ref["steps"][i] for i in idx), idx

    full, idx = ratio(t, b, ("sp_compute", "sp_record", "gate"))
    reuse, ridx = ratio(t, b, ("sp_reuse",))
    fi, fidx = ratio(t, b, ("fi_record", "fi_reuse"))
    reuse_macs = sum(per_step[i] for i in ridx) / (base * len(ridx)) if ridx else float("nan")
    fi_macs = sum(per_step[i] for i in fidx) / (base * len(fidx)) if fidx else float("nan")
    text = (f"Where the time goes (tgate_fx eager, time / baseline time on the same steps): steps that compute "
            f"every attention ({len(idx)} steps) {full:.3f}; self-attention reuse steps {reuse:.3f} for "
            f"{reuse_macs:.3f} of the MACs (the skipped SDPA core and softmax are not in the MAC count); "
            f"steps after the gate {fi:.3f} for {fi_macs:.3f} of the MACs (batch 1 instead of 2).")
    tc, bc = rows.get("tgate_fx_compiled", {}), rows.get("baseline_compiled", {})
    if "steps" in tc and "steps" in bc:
        cfull, _ = ratio(tc, bc, ("sp_compute", "sp_record", "gate"))
        creuse, _ = ratio(tc, bc, ("sp_reuse",))
        cfi, _ = ratio(tc, bc, ("fi_record", "fi_reuse"))
        text += (f" Compiled against compiled: {cfull:.3f}, {creuse:.3f} and {cfi:.3f}; compiled baseline "
                 f"against eager baseline, whole generation: {b['median'] / bc['median']:.2f}x.")
    return text


def phase_table(s: dict, macs: dict, plan_variants: list[str]) -> list[str]:
    """Per T-GATE phase: share of MACs and of measured denoiser time, baseline vs tgate_fx."""
    rows = s["rows"]
    if "tgate_fx" not in rows or "median" not in rows.get("baseline", {}):
        return []
    b_steps = rows["baseline"]["steps"]
    bc_steps = rows.get("baseline_compiled", {}).get("steps")
    base_step = macs["linear_conv"]["step_b2"]
    per_step = macs["linear_conv"]["per_step"]
    segs: list[tuple[str, list[int]]] = []
    for i, v in enumerate(plan_variants):
        if segs and segs[-1][0] == v:
            segs[-1][1].append(i)
        else:
            segs.append((v, [i]))
    cols = [(k, label, ref) for k, label, ref in (
        ("tgate_fx", "tgate_fx / baseline", b_steps), ("reference", "reference / baseline", b_steps),
        ("pab", "PAB / baseline", b_steps),
        ("tgate_fx_compiled", "compiled tgate_fx / compiled baseline", bc_steps)) if rows.get(k, {}).get("steps")
        and ref]
    out = [("steps", "variant", "MACs / baseline", *(label for _, label, _ in cols))]
    for v, idx in segs:
        row = [f"{idx[0]}-{idx[-1]}" if len(idx) > 1 else str(idx[0]), v,
               f"{sum(per_step[i] for i in idx) / (base_step * len(idx)):.3f}"]
        for k, _, ref in cols:
            row.append(f"{sum(rows[k]['steps'][i] for i in idx) / sum(ref[i] for i in idx):.3f}")
        out.append(tuple(row))
    return _table(out)


def machine() -> dict:
    import diffusers
    import torch
    import transformers

    try:
        from importlib import metadata
        tgate_version = metadata.version("tgate")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        tgate_version = "not installed"
    try:
        deepcache_version = metadata.version("DeepCache")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        deepcache_version = "not installed"
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "tgate": tgate_version,
            "deepcache": deepcache_version, "os": platform.platform()}


def write_markdown(path: str, args, mach: dict, loads: list[float], wall: float, per: dict) -> None:
    from columns import COLUMNS
    from workloads import WORKLOADS

    out = ["# torch benchmarks: tgate_fx vs baseline, torch.compile, reference T-GATE, DeepCache and diffusers PAB",
           ""]
    out += [f"Written by `python benchmarks/run.py {' '.join(args.argv)}`".rstrip() + f" on "
            f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, in {wall / 60:.1f} min.", ""]
    ran = {key for p in per.values() for key in p["summary"]["rows"]}
    not_run = [f"workload `{w}`" for w in WORKLOADS if w not in per] + [
        f"column `{c}`" for c in COLUMNS if c not in ran]
    if not_run:
        out += ["Not in this run (select them with `--workloads` / `--columns`): " + ", ".join(not_run) + ".", ""]
    out += ["## Machine", "",
            f"- CPU: {mach['cpu']}, {mach['cores']} cores; {mach['os']}",
            f"- torch {mach['torch']} (threads per process: {args.threads}), diffusers {mach['diffusers']}, "
            f"transformers {mach['transformers']}, tgate {mach['tgate']}, DeepCache {mach.get('deepcache', '?')}, "
            f"Python {mach['python']}",
            f"- Load average (1 min, `os.getloadavg()`): {loads[0]:.2f} at the start, {loads[-1]:.2f} at the end, "
            f"{min(loads):.2f}-{max(loads):.2f} over the run (sampled between workloads). The machine is shared "
            "with other work; "
            + (f"the load stayed at or below the {mach['cores']} cores. " if max(loads) <= mach["cores"] else
               f"a load above its {mach['cores']} cores means other processes competed for them, so absolute "
               "times are noisy. ")
            + "Columns are timed round-robin (one generation of each per round, order rotated every round) so "
            "that they share the same load, and every ratio is between medians of the same run.",
            f"- compile backend: `{args.backend}` (default mode"
            + (f", options `{getattr(args, 'compile_options', '{}')}`" if getattr(args, "compile_options", "{}")
               not in ("{}", "") else "") + "), "
            + ("inductor's default on-disk cache" if args.warm_compile_cache else
               "each compiled column in a fresh inductor cache directory (cold compile)")
            + (f"; compiled columns: {args.compiled_repeats} timed generations" if any(
                r.get("compiled") for p in per.values() for r in p["summary"]["rows"].values())
               else "; no compiled column in this run")
            + f"; eager columns: {args.repeats} timed generations; all after one warm-up generation.", "",
            "## How to read the tables", "",
            "- *median s*: median wall time of one whole 25-step generation (`output_type=\"latent\"`: text "
            "encoding, the denoising loop and the scheduler; no VAE decode), with min-max over the runs.",
            "- *speed-up*: baseline median / column median, same run. *loop*: the same for the time inside the "
            "denoising loop only (from the scheduler's `scale_model_input` to its `step`, summed over steps).",
            "- *MACs*: multiply-accumulates of the 25 denoiser calls, Linear + Conv layers (the convention of "
            "the T-GATE paper's calflops figures; the SDPA core `QK^T`, `AV` is not counted). "
            "*MAC-ideal*: baseline MACs / column MACs; *ideal+SDPA*: the same with the SDPA core counted. "
            "tgate_fx and the reference package run the same schedule, so they share the plan's MACs; PAB's "
            "MACs come from the attention modules it actually computed at each step (recorded in an extra, "
            "untimed generation), at the CFG batch on every step. The DeepCache columns' MACs are the plan's "
            "(`tgate_fx.plan_macs` of `Plan(25, [DeepCacheConfig(3, 0)])`, or with `TGateConfig(10, 1, 1, 0)` "
            "first, on the workload's architecture); the published DeepCache package runs the same modules on "
            "the same steps (its output is compared below), so it shares them.",
            "- *graphs / breaks*: dynamo's `unique_graphs` and graph breaks (`torch._dynamo.utils.counters`) "
            "over the whole process (warm-up + timed runs); *later*: graphs compiled after the warm-up "
            "generation (recompiles).",
            "- *peak RSS*: `ru_maxrss` of the column's own process (each column runs in its own process; "
            "compiled columns include inductor's compile-time peak).",
            "- *1st-gen overhead*: first generation minus the median one: for tgate_fx, the `torch.export` "
            "captures and graph rewrites of `optimize()` (it works lazily, at the first call); for compiled "
            "columns, plus the compile time.", ""]
    for name, p in per.items():
        w = WORKLOADS[name]
        s, macs, contrast = p["summary"], p["macs"], p.get("contrast")
        rows = s["rows"]
        out += [f"## {name}: {w.title}", "",
                f"- Scaled: {w.scaled}",
                f"- Denoiser: {macs['params'] / 1e6:.1f} M parameters. {macs['arch']}.",
                f"- T-GATE (published defaults): gate_step={w.tgate.gate_step}, sp_interval={w.tgate.sp_interval}, "
                f"fi_interval={w.tgate.fi_interval}, warm_up={w.tgate.warm_up}; 25 steps of "
                f"DPMSolverMultistepScheduler (DPM-Solver++), CFG on.", ""]
        table = [("column", "median s (min-max)", "speed-up", "loop", "MACs", "MAC-ideal", "ideal+SDPA",
                  "graphs / breaks (later)", "peak RSS MiB", "1st-gen overhead s")]
        for key, r in rows.items():
            if "skipped" in r:
                table.append((r["label"], "skipped", "-", "-", "-", "-", "-", "-", "-", r["skipped"]))
                continue
            overhead = f"{r['overhead']:.2f}"
            caps = r["info"].get("captures")
            if caps:
                overhead += f" (export {sum(c['seconds'] for c in caps):.2f})"
            if r["compiled"]:
                overhead += f" (FX-graph cache {r['fx_cache'][0]} hits, {r['fx_cache'][1]} misses)"
            table.append((r["label"], f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})", f"{r['speedup']:.2f}x",
                          f"{r['denoiser_speedup']:.2f}x", _fmt_macs(r["macs_linear_conv"]),
                          f"{r['ideal_linear_conv']:.2f}x", f"{r['ideal_sdpa']:.2f}x",
                          f"{r['graphs']} / {r['breaks']} ({r['later_graphs']})", f"{r['rss']:.0f}", overhead))
        out += _table(table) + [""]
        out += ["Goals:", ""]
        for goal, verdict, detail in p["goals"]:
            out.append(f"- **{verdict}** {goal}: {detail}")
        out.append("")
        note = _phase_note(rows, macs)
        if note:
            out += [note, ""]
        dtable = deepcache_table(s, macs)
        if dtable:
            out += ["DeepCache columns (UNet only): `tgate_fx.optimize(pipe, deepcache=DeepCacheConfig(3, 0))`; "
                    "the published `DeepCacheSDHelper(pipe)` with `set_params(cache_interval=3, cache_branch_id=0)`, "
                    "a fresh helper enabled before and disabled after each generation (outside the timed region); "
                    "`tgate_fx.optimize(pipe, tgate=TGateConfig(10, 1, 1, 0), deepcache=DeepCacheConfig(3, 0))` "
                    "(the T-GATE paper's T-GATE + DeepCache setting). Per kind of step, the denoiser time of those "
                    "steps (median over the runs, step by step) against the baseline's on the same steps:", ""]
            out += dtable + [""]
        t = rows.get("tgate_fx", {})
        if "info" in t:
            out += ["Per phase of the T-GATE plan: denoiser time of the phase's steps (median over the runs, "
                    "step by step) against the baseline's on the same steps (eager against eager, compiled "
                    "against compiled), next to the MACs:", ""]
            out += phase_table(s, macs, t["info"]["plan_variants"]) + [""]
            caps = t["info"]["captures"]
            out.append("tgate_fx captures: " + "; ".join(
                f"batch {c['batch']}: export {c['seconds']:.2f} s, variants {', '.join(c['variants'])}" for c in caps)
                + ". Plan MACs from the real captures: " + _fmt_macs(t["info"]["real_capture_macs"]["tgate"])
                + " (meta-device count of the scaled architecture: " + _fmt_macs(macs["linear_conv"]["tgate"])
                + ").")
            out.append("")
        pab = rows.get("pab", {})
        if "info" in pab:
            cfg = pab["info"]["pab_config"]
            reused = [i for i, step in enumerate(pab["info"]["pab_computed"])
                      if len(step) < len(pab["info"]["attention_sites"])]
            out += ["PAB: `diffusers.apply_pyramid_attention_broadcast(denoiser, PyramidAttentionBroadcastConfig("
                    + ", ".join(f"{k}={v}" for k, v in cfg.items()) + ", current_timestep_callback=...))`; "
                    f"{pab['info']['enable_cache']}, so the hooks are applied with the function and reset before "
                    "each generation by the benchmark. The timestep ranges are chosen so that PAB reuses "
                    "self-attention on the steps T-GATE's semantics-planning phase reuses it and cross-attention "
                    "from the gate on; unlike T-GATE it keeps the CFG batch (2 images) on every step. Steps on "
                    f"which PAB reused at least one module: {reused}.", ""]
        shares = macs["shares"]
        srows = [("MAC shares at the CFG batch", "self-attn sites", "cross-attn sites", "elsewhere", "per call")]
        for k in ("published_linear_conv", "scaled_linear_conv", "published_sdpa", "scaled_sdpa"):
            v = shares[k]
            srows.append((k.replace("_linear_conv", ", Linear+Conv").replace("_sdpa", ", +SDPA core"),
                          f"{v.get('self', 0):.1%}", f"{v.get('cross', 0):.1%}", f"{v.get('outside', 0):.1%}",
                          _fmt_macs(v["total"])))
        out += [f"Attention share, published ({macs['published']}) vs scaled:", ""] + _table(srows) + [""]
        if s["diffs"]:
            out += ["Final latents, max |difference| (baseline max |latent| "
                    f"{s['latent_scale']:.3g}): " + "; ".join(f"{k}: {v:.3g}" for k, v in s["diffs"].items()), ""]
        if contrast:
            out += [f"torch.compile counters over two generations (backend `{args.contrast_backend}`; dynamo's "
                    "counters do not depend on the backend, which only sets how long each compile takes):", ""]
            crow = [("column", "gen 1: s / graphs / breaks", "gen 2: s / graphs / breaks", "recompile-limit hits")]
            from columns import CONTRAST_COLUMNS
            for key, c in contrast.items():
                g1, g2 = c["runs"]
                crow.append((CONTRAST_COLUMNS[key].label, f"{g1['wall']:.2f} / {g1['graphs']} / {g1['breaks']}",
                             f"{g2['wall']:.2f} / {g2['graphs']} / {g2['breaks']}", str(c["limit_hits"])))
            out += _table(crow) + [""]
            pab = contrast.get("pab_compiled")
            if pab and pab["limit_hits"]:
                g1, g2 = pab["runs"]
                out += [f"PAB under torch.compile: its hooks keep Python state (the timestep, a call counter) that "
                        f"dynamo guards on, so the denoiser recompiles at each step; after {g1['graphs']} graphs "
                        f"dynamo hits `torch._dynamo.config.recompile_limit` ({_recompile_limit()}); from then on "
                        "it compiles nothing more for that frame and runs uncompiled whenever none of the cached "
                        f"graphs' guards match (generation 2: {g2['graphs']} new graphs)."
                        + (f" The last guard that failed: `{pab['recompile_reason']}`."
                           if pab.get("recompile_reason") else ""), ""]
        out += ["Wall time of every timed run (s): "] + [
            f"- {r['label']}: " + ", ".join(f"{x:.2f}" for x in r["walls"]) for r in rows.values() if "walls" in r]
        out.append("")
    if per and args.png:
        out += [f"Plot: `{os.path.basename(args.png)}` (median time against Linear+Conv MACs; bars span min-max; "
                "the dashed line is time proportional to MACs through the baseline).", ""]
    with open(path, "w") as f:
        f.write("\n".join(out))


def _recompile_limit() -> int:
    import torch._dynamo.config

    return torch._dynamo.config.recompile_limit


def plot(path: str, per: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per), figsize=(6.5 * len(per), 5), squeeze=False)
    markers = {"baseline": "o", "tgate_fx": "s", "reference": "^", "pab": "D", "baseline_compiled": "o",
               "tgate_fx_compiled": "s", "deepcache_fx": "P", "deepcache_published": "X", "tgate_deepcache_fx": "*"}
    for ax, (name, p) in zip(axes[0], per.items()):
        rows = p["summary"]["rows"]
        for key, r in rows.items():
            if "median" not in r:
                continue
            x = r["macs_linear_conv"] / 1e9
            ax.errorbar([x], [r["median"]], yerr=[[r["median"] - r["min"]], [r["max"] - r["median"]]],
                        marker=markers.get(key, "x"), markersize=8, capsize=4, linestyle="none",
                        fillstyle="none" if r["compiled"] else "full", label=r["label"])
        for key, style in (("baseline", "--"), ("baseline_compiled", ":")):
            if "median" in rows.get(key, {}):
                b = rows[key]
                xs = [0, b["macs_linear_conv"] / 1e9 * 1.05]
                ax.plot(xs, [v * b["median"] / (b["macs_linear_conv"] / 1e9) for v in xs], style, color="grey",
                        linewidth=1, label=f"time ∝ MACs ({b['label']})")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("denoiser MACs per generation (G, Linear + Conv)")
        ax.set_ylabel("median wall time per generation (s)")
        ax.set_title(f"{name}: 25 steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from columns import COLUMNS
    from workloads import WORKLOADS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {list(WORKLOADS)}")
    parser.add_argument("--columns", default=",".join(COLUMNS), help=f"comma-separated, of {list(COLUMNS)}")
    parser.add_argument("--repeats", type=int, default=7, help="timed generations of eager columns (default 7)")
    parser.add_argument("--compiled-repeats", type=int, default=5, help="timed generations of compiled columns")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads per worker (default: all cores; on a busy shared machine 1 is steadier)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled columns")
    parser.add_argument("--compile-options", default="{}",
                        help='JSON dict of inductor options for the compiled columns, e.g. \'{"freezing": true}\' '
                             "(passed as torch.compile(..., options=...))")
    parser.add_argument("--contrast-backend", default="eager",
                        help="backend of the two-generation compile-counter contrast (default eager: PAB "
                             "recompiles at every step, and inductor would spend minutes on each); 'none' skips it")
    parser.add_argument("--warm-compile-cache", action="store_true",
                        help="let compiled columns use inductor's default on-disk cache (compile times then depend "
                             "on earlier runs); by default each column compiles into a fresh cache directory")
    parser.add_argument("--out", default=os.path.join(RESULTS, "torch_bench.md"))
    parser.add_argument("--png", default=None, help="plot file (default: --out with .png)")
    parser.add_argument("--raw", default=os.path.join(tempfile.gettempdir(), "tgate_fx_torch_bench.json"),
                        help="where the raw measurements are kept (JSON), for --render")
    parser.add_argument("--render", metavar="RAW", help="only rewrite the markdown and plot from a --raw file")
    parser.add_argument("--no-plot", action="store_true", help="write the markdown only (no matplotlib needed)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.png = None if args.no_plot else (args.png or os.path.splitext(args.out)[0] + ".png")
    # Optional dependencies are checked now, not after a run of half an hour: a missing plotting library
    # must never cost the measurements.
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            parser.error(f"the plot needs matplotlib ({e}): `pip install -e '.[bench]'` (or `pip install "
                         "'matplotlib>=3.7'`), or pass --no-plot to write the markdown only")
    try:
        if not isinstance(json.loads(args.compile_options), dict):
            raise ValueError
    except ValueError:
        parser.error(f"--compile-options must be a JSON object, got {args.compile_options!r}")
    if args.render:
        with open(args.render) as f:
            raw = json.load(f)
        for k, v in raw["args"].items():
            if k not in ("out", "png"):
                setattr(args, k, v)
        for p in raw["per"].values():  # the goals as this version states them, from the stored medians
            p["goals"] = goals(p["summary"])
        _write(args, raw["machine"], raw["loads"], raw["wall"], raw["per"])
        return 0
    workloads = [x for x in args.workloads.split(",") if x]
    columns = [x for x in args.columns.split(",") if x]
    for x in workloads:
        if x not in WORKLOADS:
            parser.error(f"unknown workload {x!r}; choose from {list(WORKLOADS)}")
    for x in columns:
        if x not in COLUMNS:
            parser.error(f"unknown column {x!r}; choose from {list(COLUMNS)}")
    for column, module, pin in (("reference", "tgate", "tgate==1.0.0"),
                                ("deepcache_published", "DeepCache", "DeepCache==0.1.1")):
        if column in columns and importlib.util.find_spec(module) is None:
            _log(f"note: `{module}` is not installed, so column {column} will be skipped (listed as skipped in the "
                 f"results); `pip install -e '.[bench]'` or `pip install '{pin}'` to run it")
    if "baseline" not in columns:
        parser.error("the baseline column is needed: every ratio is against it")
    if args.repeats < 1 or args.compiled_repeats < 1 or args.threads < 1:
        parser.error("--repeats, --compiled-repeats and --threads must be >= 1")
    if args.repeats < 5 or args.compiled_repeats < 5:
        _log("note: fewer than 5 repeats: fine for trying the script, too few for results")

    start = time.perf_counter()
    mach = machine()
    loads = [os.getloadavg()[0]]
    _log(f"machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, diffusers {mach['diffusers']}, "
         f"{args.threads} threads per worker, load {loads[0]:.2f}")
    if args.threads > 1 and loads[0] > 0.5:
        _log(f"warning: load average {loads[0]:.2f} with {args.threads} threads per worker: when other processes "
             "hold the cores, OpenMP threads wait for each other at every op and times can grow tenfold; "
             "--threads 1 is steadier on a shared machine")
    per = {}
    with tempfile.TemporaryDirectory(prefix="tgate_fx_bench_") as tmpdir:
        for name in workloads:
            macs = run_macs(name)
            res = bench_workload(name, columns, args.repeats, args.compiled_repeats, args.threads, args.backend,
                                 tmpdir, not args.warm_compile_cache, args.compile_options)
            loads.append(os.getloadavg()[0])
            summary = summarize(name, res, macs)
            per[name] = {"macs": macs, "summary": summary, "goals": goals(summary)}
            if args.contrast_backend != "none":
                per[name]["contrast"] = contrast_workload(name, args.threads, args.contrast_backend, tmpdir,
                                                          not args.warm_compile_cache)
                loads.append(os.getloadavg()[0])
            for goal, verdict, detail in per[name]["goals"]:
                _log(f"[{name}] {verdict}: {goal}: {detail}")
    wall = time.perf_counter() - start
    with open(args.raw, "w") as f:
        json.dump({"args": {k: getattr(args, k) for k in ("argv", "threads", "backend", "contrast_backend",
                                                          "repeats", "compiled_repeats", "warm_compile_cache",
                                                          "compile_options")},
                   "machine": mach, "loads": loads, "wall": wall, "per": per}, f)
    _write(args, mach, loads, wall, per)
    _log(f"raw measurements: {args.raw}; total {wall / 60:.1f} min")
    return 0


def _write(args, mach: dict, loads: list[float], wall: float, per: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.png:
        plot(args.png, per)
    write_markdown(args.out, args, mach, loads, wall, per)
    with open(args.out) as f:
        _log("\n" + f.read())
    _log(f"wrote {args.out}" + (f" and {args.png}" if args.png else " (no plot: --no-plot)"))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        from columns import worker_main

        sys.exit(worker_main(*sys.argv[2:4], int(sys.argv[4]), *sys.argv[5:8]))
    if len(sys.argv) > 1 and sys.argv[1] == "--macs":
        sys.exit(macs_main(sys.argv[2]))
    sys.exit(main())
