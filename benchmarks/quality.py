"""Speed-vs-quality frontier of every tgate_fx method and the peers users pick, on the shipped shapes testbeds.

Usage::

    python benchmarks/quality.py --testbed unet      # 15-40 min on one core (more on a busy machine)
    python benchmarks/quality.py --testbed dit
    python benchmarks/quality.py --testbed unet --seen-every 63 --held-out-per-combo 1 --chunk 25 \\
        --settings "gate 10|DeepCache interval 3"     # a quick look (regex on the row names)

Testbeds: ``unet`` = :func:`tgate_fx.shapes.load_pipeline` (a tiny SD 1.x, 25
DPM-Solver++ steps, guidance 7.5); ``dit`` = :func:`tgate_fx.shapes.load_dit_pipeline`
(a tiny PixArt-alpha, 20 steps, guidance 4.5); ``flux`` = :func:`tgate_fx.shapes.load_flux_pipeline`
(a tiny FLUX.1, 20 flow-matching Euler steps, true CFG 4.0). Settings: ``benchmarks/frontier_settings.py``
(T-GATE at a gate-step sweep and its ablations, DeepCache, ToDo, T-GATE + ToDo,
T-GATE + DeepCache, ToCa when tgate_fx has it; diffusers' PAB, FasterCache,
FirstBlockCache, TaylorSeer; ``tomesd``; the published ``DeepCache``; each
where it applies).

**Sample.** A fixed subsample, the same for every setting: every
``--seen-every``-th of the 315 captions seen in training (``--seen-per-combo``
pictures each) and ``--held-out-per-combo`` pictures of each of the 45
held-out captions; picture ``i`` of the sample from seed ``--seed + i``. It is
generated in batches of ``--chunk`` pictures (every batch the same size, so
that tgate_fx captures once per batch size).

**Measures**, per setting: per-attribute accuracy of the shipped evaluator on
seen and on held-out captions, the fraction with all four right, the paired
difference to the baseline's all-four accuracy with its standard error (same
seeds, so per-picture differences), the Fréchet distance of evaluator
features to real pictures of the same captions, the mean absolute pixel
difference to the baseline's pictures, and the wall time of the pipeline
calls over every batch but the first (which pays for capture and first-call
costs), as a ratio to the baseline's. The baseline is run first and last;
its time is the mean of the two.

Writes ``benchmarks/results/frontier_<testbed>.md`` (tables), ``.json`` (every
figure), ``.png`` (all-four accuracy and FD against time ratio, frontier
marked), ``frontier_<testbed>_attention_change.png`` (the cross-attention
convergence curve of the baseline) and ``frontier_<testbed>_samples.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time

if __name__ == "__main__" and "OMP_WAIT_POLICY" not in os.environ:
    # libgomp's worker threads spin while they wait; on a CPU shared with other
    # jobs that makes each step many times slower. The policy is read when
    # torch loads: start again with it.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

_START = time.time()


def _log(message: str) -> None:
    print(f"[{time.time() - _START:6.0f}s] {message}", flush=True)


def _check_dependencies(testbed: str, plot: bool) -> None:
    """Stop before any work if a package the run needs is missing, saying what to install."""
    import importlib.util

    from frontier_settings import PEER_PACKAGES

    needed = dict(PEER_PACKAGES[testbed])
    if plot:
        needed["matplotlib"] = "matplotlib>=3.7"
    missing = [spec for module, spec in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        sys.exit(f"benchmarks/quality.py --testbed {testbed} needs {', '.join(missing)}, not installed. "
                 f"Install the bench extra: pip install -e \".[bench]\" (or: pip install {' '.join(missing)})"
                 + ("; --no-plot skips matplotlib" if plot and "matplotlib>=3.7" in missing else ""))


import numpy as np  # noqa: E402
import torch  # noqa: E402

import tgate_fx  # noqa: E402
from tgate_fx.shapes import data, evaluator, load_dit_pipeline, load_flux_pipeline, load_pipeline  # noqa: E402
from tgate_fx.shapes.evaluate import attention_change, call_kwargs, plot_change  # noqa: E402
from common import cpu_model  # noqa: E402

LOADERS = {"unet": load_pipeline, "dit": load_dit_pipeline, "flux": load_flux_pipeline}
TITLES = {"unet": "UNet (tiny SD 1.x)", "dit": "DiT (tiny PixArt-alpha)", "flux": "FLUX (tiny FLUX.1)"}
SPLITS = (("seen", "train"), ("held-out", "held_out"))
WITHIN = 0.03  # "keeps accuracy": no attribute more than 3 points below the baseline, on either split


def _sample(args) -> tuple[list[data.Combo], list[str]]:
    """The fixed sample: combos, and the split of each picture."""
    seen = [c for c in data.combinations("train")[::args.seen_every] for _ in range(args.seen_per_combo)]
    held = [c for c in data.combinations("held_out") for _ in range(args.held_out_per_combo)]
    return seen + held, ["seen"] * len(seen) + ["held-out"] * len(held)


def _generate(installed, combos, kwargs, args, label: str) -> tuple[torch.Tensor, list[float], list[float]]:
    """Pictures of ``combos`` in equal batches; the wall and CPU time of each pipeline call (with its before/after)."""
    images, times, cpu = [], [], []
    n_chunks = len(combos) // args.chunk
    for k in range(n_chunks):
        chunk = combos[k * args.chunk:(k + 1) * args.chunk]
        gens = [torch.Generator().manual_seed(args.seed + k * args.chunk + i) for i in range(len(chunk))]
        start, start_cpu = time.perf_counter(), time.process_time()
        installed.before_call()
        try:
            out = installed.pipe([c.caption for c in chunk], generator=gens, output_type="pt", **kwargs).images
        finally:
            installed.after_call()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        images.append(out.float())
        print(f"\r[{time.time() - _START:6.0f}s]   {label}: batch {k + 1}/{n_chunks} {times[-1]:.1f}s", end="",
              flush=True)
    print(flush=True)
    return torch.cat(images), times, cpu


def _scores(clf, images, labels, splits, real_features, base: dict | None) -> dict:
    predicted, features = evaluator.predict(clf, images)
    hits = (predicted == labels)
    out: dict = {"fd": evaluator.frechet_distance(features, real_features), "hits": hits}
    for split, _ in SPLITS:
        mask = torch.tensor([s == split for s in splits])
        h = hits[mask].float()
        all4 = h.all(1).float()
        r = {name: float(h[:, i].mean()) for i, name in enumerate(data.ATTRIBUTES)}
        r["all four"] = float(all4.mean())
        r["n"] = int(mask.sum())
        if base is not None:
            b = base["hits"][mask].float()
            d = all4 - b.all(1).float()
            r["d_all_four"] = float(d.mean())
            r["d_all_four_se"] = float(d.std(unbiased=True) / len(d) ** 0.5) if len(d) > 1 else 0.0
            r["d_attr"] = {name: float((h[:, i] - b[:, i]).mean()) for i, name in enumerate(data.ATTRIBUTES)}
        out[split] = r
    return out


def _pareto(points: list[tuple[float, float]], higher_better: bool) -> list[int]:
    """Indices of the points no other point beats on both time (lower) and quality."""
    keep = []
    for i, (t, q) in enumerate(points):
        dominated = False
        for j, (t2, q2) in enumerate(points):
            better_q = q2 > q if higher_better else q2 < q
            same_q = q2 == q
            if j != i and t2 <= t and (better_q or (same_q and t2 < t)):
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


FAMILY_STYLE = {
    "baseline": ("k", "*"), "tgate_fx graphs": ("0.5", "*"),
    "T-GATE": ("tab:blue", "o"), "T-GATE ablation": ("tab:cyan", "o"), "DeepCache": ("tab:green", "s"),
    "ToDo": ("tab:orange", "D"), "T-GATE + ToDo": ("tab:red", "D"), "T-GATE + DeepCache": ("tab:olive", "s"),
    "ToCa": ("tab:purple", "P"), "T-GATE + ToCa": ("tab:pink", "P"),
    "PAB": ("tab:brown", "v"), "FasterCache": ("magenta", "^"), "FirstBlockCache": ("teal", "<"),
    "TaylorSeer": ("gold", ">"), "tomesd": ("navy", "x"), "DeepCache (published)": ("lime", "+"),
    "block cache": ("darkgreen", "h"), "block cache + T-GATE": ("tab:blue", "h"), "block cache + ToCa": ("tab:purple", "h"),
    "cache-dit DBCache": ("darkorange", "X"),
}


def _plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    panels = [("seen", "all four right, seen captions (%)", True),
              ("held-out", "all four right, held-out captions (%)", True),
              ("fd", "Fréchet distance to real (evaluator features)", False)]
    fig, grid = plt.subplots(2, 3, figsize=(17, 10))
    for ax, (key, ylabel, higher), xkey in [(ax, panel, xkey) for axes, xkey in zip(grid, ("ratio", "cpu_ratio"))
                                            for ax, panel in zip(axes, panels)]:
        value = (lambda r: r["fd"]) if key == "fd" else (lambda r, k=key: 100 * r[k]["all four"])
        points = [(r[xkey], value(r)) for r in ok]
        seen_families = set()
        for r, (x, y) in zip(ok, points):
            colour, marker = FAMILY_STYLE.get(r["family"], ("grey", "o"))
            label = r["family"] if r["family"] not in seen_families else None
            seen_families.add(r["family"])
            ax.scatter([x], [y], c=[colour], marker=marker, s=55 if r["ours"] else 45, label=label,
                       edgecolors="k" if r["ours"] else "none", linewidths=0.5, zorder=3)
        front = _pareto(points, higher)
        ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="k", lw=1,
                alpha=0.6, zorder=2, label="frontier")
        for i in front:
            ax.annotate(ok[i]["name"], points[i], fontsize=6.5, xytext=(4, 3), textcoords="offset points")
        base = next(r for r in ok if r["family"] == "baseline")
        if key != "fd":
            ax.axhline(100 * base[key]["all four"] - 100 * WITHIN, color="r", lw=0.8, ls=":",
                       label="baseline - 3 points")
        ax.axvline(1.0, color="k", lw=0.6, ls=":")
        if key == "fd":
            ax.set_yscale("log")
        ax.set_xlabel("wall time / baseline (lower is faster)" if xkey == "ratio"
                      else "CPU time of the process / baseline (the check on a shared machine)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = grid[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=9, fontsize=7.5, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(testbed: str, base: dict, steps: int) -> str:
    n_seen, n_held = base["seen"]["n"], base["held-out"]["n"]
    return (f"{TITLES[testbed]} testbed, {steps} steps: quality against time, {n_seen + n_held} pictures "
            f"({n_seen} of seen captions, {n_held} of held-out captions); top: wall time, bottom: CPU time")


def _save_samples(images_by_name: dict[str, torch.Tensor], path: str) -> None:
    from PIL import Image, ImageDraw

    rows, names = [], []
    for name, images in images_by_name.items():
        row = images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
        rows.append(np.concatenate(list(row), axis=1))
        names.append(name)
    grid = np.concatenate(rows, axis=0)
    scale, margin = 3, 190
    big = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    canvas = Image.new("RGB", (big.width + margin, big.height), "white")
    canvas.paste(big, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        draw.text((4, i * 32 * scale + 40), name[:30], fill="black")
    canvas.save(path)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _machine(loads: list[tuple[str, tuple]]) -> list[str]:
    return [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        f"- torch {torch.__version__}, diffusers {_version('diffusers')}, tomesd {_version('tomesd')}, "
        f"DeepCache {_version('DeepCache')}, cache-dit {_version('cache-dit')}, Python {platform.python_version()}, {platform.system()} "
        f"{platform.machine()}",
        f"- tgate_fx methods: {', '.join(_methods())}; date {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "- load average (1, 5, 15 min): " + "; ".join(f"{when} {l[0]:.1f}, {l[1]:.1f}, {l[2]:.1f}"
                                                      for when, l in loads),
    ]


def _methods() -> list[str]:
    from tgate_fx.methods import METHODS

    return list(METHODS)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _guidance(kwargs: dict) -> float:
    """The CFG scale of the call: ``guidance_scale``, or FLUX's ``true_cfg_scale``."""
    return kwargs["true_cfg_scale"] if "true_cfg_scale" in kwargs else kwargs["guidance_scale"]


def _keeps(r: dict, base: dict) -> bool:
    return all(base[s][a] - r[s][a] <= WITHIN + 1e-9 for s, _ in SPLITS for a in data.ATTRIBUTES)


def _worst(r: dict, base: dict) -> str:
    drops = [(base[s][a] - r[s][a], s, a) for s, _ in SPLITS for a in data.ATTRIBUTES]
    d, s, a = max(drops)
    return f"{a} {s} -{100 * d:.1f}" if d > 1e-9 else "none"


def _markdown(rows, base, real, meta, args, testbed) -> str:
    attrs = list(data.ATTRIBUTES)
    n_seen, n_held = base["seen"]["n"], base["held-out"]["n"]
    ok = [r for r in rows if "error" not in r]
    failed = [r for r in rows if "error" in r]
    front_pooled = _pareto([(r["ratio"], r["pooled"]) for r in ok], True)
    front_cpu = _pareto([(r["cpu_ratio"], r["pooled"]) for r in ok], True)
    se = {s: (base[s]["all four"] * (1 - base[s]["all four"]) / base[s]["n"]) ** 0.5 for s, _ in SPLITS}
    lines = [
        f"# Quality frontier on the {TITLES[testbed]} testbed",
        "",
        f"Written by `python benchmarks/quality.py {' '.join(meta['argv'])}` in {meta['seconds']:.0f} s.",
        "",
        *_machine(meta["loads"]),
        "",
        f"**Pipeline**: `tgate_fx.shapes.{LOADERS[testbed].__name__}()`, {meta['steps']} "
        + ("flow-matching Euler steps, true CFG " if testbed == "flux" else "DPM-Solver++ steps, guidance ")
        + f"{meta['guidance']}, CFG on"
        + (" (two transformer calls per step, the empty caption as negative prompt)." if testbed == "flux" else "."),
        "",
        f"**Sample** (the same pictures and seeds for every setting): one in {args.seen_every} of the 315 "
        f"captions seen in training x {args.seen_per_combo} = **{n_seen} seen** pictures, and the 45 held-out "
        f"captions x {args.held_out_per_combo} = **{n_held} held-out** pictures; picture i from seed "
        f"{args.seed} + i; batches of {args.chunk}. Standard error of an accuracy p at these sizes: "
        f"sqrt(p(1-p)/n), e.g. the baseline's all-four accuracy {_pct(base['seen']['all four'])}% "
        f"+- {100 * se['seen']:.1f} (seen) and {_pct(base['held-out']['all four'])}% "
        f"+- {100 * se['held-out']:.1f} (held-out). A setting is compared with the baseline picture by "
        "picture (same seed): the difference in all-four accuracy comes with its paired standard error, "
        "which is smaller when most pictures keep their verdict.",
        "",
        "**Time**: wall time of the pipeline calls (text encoding, denoising, VAE decode) over batches "
        f"2..{meta['chunks']} ({meta['timed']} pictures; batch 1 pays capture and first-call costs and is "
        f"not timed), divided by the baseline's (run first: {meta['base_times'][0]:.1f} s, last: "
        f"{meta['base_times'][1]:.1f} s; their mean is used; the two runs' pictures differ by at most "
        f"{meta['base_repeat_diff']:.1e}). One process, one thread, settings one after another. The machine is "
        "shared: waiting for the CPU shows in wall time, so the CPU time of the process "
        f"(`time.process_time`, baseline {meta['base_cpu'][0]:.1f} s and {meta['base_cpu'][1]:.1f} s) is given "
        "next to it as a check; where the two ratios disagree by more than a few percent, the load changed "
        "during that setting.",
        "",
        "**FD**: Fréchet distance of the evaluator's 64-d features of all "
        f"{n_seen + n_held} pictures to {args.real} real pictures of the same captions; the `real pictures` "
        f"row is {n_seen + n_held} real pictures of the sample's captions (the floor at this sample size). "
        "**Mean abs diff**: mean |pixel - baseline pixel|, pixels in [0, 1].",
        "",
        f"**Keeps accuracy** (within 3 pts): no attribute, on either split, more than {100 * WITHIN:.0f} "
        "points below the baseline; otherwise the worst drop is named. **Frontier**: no other setting is both "
        "at least as fast and more accurate (all four right, seen and held-out pooled): F by wall time, "
        "F (CPU) by CPU time. The plot's top row is against wall time, its bottom row against CPU time.",
        "",
        "## Frontier table",
        "",
        "| setting | time / baseline | speed-up | CPU time / baseline | seen: all four | held-out: all four | "
        "seen: diff (paired SE) | held-out: diff (paired SE) | FD | mean abs diff | within 3 pts | F | F (CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
        f"| real pictures | | | | {_pct(real['seen']['all four'])} | {_pct(real['held-out']['all four'])} | | | "
        f"{real['fd']:.2f} | | | | |",
    ]
    for i, r in enumerate(ok):
        d = "" if r is base else " | ".join(
            f"{100 * r[s]['d_all_four']:+.1f} ({100 * r[s]['d_all_four_se']:.1f})" for s, _ in SPLITS)
        keeps = "" if r is base else ("yes" if _keeps(r, base) else f"no ({_worst(r, base)})")
        lines.append(
            f"| {r['name']} | {r['ratio']:.2f} | {1 / r['ratio']:.2f}x | {r['cpu_ratio']:.2f} | {_pct(r['seen']['all four'])} | "
            f"{_pct(r['held-out']['all four'])} | {d if d else ' | '} | {r['fd']:.2f} | {r['diff']:.4f} | "
            f"{keeps} | {'F' if i in front_pooled else ''} | {'F' if i in front_cpu else ''} |")
    lines += [
        "",
        f"![frontier](frontier_{testbed}.png)",
        "",
        "## Accuracy per attribute (%)",
        "",
        "| setting | " + " | ".join(f"seen: {a}" for a in attrs) + " | " + " | ".join(f"held-out: {a}" for a in attrs)
        + " |",
        "|---|" + "---:|" * (2 * len(attrs)),
        "| real pictures | " + " | ".join(_pct(real[s][a]) for s, _ in SPLITS for a in attrs) + " |",
    ]
    for r in ok:
        lines.append(f"| {r['name']} | " + " | ".join(_pct(r[s][a]) for s, _ in SPLITS for a in attrs) + " |")
    lines += [
        "",
        "## Settings",
        "",
        "| setting | family | what runs | time of timed batches (s) |",
        "|---|---|---|---:|",
    ]
    for r in rows:
        t = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        lines.append(f"| {r['name']} | {r['family']}{'' if r['ours'] else ' (peer)'} | {r['params']} | {t} |")
    if failed:
        lines += ["", "## Settings that did not run", ""]
        lines += [f"- **{r['name']}** ({r['params']}): `{r['error']}`" for r in failed]
    lines += ["", "## Not applicable on this testbed", ""]
    lines += [f"- **{name}**: {why}" for name, why in meta["not_applicable"]]
    curves = meta["curves"]
    if curves is None:  # FLUX: no attn1/attn2 sites (see tgate_fx.shapes.evaluate.attention_change)
        curves = {"sites": 0, "cross": [], "self": []}
        lines += ["", "## Cross-attention convergence", "",
                  "Not measured on this testbed: FLUX's blocks have one joint attention, no `attn1`/`attn2` "
                  "pair, and `tgate_fx.shapes.evaluate.attention_change` refuses it. The gate sweep above is the "
                  "test of whether the text stream converges.",
                  "", "## Samples", "",
                  "First held-out pictures (same seeds in every row): baseline, then the first setting of each "
                  "family.", "", f"![samples](frontier_{testbed}_samples.png)", ""]
        return "\n".join(lines)
    lines += [
        "",
        "## Cross-attention convergence (the observation T-GATE rests on)",
        "",
        f"One baseline generation of the 45 held-out captions; {curves['sites']} cross-attention (`attn2`) "
        "sites and as many self-attention (`attn1`) sites. Mean over sites, pictures and CFG halves of "
        "||A_t - A_{t-1}|| / ||A_{t-1}|| (attention output after `to_out`).",
        "",
        f"![attention change](frontier_{testbed}_attention_change.png)",
        "",
        "| step | cross-attention | self-attention |",
        "|---:|---:|---:|",
        *[f"| {s} | {c:.4f} | {v:.4f} |" for (s, c), (_, v) in zip(curves["cross"], curves["self"])],
        "",
        "## Samples",
        "",
        "First held-out pictures (same seeds in every row): baseline, then the first setting of each family.",
        "",
        f"![samples](frontier_{testbed}_samples.png)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", choices=sorted(LOADERS), required=True)
    parser.add_argument("--seen-every", type=int, default=3, help="every N-th of the 315 seen captions")
    parser.add_argument("--seen-per-combo", type=int, default=1)
    parser.add_argument("--held-out-per-combo", type=int, default=3, help="pictures of each of the 45 held-out captions")
    parser.add_argument("--chunk", type=int, default=60, help="pictures per pipeline call; must divide the sample")
    parser.add_argument("--settings", default=None, help="regex: run only the settings whose name matches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=int, default=2000, help="real pictures for the Fréchet distance")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-plot", action="store_true", help="write the markdown and JSON only")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--replot", action="store_true",
                        help="only redraw frontier_<testbed>.png from the frontier_<testbed>.json of an earlier run")
    args = parser.parse_args(argv)
    if args.replot:
        with open(os.path.join(args.out, f"frontier_{args.testbed}.json")) as f:
            saved = json.load(f)
        base = saved["rows"][0]
        _plot(saved["rows"], os.path.join(args.out, f"frontier_{args.testbed}.png"),
              _title(args.testbed, base, saved["meta"]["steps"]))
        return
    _check_dependencies(args.testbed, not args.no_plot)
    torch.set_num_threads(args.threads)
    from frontier_settings import Context, not_applicable, settings_for

    combos, splits = _sample(args)
    if len(combos) % args.chunk or len(combos) // args.chunk < 2:
        raise SystemExit(f"--chunk {args.chunk} must divide the sample ({len(combos)} pictures) into >= 2 batches")
    labels = torch.tensor([c.labels for c in combos])
    os.makedirs(args.out, exist_ok=True)
    loads = [("start", os.getloadavg())]
    testbed = args.testbed
    loader = LOADERS[testbed]
    base_pipe = loader()
    kwargs = call_kwargs(base_pipe)
    steps = kwargs["num_inference_steps"]
    settings = settings_for(testbed, steps)
    if args.settings:
        settings = [s for s in settings if re.search(args.settings, s.name)]
    _log(f"{TITLES[testbed]}: {len(combos)} pictures ({splits.count('seen')} seen, {splits.count('held-out')} "
         f"held-out), {len(combos) // args.chunk} batches of {args.chunk}; {len(settings)} settings + baseline x2")

    clf = evaluator.load_evaluator()
    _log(f"rendering {args.real} real pictures of the sample's captions (+{len(combos)} for the floor)")
    real_ref = data.generate(args.real, seed=args.seed + 10_000, combos=combos)
    _, real_features = evaluator.predict(clf, real_ref.images)
    floor = data.generate(len(combos), seed=args.seed + 20_000, combos=combos)
    # data.generate draws combos in a seeded order: score the floor by its own labels and splits.
    held = set(data.combinations("held_out"))
    floor_splits = ["held-out" if c in held else "seen" for c in floor.combos]
    real = _scores(clf, floor.images, floor.labels, floor_splits, real_features, None)

    curves = None
    if testbed != "flux":  # FLUX has no attn1/attn2 sites to measure
        _log("baseline with attention hooks (convergence curve, 45 held-out captions)")
        curves = attention_change(base_pipe, seed=args.seed, **kwargs)
    if curves is not None and not args.no_plot:
        plot_change(curves, os.path.join(args.out, f"frontier_{testbed}_attention_change.png"),
                    f"Attention change per step: {TITLES[testbed]}, {steps} steps, CFG {_guidance(kwargs)}")

    from frontier_settings import Installed

    baseline = Installed(base_pipe)
    _log("baseline (first)")
    base_images, base_t0, base_c0 = _generate(baseline, combos, kwargs, args, "baseline")
    base = _scores(clf, base_images, labels, splits, real_features, None)
    rows: list[dict] = []
    ctx = Context(testbed, steps, loader)
    samples = {"baseline": base_images}
    held_idx = [i for i, s in enumerate(splits) if s == "held-out"][:12]
    for k, setting in enumerate(settings):
        _log(f"[{k + 1}/{len(settings)}] {setting.name}: {setting.params}")
        row = {"name": setting.name, "family": setting.family, "ours": setting.ours, "params": setting.params}
        installed = None
        try:
            installed = setting.install(ctx)
            torch.manual_seed(args.seed)
            images, times, cpu = _generate(installed, combos, kwargs, args, setting.name)
        except Exception as e:  # recorded as a row that did not run, with the reason
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            _log(f"  did not run: {row['error']}")
            rows.append(row)
            continue
        finally:
            if installed is not None:
                installed.remove()
        row.update(_scores(clf, images, labels, splits, real_features, base))
        row.update(times=times, seconds=sum(times[1:]), cpu_seconds=sum(cpu[1:]), diff=float((images - base_images).abs().mean()))
        if setting.family not in {r["family"] for r in rows if "error" not in r}:
            samples[setting.name] = images[held_idx]
        rows.append(row)
        _log(f"  {row['seconds']:.1f}s timed; all four seen {_pct(row['seen']['all four'])} "
             f"(baseline {_pct(base['seen']['all four'])}), held-out {_pct(row['held-out']['all four'])} "
             f"(baseline {_pct(base['held-out']['all four'])}); FD {row['fd']:.2f}")
    if ctx._fx_pipe is not None:
        tgate_fx.restore(ctx._fx_pipe)
    loads.append(("settings done", os.getloadavg()))
    _log("baseline (last)")
    again, base_t1, base_c1 = _generate(baseline, combos, kwargs, args, "baseline")
    base_seconds = (sum(base_t0[1:]) + sum(base_t1[1:])) / 2
    base_cpu = (sum(base_c0[1:]) + sum(base_c1[1:])) / 2
    base.update(name="baseline", family="baseline", ours=True, params="diffusers pipeline as loaded",
                times=base_t0, seconds=base_seconds, cpu_seconds=base_cpu, ratio=1.0, cpu_ratio=1.0, diff=0.0)
    for r in rows:
        if "error" not in r:
            r["ratio"] = r["seconds"] / base_seconds
            r["cpu_ratio"] = r["cpu_seconds"] / base_cpu
    all_rows = [base, *rows]
    for r in all_rows:
        if "error" not in r:
            r["pooled"] = (r["seen"]["all four"] * r["seen"]["n"] + r["held-out"]["all four"] * r["held-out"]["n"]) \
                / (r["seen"]["n"] + r["held-out"]["n"])
    loads.append(("end", os.getloadavg()))
    samples["baseline"] = base_images[held_idx]
    meta = {
        "argv": argv if argv is not None else sys.argv[1:], "seconds": time.time() - _START, "loads": loads,
        "steps": steps, "guidance": _guidance(kwargs), "chunks": len(combos) // args.chunk,
        "timed": len(combos) - args.chunk, "base_times": (sum(base_t0[1:]), sum(base_t1[1:])),
        "base_cpu": (sum(base_c0[1:]), sum(base_c1[1:])),
        "base_repeat_diff": float((again - base_images).abs().max()), "curves": curves,
        "not_applicable": not_applicable(testbed),
    }
    if not args.no_plot:
        _plot(all_rows, os.path.join(args.out, f"frontier_{testbed}.png"), _title(testbed, base, steps))
        _save_samples(samples, os.path.join(args.out, f"frontier_{testbed}_samples.png"))
    text = _markdown(all_rows, base, real, meta, args, testbed)
    path = os.path.join(args.out, f"frontier_{testbed}.md")
    with open(path, "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"frontier_{testbed}.json"), "w") as f:
        json.dump({"meta": {k: v for k, v in meta.items()}, "real": {k: v for k, v in real.items() if k != "hits"},
                   "rows": [{k: v for k, v in r.items() if k != "hits"} for r in all_rows]}, f, indent=1)
    _log(f"wrote {path}")
    print(text[text.index("## Frontier table"):text.index("## Accuracy per attribute")])


if __name__ == "__main__":
    main()
