"""Baseline text alignment of a shapes pipeline, and its attention convergence curve.

    python -m tgate_fx.shapes.evaluate                         # the shipped UNet pipeline
    python -m tgate_fx.shapes.evaluate --dit                   # the shipped DiT pipeline
    python -m tgate_fx.shapes.evaluate --flux                  # the shipped FLUX pipeline
    python -m tgate_fx.shapes.evaluate --pipeline DIR --curve change.png

* :func:`baseline_accuracy`: generate pictures of seen (``"train"``) or
  held-out captions with the model's conventional settings
  (:func:`call_kwargs`: 25 steps and guidance 7.5 for the UNet, 20 steps and
  guidance 4.5 for PixArt, 20 Euler steps and true CFG 4.0 for FLUX) and read
  them back with the shipped evaluator;
* :func:`attention_change`: the mean relative change
  ``||A_t - A_{t-1}|| / ||A_{t-1}||`` of every self-attention (``attn1``) and
  cross-attention (``attn2``) output between consecutive denoising steps, the
  observation T-GATE rests on (the same measure as ``benchmarks/quality.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import data, evaluator

__all__ = ["ChangeRecorder", "attention_change", "baseline_accuracy", "call_kwargs", "denoiser_of", "plot_change"]


def denoiser_of(pipe):
    """The pipeline's denoiser: ``pipe.unet`` or ``pipe.transformer``."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def _is_flux(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "transformer", None) is not None


def call_kwargs(pipe, steps: int | None = None, guidance: float | None = None) -> dict:
    """The conventional call settings of the pipeline's family.

    ``guidance`` is ``guidance_scale`` for the UNet and PixArt, and
    ``true_cfg_scale`` for FLUX (true classifier-free guidance against the
    empty caption; the shapes FLUX transformer has no guidance embedding).
    """
    if _is_flux(pipe):
        return {"num_inference_steps": steps or 20, "true_cfg_scale": 4.0 if guidance is None else guidance,
                "negative_prompt": "", "height": 32, "width": 32, "max_sequence_length": 16}
    if getattr(pipe, "transformer", None) is not None:  # PixArt
        return {"num_inference_steps": steps or 20, "guidance_scale": 4.5 if guidance is None else guidance,
                "clean_caption": False, "use_resolution_binning": False, "max_sequence_length": 16}
    return {"num_inference_steps": steps or 25, "guidance_scale": 7.5 if guidance is None else guidance}


def _sampler_name(pipe) -> str:
    return "flow-matching Euler" if _is_flux(pipe) else "DPM-Solver++"


def _combos(split: str, every: int, per_combo: int) -> list[data.Combo]:
    return [c for c in data.combinations(split)[::every] for _ in range(per_combo)]


@torch.no_grad()
def generate(pipe, combos: list[data.Combo], *, seed: int = 0, batch: int = 100, **kwargs) -> torch.Tensor:
    """Pictures ``(N, 3, 32, 32)`` in ``[0, 1]`` of the combos' captions; picture ``i`` from seed ``seed + i``."""
    kw = {**call_kwargs(pipe), **kwargs}
    images = []
    for start in range(0, len(combos), batch):
        chunk = combos[start:start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images.append(pipe([c.caption for c in chunk], generator=gens, output_type="pt", **kw).images.float())
    return torch.cat(images)


def baseline_accuracy(pipe, *, split: str = "held_out", every: int = 1, per_combo: int = 1, seed: int = 0,
                      clf=None, **kwargs) -> dict:
    """Per-attribute accuracy (and ``"all four"``, ``"n"``) of generated pictures of ``split``'s captions.

    Every ``every``-th combination of the split, ``per_combo`` pictures each.
    """
    clf = clf or evaluator.load_evaluator()
    combos = _combos(split, every, per_combo)
    images = generate(pipe, combos, seed=seed, **kwargs)
    predicted, _ = evaluator.predict(clf, images)
    hits = (predicted == torch.tensor([c.labels for c in combos])).float()
    result = {name: float(hits[:, i].mean()) for i, name in enumerate(data.ATTRIBUTES)}
    result["all four"] = float(hits.all(1).float().mean())
    result["n"] = len(combos)
    return result


class ChangeRecorder:
    """Forward hooks on attention modules: per call, the relative change of each output."""

    def __init__(self, module, suffix: str):
        self.changes: dict[int, list[torch.Tensor]] = {}
        self.previous: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(name))
                        for name, m in module.named_modules() if name.endswith(suffix)]
        if not self.handles:
            raise ValueError(f"no module of {type(module).__name__} ends with {suffix!r}")

    def _hook(self, name: str):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            out = out.detach().flatten(1).double()
            step = self.calls.get(name, 0)
            self.calls[name] = step + 1
            if name in self.previous:
                prev = self.previous[name]
                self.changes.setdefault(step, []).append((out - prev).norm(dim=1) / prev.norm(dim=1))
            self.previous[name] = out

        return hook

    def curve(self) -> list[tuple[int, float]]:
        return [(step, float(torch.cat(values).mean())) for step, values in sorted(self.changes.items())]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def attention_change(pipe, combos: list[data.Combo] | None = None, *, seed: int = 0, **kwargs) -> dict:
    """Per step, the mean relative change of the ``attn1`` and ``attn2`` outputs from the previous step.

    One generation of ``combos`` (default: every held-out caption once); the
    mean runs over attention sites, pictures and CFG halves. Returns
    ``{"cross": [(step, change), ...], "self": [...], "sites": n}``.
    """
    if _is_flux(pipe):
        raise ValueError("attention_change measures attn1/attn2 of the UNet and PixArt testbeds; FluxPipeline's "
                         "blocks have one joint attention and true CFG calls the transformer twice per step")
    combos = combos or data.combinations("held_out")
    net = denoiser_of(pipe)
    recorders = {"cross": ChangeRecorder(net, "attn2"), "self": ChangeRecorder(net, "attn1")}
    try:
        generate(pipe, combos, seed=seed, batch=len(combos), **kwargs)
    finally:
        for r in recorders.values():
            r.remove()
    return {"cross": recorders["cross"].curve(), "self": recorders["self"].curve(),
            "sites": len(recorders["cross"].handles)}


def plot_change(curves: dict, path: str | os.PathLike, title: str) -> None:
    """Write the curves of :func:`attention_change` as a PNG (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    cross, self_ = curves["cross"], curves["self"]
    ax.plot([s for s, _ in cross], [v for _, v in cross], "o-", label=f"cross-attention (attn2, {curves['sites']} sites)")
    ax.plot([s for s, _ in self_], [v for _, v in self_], "s--", label="self-attention (attn1)", alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("denoising step t")
    ax.set_ylabel(r"mean $\|A_t - A_{t-1}\| / \|A_{t-1}\|$")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=None, help="pipeline directory (default: the shipped one)")
    parser.add_argument("--dit", action="store_true", help="the shipped DiT (PixArt) pipeline")
    parser.add_argument("--flux", action="store_true", help="the shipped FLUX pipeline")
    parser.add_argument("--seen-every", type=int, default=1, help="every N-th of the 315 seen captions")
    parser.add_argument("--seen-per-combo", type=int, default=1)
    parser.add_argument("--held-out-per-combo", type=int, default=4, help="pictures of each of the 45 held-out captions")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--curve", default=None, help="also write the attention change curve to this PNG")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--markdown", default=None, help="write the figures to this Markdown file")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.dit and args.flux:
        parser.error("--dit and --flux name different shipped pipelines; give one")
    if args.threads:
        torch.set_num_threads(args.threads)
    from . import load_dit_pipeline, load_flux_pipeline, load_pipeline

    pipe = (load_dit_pipeline if args.dit else load_flux_pipeline if args.flux else load_pipeline)(path=args.pipeline)
    kw = {k: v for k, v in call_kwargs(pipe, args.steps, args.guidance).items()}
    clf = evaluator.load_evaluator()
    guidance_key = "true_cfg_scale" if _is_flux(pipe) else "guidance_scale"
    result: dict = {"pipeline": type(pipe).__name__,
                    "settings": {"num_inference_steps": kw["num_inference_steps"], "guidance_scale": kw[guidance_key],
                                 "sampler": _sampler_name(pipe)}}
    start = time.time()
    for split, every, per_combo in (("train", args.seen_every, args.seen_per_combo),
                                    ("held_out", 1, args.held_out_per_combo)):
        result[split] = baseline_accuracy(pipe, split=split, every=every, per_combo=per_combo, seed=args.seed,
                                          clf=clf, **kw)
        print(f"{split}: " + ", ".join(f"{k} {v:.3f}" if k != "n" else f"n {v}" for k, v in result[split].items())
              + f" ({time.time() - start:.0f}s)", flush=True)
    if args.curve:
        curves = attention_change(pipe, seed=args.seed, **kw)
        result["attention_change"] = curves
        name = ("FLUX" if _is_flux(pipe) else "PixArt DiT" if getattr(pipe, "transformer", None) is not None
                else "UNet")
        plot_change(curves, args.curve, f"Attention output change per step (shapes {name}, "
                    f"{kw['num_inference_steps']} {_sampler_name(pipe)} steps, CFG {kw[guidance_key]})")
        print(f"wrote {args.curve}")
    result["seconds"] = round(time.time() - start, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(_markdown(result, args, argv if argv is not None else sys.argv[1:]))
        print(f"wrote {args.markdown}")


def _markdown(result: dict, args, argv: list[str]) -> str:
    import platform

    settings = result["settings"]
    attrs = list(data.ATTRIBUTES)
    lines = [
        f"# Baseline of the shapes {result['pipeline']}",
        "",
        f"Written by `python -m tgate_fx.shapes.evaluate {' '.join(argv)}` in {result['seconds']:.0f} s "
        f"(torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.machine()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}).",
        "",
        f"{settings['num_inference_steps']} {settings['sampler']} steps, "
        f"{'true CFG' if result['pipeline'].startswith('Flux') else 'guidance'} {settings['guidance_scale']}; "
        "picture i from seed i. Accuracy: % of generated pictures whose attribute, read by the shipped "
        "evaluator (`tgate_fx.shapes.evaluator`), equals the caption's.",
        "",
        "| captions | pictures | " + " | ".join(attrs) + " | all four |",
        "|---|---:|" + "---:|" * (len(attrs) + 1),
    ]
    for split, label in (("train", "seen in training"), ("held_out", "held out (45 combinations)")):
        r = result[split]
        lines.append(f"| {label} | {r['n']} | " + " | ".join(f"{100 * r[a]:.1f}" for a in attrs)
                     + f" | {100 * r['all four']:.1f} |")
    curves = result.get("attention_change")
    if curves:
        png = os.path.basename(args.curve)
        lines += [
            "",
            "## Attention output change per step",
            "",
            f"One baseline generation of the 45 held-out captions; {curves['sites']} cross-attention "
            "(`attn2`) sites and as many self-attention (`attn1`) sites. Mean over sites, pictures and CFG "
            "halves of ||A_t - A_{t-1}|| / ||A_{t-1}|| (attention output after `to_out`).",
            "",
            f"![attention change]({png})",
            "",
            "| step | cross-attention | self-attention |",
            "|---:|---:|---:|",
            *[f"| {s} | {c:.4f} | {v:.4f} |" for (s, c), (_, v) in zip(curves["cross"], curves["self"])],
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "tgate_fx.shapes.evaluate", *sys.argv[1:]])
    main()
