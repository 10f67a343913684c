"""``tgate-fx macs``: MACs of a whole generation with and without the methods, for a full-size architecture.

The architecture is built on the ``meta`` device (no weights, no download),
captured at the batches the plan runs at, and every step's graph variant is
counted (see :mod:`tgate_fx.accounting.macs`). T-GATE is on by default with
the architecture's published settings; ``--deepcache`` adds DeepCache
(``--no-tgate`` for DeepCache alone). With more than one method, each
method alone is counted too (``per_method`` in the JSON).

Example::

    tgate-fx macs --arch sdxl
    tgate-fx macs --arch sdxl --deepcache --no-tgate --cache-branch-id 1
    tgate-fx macs --arch sdxl --deepcache --gate-step 10 --sp-interval 1 --warm-up 0 --json
    tgate-fx macs --arch pixart_sigma --gate-step 10 --json
    tgate-fx macs --arch lcm_sdxl --include-attention
    tgate-fx macs --arch sd15 --height 2048 --width 2048 --todo --no-tgate --factor auto --include-attention
    tgate-fx macs --arch pixart_alpha --toca --no-tgate --height 512 --width 512 --steps 20
    tgate-fx macs --arch dit_xl_2 --toca --no-tgate
    tgate-fx macs --arch flux_dev --toca --include-attention
    tgate-fx macs --arch flux_dev --toca --interval 5 --steps 50 --include-attention
    tgate-fx macs --arch flux_dev --gate-step 10 --blockcache --fora-interval 3
    tgate-fx macs --arch wan21_t2v_1_3b --blockcache --fora-interval 3 --frames 81
    tgate-fx macs --arch hunyuanvideo --toca --blockcache --fora-interval 3

An architecture with no published T-GATE setting (``flux_dev``,
``wan21_t2v_1_3b``, ``hunyuanvideo``) has no method on by default: name one.
"""

from __future__ import annotations

import argparse
import json
import sys

from ._methods import add_method_arguments, methods_from_args

__all__ = ["add_arguments", "add_plan_arguments", "plan_from_args", "run"]


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The step and method settings shared by ``macs`` and ``inspect`` (default: the architecture's)."""
    group = parser.add_argument_group("generation")
    group.add_argument("--steps", type=int, help="denoising steps")
    group.add_argument("--batch-size", type=int, default=1, help="images per generation (default 1)")
    group.add_argument("--include-attention", action="store_true",
                       help="also count the SDPA core (Q K^T, A V); T-GATE's figures do not, ToCa's do")
    add_method_arguments(parser, notes={"tgate": "settings default to the architecture's published ones; off "
                                                 "by default where it has none"})


def plan_from_args(args: argparse.Namespace, arch):
    """The :class:`~tgate_fx.Plan` for ``arch`` with the command-line methods and overrides applied."""
    from ..core.plan import Plan

    from ..methods import as_methods

    methods = methods_from_args(args, {"tgate": arch.tgate} if arch.tgate is not None else {})
    if not methods:
        from ..methods import METHODS

        flags = ", ".join("--" + name.replace("_", "-") for name in METHODS)
        raise ValueError(f"no method is on for {arch.name}: add one of {flags}"
                         + ("" if arch.tgate is not None else " (it has no published T-GATE setting, so T-GATE "
                                                               "is not on by default)"))
    denoiser = arch.build_denoiser()  # on the meta device: each method checks it and fills what it derives
    methods = [m.bind(denoiser) for m in as_methods(methods)]  # from it (ToCa's family defaults), as optimize does
    return Plan(args.steps if args.steps is not None else arch.num_steps, methods, cfg=arch.cfg)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``macs`` options to ``parser``."""
    from ..archs import ARCHS

    parser.add_argument("--arch", required=True, choices=list(ARCHS), help="full-size architecture")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the architecture's)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the architecture's)")
    parser.add_argument("--frames", type=int, help="video frames, 4 k + 1 (video architectures; default: the "
                                                    "architecture's, e.g. 81 for wan21_t2v_1_3b)")
    add_plan_arguments(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (baseline_macs, optimized_macs, per_method, phases, steps, ...)")


def run(args: argparse.Namespace) -> int:
    """Count and print; returns the exit status."""
    from ..accounting.macs import format_macs, plan_macs
    from ..archs import ArchGraphs, get_arch
    from ..core.plan import Plan

    try:
        arch = get_arch(args.arch).with_size(args.height, args.width, args.frames)
        plan = plan_from_args(args, arch)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    except (TypeError, ValueError) as e:
        print(f"tgate-fx macs: {e}", file=sys.stderr)
        return 2
    graphs = ArchGraphs(arch)
    try:
        result = plan_macs(graphs, plan, batch_size=args.batch_size, include_attention=args.include_attention)
    except ValueError as e:  # a method that does not apply to this architecture
        print(f"tgate-fx macs: {e}", file=sys.stderr)
        return 2
    core = None
    if args.include_attention:  # the SDPA core as its own figure: ToDo's saving is mostly there
        linear_conv = plan_macs(graphs, plan, batch_size=args.batch_size, include_attention=False)
        core = {"baseline_macs": result.baseline - linear_conv.baseline,
                "optimized_macs": result.total - linear_conv.total}
    per_method = {}
    if len(plan.methods) > 1:
        for method in plan.methods:
            alone = plan_macs(graphs, Plan(plan.num_steps, [method], cfg=plan.cfg), batch_size=args.batch_size,
                              include_attention=args.include_attention)
            per_method[method.name] = alone.total
        per_method["+".join(m.name for m in plan.methods)] = result.total
    if args.json:
        print(json.dumps({"arch": arch.name, "source": arch.source, "height": arch.height, "width": arch.width,
                          "frames": arch.frames, "text_tokens": arch.text_tokens, **result.to_dict(),
                          **({"per_method": per_method} if per_method else {}),
                          **({"attention_core": core} if core else {})}))
    else:
        print(arch.describe())
        print(f"config: {arch.source}")
        print(result)
        if core:
            print(f"attention core alone (Q K^T, A V): {format_macs(core['baseline_macs'])} -> "
                  f"{format_macs(core['optimized_macs'])}; Linear + Conv alone: "
                  f"{format_macs(result.baseline - core['baseline_macs'])} -> "
                  f"{format_macs(result.total - core['optimized_macs'])}")
        if per_method:
            print("each method alone: " + ", ".join(f"{k} {format_macs(v)}" for k, v in per_method.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tgate-fx macs", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
