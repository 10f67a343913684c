"""``tgate-fx inspect``: the attention sites, step plan and graph variants the methods make of a denoiser.

The denoiser is built on the ``meta`` device, so no weights are read:
either a full-size architecture (``--arch sdxl``) or the denoiser of a
pipeline (``--model PATH`` of a local diffusers pipeline, or ``--model
tiny-sd`` / ``tiny-<family>`` for the embedded tiny pipelines), rebuilt from
its config. Without ``--graph`` or ``--diff`` it prints the sites, the plan
and, per variant, the operators, MACs and sites computed, reused and
recorded. ``--graph VARIANT`` prints only that variant's code; ``--diff A B``
prints only the nodes one variant has that the other lacks.

Example::

    tgate-fx inspect --arch sdxl
    tgate-fx inspect --arch pixart_alpha --graph fi_reuse
    tgate-fx inspect --arch sdxl --deepcache --no-tgate --graph dc_partial
    tgate-fx inspect --model tiny-sd --steps 10 --gate-step 4 --diff sp_compute fi_record --verbose
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ._models import load_model
from .macs import add_plan_arguments, plan_from_args

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``inspect`` options to ``parser``."""
    from ..archs import ARCHS

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--arch", choices=list(ARCHS), help="full-size architecture (meta device)")
    source.add_argument("--model", metavar="PATH|tiny-sd",
                        help="local diffusers pipeline directory, or tiny-sd / tiny-<family> (tgate_fx.tiny)")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    parser.add_argument("--frames", type=int, help="video frames, 4 k + 1 (video architectures with --arch)")
    add_plan_arguments(parser)
    parser.add_argument("--graph", metavar="VARIANT", help="print this variant's graph code only")
    parser.add_argument("--diff", nargs=2, metavar=("A", "B"), help="print the nodes variant A has and B lacks, "
                                                                    "and the converse, only")
    parser.add_argument("--verbose", action="store_true", help="with --diff, list every node")


def run(args: argparse.Namespace) -> int:
    """Inspect and print; returns the exit status."""
    from ..accounting.inspection import inspect_arch
    from ..archs import arch_from_pipeline, get_arch

    try:
        if args.arch:
            arch = get_arch(args.arch).with_size(args.height, args.width, args.frames)
        else:
            if args.frames is not None:
                raise ValueError("--frames is for --arch video architectures")
            arch = replace(arch_from_pipeline(load_model(args.model)[0], height=args.height, width=args.width),
                           source=args.model)
        plan = plan_from_args(args, arch)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        # Checked before the captures, which take seconds.
        for name in ([args.graph] if args.graph else []) + list(args.diff or []):
            if name.split("~")[0] not in plan.variants:
                raise ValueError(f"this plan has no variant {name!r}; its variants are {', '.join(plan.variants)}")
    except (TypeError, ValueError, OSError) as e:
        print(f"tgate-fx inspect: {e}", file=sys.stderr)
        return 2
    report = inspect_arch(arch, plan, batch_size=args.batch_size, include_attention=args.include_attention)
    if args.graph:
        print(report.graph_code(args.graph))
    elif args.diff:
        print(report.diff(*args.diff).format(verbose=args.verbose))
    else:
        print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tgate-fx inspect", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
