"""The ``tgate-fx`` command line: one subcommand per module.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``;
its docstring's first line is the subcommand's help.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main"]

COMMANDS = {
    "generate": "tgate_fx.cli.generate",
    "macs": "tgate_fx.cli.macs",
    "inspect": "tgate_fx.cli.inspect",
    "export": "tgate_fx.cli.export",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgate-fx", description="Training-free acceleration of diffusers pipelines (T-GATE, DeepCache, ToDo, ToCa, a block cache), as FX graph rewrites")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip().splitlines()
        command = sub.add_parser(name, help=doc[0] if doc else None, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
