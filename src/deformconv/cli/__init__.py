"""The ``deformconv`` command line: one subcommand per module of this package."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

_COMMANDS: tuple[str, ...] = ("check", "cost", "factor", "demo", "visualize", "bench")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    from deformconv import __version__

    parser = argparse.ArgumentParser(
        prog="deformconv",
        description="Deformable convolution and the convolution family for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"deformconv {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"deformconv.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
