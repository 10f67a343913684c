"""Image quality and text alignment of T-GATE on the shipped shapes model, against the baseline.

Usage::

    python benchmarks/quality.py                      # a few minutes on 2 CPU cores
    python benchmarks/quality.py --per-combo 1 --gate-steps 5,10   # a quick look

Two measurements on :func:`tgate_fx.shapes.load_pipeline` (a tiny SD 1.x
trained on generated pictures of shapes, see ``tgate_fx/shapes/``):

1. **T-GATE's key observation.** One baseline generation of every held-out
   caption (25 steps, guidance 7.5) with forward hooks on the UNet's attention
   modules: for each step, the relative change ``||A_t - A_{t-1}|| / ||A_{t-1}||``
   of each cross-attention output (``attn2``, after ``to_out``), per picture
   and CFG half, averaged over sites and pictures. Self-attention (``attn1``)
   is shown for contrast.
2. **Baseline vs T-GATE** on ``--per-combo`` pictures of each of the 45
   held-out captions, all in one batch and from the same seeds: the published
   default schedule (gate_step=10, sp_interval=5, fi_interval=1, warm_up=2)
   and a sweep of gate_step with the other settings at their defaults. For
   each: per-attribute accuracy of the evaluator (:mod:`tgate_fx.shapes.evaluator`)
   against the caption, the fraction with all four right, the Fréchet
   distance of evaluator features to real held-out pictures, the mean absolute
   pixel difference to the baseline's pictures, and the wall time of the whole
   pipeline call with its ratio to the baseline of the same run. The baseline
   is timed at the start and at the end; its time is their mean.

Writes ``benchmarks/results/quality.md``, ``quality_cross_attention_change.png``,
``quality_sweep.png`` and ``quality_samples.png``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

if __name__ == "__main__" and "OMP_WAIT_POLICY" not in os.environ:
    # libgomp's worker threads spin while they wait; on a CPU shared with other
    # jobs that makes each step many times slower (a 12-step batch took 40 s
    # instead of 1.5 s). The policy is read when torch loads: start again with it.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.execv(sys.executable, [sys.executable, *sys.argv])

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tgate_fx  # noqa: E402
from tgate_fx.shapes import data, evaluator, load_pipeline  # noqa: E402
from tgate_fx.shapes.evaluate import ChangeRecorder  # noqa: E402
from common import cpu_model  # noqa: E402

DEFAULT = {"gate_step": 10, "sp_interval": 5, "fi_interval": 1, "warm_up": 2}
_START = time.time()


def _log(message: str) -> None:
    print(f"[{time.time() - _START:6.0f}s] {message}", flush=True)


def _machine() -> list[str]:
    return [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.machine()}",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
    ]


def _generators(n: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _generate(pipe, captions: list[str], args) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    images = pipe(captions, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="pt",
                  generator=_generators(len(captions), args.seed)).images
    return images.float(), time.perf_counter() - start


def _cross_attention_change(pipe, args) -> tuple[list, list, int]:
    captions = [c.caption for c in data.combinations("held_out")]
    recorders = {"cross": ChangeRecorder(pipe.unet, "attn2"), "self": ChangeRecorder(pipe.unet, "attn1")}
    try:
        _generate(pipe, captions, args)
    finally:
        for r in recorders.values():
            r.remove()
    return recorders["cross"].curve(), recorders["self"].curve(), len(recorders["cross"].handles)


def _scores(clf, images: torch.Tensor, labels: torch.Tensor, real_features: torch.Tensor) -> dict:
    predicted, features = evaluator.predict(clf, images)
    hits = (predicted == labels).float()
    scores = {name: float(hits[:, i].mean()) for i, name in enumerate(data.ATTRIBUTES)}
    scores["mean"] = float(hits.mean())
    scores["all four"] = float(hits.all(1).float().mean())
    scores["fd"] = evaluator.frechet_distance(features, real_features)
    return scores


def _plot_change(cross, self_, path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot([s for s, _ in cross], [v for _, v in cross], "o-", label="cross-attention (attn2)")
    ax.plot([s for s, _ in self_], [v for _, v in self_], "s--", label="self-attention (attn1)", alpha=0.7)
    ax.axvline(DEFAULT["gate_step"], color="grey", lw=0.8, ls=":", label="default gate_step")
    ax.set_yscale("log")
    ax.set_xlabel("denoising step t")
    ax.set_ylabel(r"mean $\|A_t - A_{t-1}\| / \|A_{t-1}\|$")
    ax.set_title(f"Attention output change per step (shapes model, {args.steps} DPM-Solver++ steps, "
                 f"CFG {args.guidance})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_sweep(rows: list[dict], base: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted((r for r in rows if r["sweep"]), key=lambda r: r["gate_step"])
    g = [r["gate_step"] for r in sweep]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.8))
    for name in [*data.ATTRIBUTES, "mean"]:
        a1.plot(g, [100 * r[name] for r in sweep], "o-" if name == "mean" else ".--", label=name,
                lw=2 if name == "mean" else 1)
    a1.axhline(100 * base["mean"], color="k", lw=0.8, ls=":", label="baseline mean")
    a1.set_xlabel("gate_step")
    a1.set_ylabel("attribute accuracy (%)")
    a1.legend(fontsize=7)
    a2.plot(g, [r["fd"] for r in sweep], "o-", label="T-GATE")
    a2.axhline(base["fd"], color="k", lw=0.8, ls=":", label="baseline")
    a2.set_xlabel("gate_step")
    a2.set_ylabel("Fréchet distance to real (evaluator features)")
    a2.legend(fontsize=7)
    a3.plot(g, [r["ratio"] for r in sweep], "o-", label="T-GATE")
    a3.axhline(1.0, color="k", lw=0.8, ls=":", label="baseline")
    a3.set_xlabel("gate_step")
    a3.set_ylabel("wall time / baseline")
    a3.legend(fontsize=7)
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3)
    fig.suptitle("T-GATE gate_step sweep on held-out captions (sp_interval=5, fi_interval=1, warm_up=2)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _save_samples(captions, images_by_name: dict[str, torch.Tensor], path: str, count: int = 10) -> None:
    from PIL import Image

    rows = []
    for images in images_by_name.values():
        row = images[:count].clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
        rows.append(np.concatenate(list(row), axis=1))
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-combo", type=int, default=5, help="pictures per held-out caption (45 captions)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--gate-steps", default="2,4,6,8,10,15,20", help="comma-separated gate_step sweep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", type=int, default=2000, help="real held-out pictures for the Fréchet distance")
    parser.add_argument("--pipeline", default=None, help="pipeline directory (default: the shipped one)")
    parser.add_argument("--evaluator", default=None, help="evaluator weights (default: the shipped ones)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    gate_steps = [int(g) for g in args.gate_steps.split(",") if g.strip()]
    bad = [g for g in gate_steps if not 1 <= g < args.steps]
    if bad:
        raise ValueError(f"--gate-steps must lie in [1, {args.steps - 1}] for {args.steps} steps, got {bad}")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)

    _log("loading the shipped pipeline and the evaluator")
    pipe = load_pipeline(path=args.pipeline)
    clf = evaluator.load_evaluator(args.evaluator)
    combos = [c for c in data.combinations("held_out") for _ in range(args.per_combo)]
    captions = [c.caption for c in combos]
    labels = torch.tensor([c.labels for c in combos])
    _log(f"rendering {args.real} real held-out pictures (+{len(captions)} for the real-vs-real floor)")
    real = data.generate(args.real, seed=args.seed + 10_000, split="held_out")
    _, real_features = evaluator.predict(clf, real.images)
    floor_set = data.generate(len(captions), seed=args.seed + 20_000, combos=combos)
    real_scores = _scores(clf, floor_set.images, floor_set.labels, real_features)

    _log("baseline with attention hooks (cross-attention change per step)")
    cross, self_, n_sites = _cross_attention_change(pipe, args)
    _plot_change(cross, self_, os.path.join(args.out, "quality_cross_attention_change.png"), args)

    _log(f"warm-up baseline ({len(captions)} pictures, 2 steps)")
    pipe(captions, num_inference_steps=2, guidance_scale=args.guidance, output_type="pt")
    _log(f"baseline ({len(captions)} pictures in one batch, {args.steps} steps)")
    base_images, base_t0 = _generate(pipe, captions, args)
    _log(f"  {base_t0:.1f}s")

    # One short generation whose plan uses every kind of variant, at the full
    # batch: it captures both signatures (2B before the gate, B after) and
    # builds the variants, so that the timed runs measure generation only.
    _log("warm-up T-GATE (capture and variants)")
    tgate_fx.optimize(pipe, gate_step=4, sp_interval=2, fi_interval=2, warm_up=1)
    start = time.perf_counter()
    pipe(captions, num_inference_steps=8, guidance_scale=args.guidance, output_type="pt")
    warm_up_seconds = time.perf_counter() - start
    _log(f"  {warm_up_seconds:.1f}s")

    configs = [("default", dict(DEFAULT), False)]
    configs += [(f"gate_step={g}", {**DEFAULT, "gate_step": g}, True) for g in gate_steps]
    results = []
    images_by_name = {"baseline": base_images}
    for name, settings, sweep in configs:
        tgate_fx.optimize(pipe, **settings)
        _log(f"T-GATE {name} ({settings})")
        images, seconds = _generate(pipe, captions, args)
        _log(f"  {seconds:.1f}s")
        results.append({"name": name, "settings": settings, "sweep": sweep, "gate_step": settings["gate_step"],
                        "seconds": seconds, "images": images})
        if name == "default":
            images_by_name["T-GATE default"] = images
    runtime = tgate_fx.get_runtime(pipe)
    variants = sum(len(c.variants) for c in runtime.captures)
    captures = len(runtime.captures)
    tgate_fx.restore(pipe)
    _log("baseline again (timing)")
    again_images, base_t1 = _generate(pipe, captions, args)
    _log(f"  {base_t1:.1f}s")
    base_seconds = (base_t0 + base_t1) / 2

    base = _scores(clf, base_images, labels, real_features)
    base.update(seconds=base_seconds, ratio=1.0, diff=0.0)
    for r in results:
        images = r.pop("images")
        r.update(_scores(clf, images, labels, real_features), ratio=r["seconds"] / base_seconds,
                 diff=float((images - base_images).abs().mean()))
    _save_samples(captions, images_by_name, os.path.join(args.out, "quality_samples.png"))
    _plot_sweep(results, base, os.path.join(args.out, "quality_sweep.png"))

    attrs = list(data.ATTRIBUTES)
    lines = [
        "# Quality of T-GATE on the shipped shapes model",
        "",
        "Written by `python benchmarks/quality.py` "
        f"(`--per-combo {args.per_combo} --steps {args.steps} --guidance {args.guidance} "
        f"--gate-steps {args.gate_steps} --seed {args.seed}`), in {time.time() - _START:.0f} s.",
        "",
        *_machine(),
        "",
        "Model: `tgate_fx.shapes.load_pipeline()`, a tiny Stable Diffusion 1.x (CLIP text encoder, "
        "UNet2DConditionModel with cross-attention, VAE, DPM-Solver++) trained on generated 32x32 pictures "
        "of shapes. Captions: the 45 held-out combinations (never seen in training), "
        f"{args.per_combo} pictures each = {len(captions)} pictures, one batch, seeds {args.seed}.."
        f"{args.seed + len(captions) - 1}. Evaluator: `tgate_fx.shapes.evaluator` (a CNN trained on the "
        "data generator).",
        "",
        "## 1. Cross-attention output change per step",
        "",
        f"Baseline generation of the 45 held-out captions, {args.steps} steps, guidance {args.guidance}; "
        f"{n_sites} cross-attention sites. Mean over sites, pictures and CFG halves of "
        "||A_t - A_{t-1}|| / ||A_{t-1}|| (attention output after `to_out`).",
        "",
        "![cross-attention change](quality_cross_attention_change.png)",
        "",
        "| step | cross-attention | self-attention |",
        "|---:|---:|---:|",
        *[f"| {s} | {c:.4f} | {v:.4f} |" for (s, c), (_, v) in zip(cross, self_)],
        "",
        "## 2. Baseline vs T-GATE on held-out captions",
        "",
        f"{args.steps} steps, guidance {args.guidance}. Accuracy: % of pictures whose attribute, read by "
        "the evaluator, equals the caption's. FD: Fréchet distance of evaluator features to "
        f"{args.real} real held-out pictures (the `real` row is {len(captions)} real pictures of the same "
        "captions: the floor at this sample size). Time: the whole pipeline call for the batch; ratio "
        "to the baseline of this run (baseline timed first and last: "
        f"{base_t0:.1f} s and {base_t1:.1f} s, mean used; their pictures differ by at most "
        f"{float((again_images - base_images).abs().max()):.1e}). Mean abs diff: pixels in [0, 1]. T-GATE warm-up (2 captures, {variants} "
        f"graph variants over {captures} captures) took {warm_up_seconds:.1f} s once, not counted.",
        "",
        "| run | " + " | ".join(attrs) + " | mean | all four | FD | mean abs diff to baseline | time (s) "
        "| time / baseline |",
        "|---|" + "---:|" * (len(attrs) + 6),
        "| real pictures | " + " | ".join(_pct(real_scores[a]) for a in attrs)
        + f" | {_pct(real_scores['mean'])} | {_pct(real_scores['all four'])} | {real_scores['fd']:.2f} | | | |",
    ]
    rows = [("baseline", base)] + [(f"T-GATE {r['name']}" + (" (published default)" if r["name"] == "default"
                                                             else ""), r) for r in results]
    for label, r in rows:
        lines.append(f"| {label} | " + " | ".join(_pct(r[a]) for a in attrs)
                     + f" | {_pct(r['mean'])} | {_pct(r['all four'])} | {r['fd']:.2f} | {r['diff']:.4f} "
                     f"| {r['seconds']:.1f} | {r['ratio']:.2f} |")
    default = results[0]
    worst = max(attrs, key=lambda a: base[a] - default[a])
    lines += [
        "",
        f"Default schedule vs baseline: largest per-attribute drop {100 * (base[worst] - default[worst]):+.1f} "
        f"points ({worst}); mean accuracy {_pct(base['mean'])} -> {_pct(default['mean'])}; wall time "
        f"ratio {default['ratio']:.2f}.",
        "",
        "Targets: baseline >= 90% on each attribute: "
        + ", ".join(f"{a} {_pct(base[a])} ({'met' if base[a] >= 0.9 else 'not met'})" for a in attrs)
        + "; T-GATE default within 3 points of the baseline on each: "
        + ", ".join(f"{a} {100 * (default[a] - base[a]):+.1f} ({'met' if base[a] - default[a] <= 0.03 else 'not met'})"
                    for a in attrs) + ".",
        "",
        "![gate_step sweep](quality_sweep.png)",
        "",
        "Samples (first 10 pictures; top: baseline, bottom: T-GATE default, same seeds):",
        "",
        "![samples](quality_samples.png)",
        "",
    ]
    path = os.path.join(args.out, "quality.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    _log(f"wrote {path}")
    print("\n".join(lines[lines.index("## 2. Baseline vs T-GATE on held-out captions"):]))


if __name__ == "__main__":
    main()
