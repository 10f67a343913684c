"""``tgate-fx macs``: MACs of a whole generation with and without T-GATE, for a full-size architecture.

The architecture is built on the ``meta`` device (no weights, no download),
captured at the batches the plan runs at, and every step's graph variant is
counted (see :mod:`tgate_fx.macs`). Settings default to the architecture's
published T-GATE defaults.

Example::

    tgate-fx macs --arch sdxl
    tgate-fx macs --arch pixart_sigma --gate-step 10 --json
    tgate-fx macs --arch lcm_sdxl --include-attention
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_arguments", "add_plan_arguments", "plan_from_args", "run"]


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The step and T-GATE settings shared by ``macs`` and ``inspect`` (default: the architecture's)."""
    group = parser.add_argument_group("T-GATE settings (default: the architecture's published ones)")
    group.add_argument("--steps", type=int, help="denoising steps")
    group.add_argument("--gate-step", type=int, help="steps < gate_step run CFG and compute cross-attention")
    group.add_argument("--sp-interval", type=int, help="self-attention recompute interval before the gate")
    group.add_argument("--fi-interval", type=int, help="self-attention recompute interval after the gate")
    group.add_argument("--warm-up", type=int, help="steps that compute everything before any reuse")
    group.add_argument("--batch-size", type=int, default=1, help="images per generation (default 1)")
    group.add_argument("--include-attention", action="store_true",
                       help="also count the SDPA core (Q K^T, A V); the paper's figures do not")


def plan_from_args(args: argparse.Namespace, arch):
    """The :class:`~tgate_fx.plan.Plan` for ``arch`` with the command-line overrides applied."""
    from dataclasses import replace

    from .plan import Plan

    overrides = {name: getattr(args, name) for name in ("gate_step", "sp_interval", "fi_interval", "warm_up")
                 if getattr(args, name, None) is not None}
    config = replace(arch.tgate, **overrides)
    return Plan(args.steps if args.steps is not None else arch.num_steps, config, cfg=arch.cfg)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``macs`` options to ``parser``."""
    from .archs import ARCHS

    parser.add_argument("--arch", required=True, choices=list(ARCHS), help="full-size architecture")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the architecture's)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the architecture's)")
    add_plan_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (baseline_macs, tgate_macs, phases, steps, ...)")


def run(args: argparse.Namespace) -> int:
    """Count and print; returns the exit status."""
    from .archs import ArchGraphs, get_arch
    from .macs import plan_macs

    try:
        arch = get_arch(args.arch).with_size(args.height, args.width)
        plan = plan_from_args(args, arch)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    except (TypeError, ValueError) as e:
        print(f"tgate-fx macs: {e}", file=sys.stderr)
        return 2
    result = plan_macs(ArchGraphs(arch), plan, batch_size=args.batch_size, include_attention=args.include_attention)
    if args.json:
        print(json.dumps({"arch": arch.name, "source": arch.source, "height": arch.height, "width": arch.width,
                          "text_tokens": arch.text_tokens, **result.to_dict()}))
    else:
        print(arch.describe())
        print(f"config: {arch.source}")
        print(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tgate-fx macs", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
