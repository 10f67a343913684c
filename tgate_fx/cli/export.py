"""Export a pipeline's graph variants (T-GATE, DeepCache, both) to ONNX: one model per variant, shared weights, plan.json.

Runs one generation at the requested shapes to capture the graphs the step
plan uses, writes them to --out, and prints the files. Run the bundle with
``tgate_fx.export.OnnxDenoiser`` (see docs/onnx.md).

Examples:
  tgate-fx export --model tiny-sd --out bundle --steps 25
  tgate-fx export --model tiny-sdxl --out bundle --deepcache --gate-step 10 --sp-interval 1 --warm-up 0
  tgate-fx export --model /models/sd15 --out sd15_onnx --height 512 --width 512 --steps 25
  tgate-fx export --model /models/sd15 --out sd15_fp16 --dtype float16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys

from ._methods import add_method_arguments, methods_from_args
from ._models import load_model

__all__ = ["HELP", "add_arguments", "run"]

HELP = __doc__.strip().splitlines()[0]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``export`` options to ``parser``; returns it."""
    parser.add_argument("--model", required=True,
                        help="tiny-sd (a tiny seeded SD-1.5 built in code; also tiny-sdxl, tiny-pixart_alpha, ...) "
                             "or a diffusers pipeline directory for DiffusionPipeline.from_pretrained")
    parser.add_argument("--out", required=True, help="bundle directory to write")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per call (default 1)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps of the exported plan (default 25)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance scale of the traced call (default: the pipeline's)")
    add_method_arguments(parser, notes={"tgate": "--no-tgate alone exports the plain denoiser"})
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                        help="torch ONNX exporter (dynamo needs the onnxscript package)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="weights dtype of the pipeline (default float32; float16 wants --device cuda)")
    parser.add_argument("--device", default="cpu", help="torch device to trace on, e.g. cuda for an fp16 export")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``tgate-fx export``; returns the process exit code."""
    import torch

    from ..export.exporter import export_onnx

    try:
        methods = methods_from_args(args, {"tgate": None})
        print(f"[tgate-fx export] loading {args.model}", file=sys.stderr, flush=True)
        pipe, call = load_model(args.model, getattr(torch, args.dtype), args.device)
        for key, value in (("height", args.height), ("width", args.width), ("guidance_scale", args.guidance_scale)):
            if value is not None:
                call[key] = value
        height, width = call.pop("height", None), call.pop("width", None)
        out = export_onnx(
            pipe, args.out, height=height, width=width, batch_size=args.batch_size,
            num_inference_steps=args.steps, tgate=False, methods=methods or None,
            exporter=args.exporter, opset=args.opset, progress=True, **call,
        )
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"tgate-fx export: error: {e}", file=sys.stderr)
        return 2
    rows = sorted((f, os.path.getsize(os.path.join(out, f))) for f in os.listdir(out))
    width = max(len(f) for f, _ in rows)
    for f, size in rows:
        print(f"{f.ljust(width)}  {size / 2**20:9.2f} MiB")
    print(f"{'total'.ljust(width)}  {sum(s for _, s in rows) / 2**20:9.2f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m tgate_fx.cli.export --model tiny-sd --out DIR``."""
    parser = add_arguments(argparse.ArgumentParser(prog="tgate-fx export", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
