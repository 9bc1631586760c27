"""``deformconv check``: run the operator on this machine and compare it with its references."""

from __future__ import annotations

import argparse

import torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="self-check: compare deformable convolution with F.conv2d, the portable kernel "
        "and torchvision",
        description="Run deform_conv2d forward and backward on small random inputs and compare "
        "it with dense F.conv2d (zero offsets), the portable PyTorch kernel and "
        "torchvision.ops.deform_conv2d (when installed). Exit code 0 when every "
        "comparison is within tolerance.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from deformconv import __version__
    from deformconv.tools.selfcheck import run_self_check

    console = Console()
    results = run_self_check()
    table = Table(title=f"deformconv {__version__} self-check (torch {torch.__version__})")
    for column in ("check", "reference", "max |difference|", "tolerance", "result"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.name,
            r.reference,
            f"{r.max_abs_diff:.3g}",
            f"{r.tolerance:.0e}",
            "[green]ok[/green]" if r.passed else "[red]FAILED[/red]",
        )
    console.print(table)
    failed = sum(not r.passed for r in results)
    if failed:
        console.print(f"[red]{failed} of {len(results)} comparisons failed[/red]")
        return 1
    console.print(f"all {len(results)} comparisons passed")
    return 0
