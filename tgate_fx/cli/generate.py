"""Generate an image with and without the methods (T-GATE by default) from the same seed and print the speed-up.

The default model is the shapes pipeline shipped with the package
(:mod:`tgate_fx.shapes`: a small Stable Diffusion trained here on captioned
pictures of shapes; 32x32 pictures, no download). ``--model tiny-sd`` builds
a tiny pipeline with random weights instead, and ``--model PATH`` loads a
local diffusers pipeline with ``DiffusionPipeline.from_pretrained``.

Both images are written as PNG (small pictures upscaled for viewing); the
wall time of each (median over ``--repeats`` timed generations, after one
warm-up that also captures the graphs), the speed-up, the ``optimize`` +
capture overhead and the largest pixel difference are printed. With the
shapes model, its evaluator also reads colour, shape, position and
background back from both pictures and compares them with the prompt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ._methods import add_method_arguments, methods_from_args
from ._models import MODEL_HELP, load_model

__all__ = ["add_arguments", "run"]

DEFAULT_PROMPT = "a yellow triangle in the centre on a black background"
VIEW_SIZE = 256  # smallest side of the written PNGs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="shapes", help=MODEL_HELP + " (default: %(default)s)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--steps", type=int, default=25, help="num_inference_steps (default: %(default)s)")
    add_method_arguments(parser)
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's")
    parser.add_argument("--size", type=int, default=None, help="height = width in pixels (default: model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per mode (default: %(default)s)")
    parser.add_argument("--out", default="outputs", help="directory for the PNGs (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def _timed(pipe, prompt: str, seed: int, repeats: int, call: dict):
    images, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        images = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **call).images
        times.append(time.perf_counter() - start)
    return images, statistics.median(times)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    import tgate_fx

    try:
        methods = methods_from_args(args, {"tgate": None})
        if not methods:
            raise ValueError("every method is off: nothing to compare with the baseline")
        pipe, call = load_model(args.model, getattr(torch, args.dtype), args.device)
    except (TypeError, ValueError) as e:
        print(f"tgate-fx generate: {e}")
        return 2
    pipe.set_progress_bar_config(disable=False, leave=False)
    call["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    if args.size is not None:
        call["height"] = call["width"] = args.size
    os.makedirs(args.out, exist_ok=True)
    print(f"model: {args.model} ({type(pipe).__name__}), {args.steps} steps, prompt: {args.prompt!r}")

    print("baseline: warm-up, then", args.repeats, "timed generations")
    _timed(pipe, args.prompt, args.seed, 1, call)
    base, base_time = _timed(pipe, args.prompt, args.seed, args.repeats, call)

    start = time.perf_counter()
    tgate_fx.optimize(pipe, methods=methods)
    label = " + ".join(m.title for m in tgate_fx.get_runtime(pipe).methods)
    print(f"{label}: warm-up (captures the graphs), then", args.repeats, "timed generations")
    _timed(pipe, args.prompt, args.seed, 1, call)
    overhead = time.perf_counter() - start
    fast, fast_time = _timed(pipe, args.prompt, args.seed, args.repeats, call)
    overhead -= fast_time  # what the first call cost beyond a normal generation

    paths = []
    for name, images in (("baseline", base), ("optimized", fast)):
        path = os.path.join(args.out, f"{name}.png")
        picture = Image.fromarray((np.clip(images[0], 0, 1) * 255).round().astype("uint8"))
        if max(picture.size) < VIEW_SIZE:  # a 32x32 picture is a speck on screen: enlarge, keep the pixels
            scale = -(-VIEW_SIZE // max(picture.size))
            picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
        picture.save(path)
        paths.append(path)
    print()
    print(tgate_fx.get_runtime(pipe).last_plan)
    print()
    print(f"baseline            {base_time:8.3f} s   -> {paths[0]}")
    print(f"{label + ' (tgate_fx)':19s} {fast_time:8.3f} s   -> {paths[1]}")
    print(f"speed-up            {base_time / fast_time:8.2f} x")
    print(f"capture overhead    {overhead:8.3f} s   (first call only: torch.export and graph rewriting)")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        print(f"note                load average {load:.1f} on {cores} cores: other processes compete for the CPU, "
              "so the times are noisy")
    print(f"max pixel diff      {float(np.abs(base - fast).max()):8.4f}    (images in [0, 1]; {label} approximates)")
    if args.model == "shapes":
        _read_back(args.prompt, {"baseline": base[0], label: fast[0]})
    return 0


def _read_back(prompt: str, images: dict) -> None:
    """What the shapes evaluator sees in each picture, against the prompt."""
    import numpy as np

    from ..shapes import data, evaluator

    try:
        wanted = data.parse_caption(prompt).labels
    except ValueError:
        wanted = None  # a free-form prompt: report what is seen, match nothing
    clf = evaluator.load_evaluator()
    pictures = torch.from_numpy(np.stack(list(images.values()))).permute(0, 3, 1, 2)
    predicted, _ = evaluator.predict(clf, pictures)
    print()
    for name, labels in zip(images, predicted.tolist()):
        seen = [data.ATTRIBUTES[a][i] for a, i in zip(data.ATTRIBUTES, labels)]
        text = f"{seen[0]} {seen[1]}, {seen[2]}, {seen[3]} background"
        match = "" if wanted is None else f"   ({sum(x == y for x, y in zip(labels, wanted))}/4 as prompted)"
        print(f"evaluator reads {name + ':':10s} {text}{match}")
