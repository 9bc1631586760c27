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
        "comparison that ran is within tolerance, 1 when one is not, 2 when the device "
        "cannot be used.",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where to run: cpu (default), cuda or cuda:N (the Triton kernels on a GPU)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from deformconv import __version__
    from deformconv.ops import active_kernel
    from deformconv.tools.selfcheck import device_problem, run_self_check

    console = Console()
    problem = device_problem(args.device)
    if problem is not None:
        Console(stderr=True).print(
            f"deformconv check --device {args.device}: {problem}", highlight=False, soft_wrap=True
        )
        return 2
    results = run_self_check(device=args.device)
    kernel = active_kernel(torch.device(args.device).type)
    table = Table(
        title=f"deformconv {__version__} self-check on {args.device}, {kernel} kernel "
        f"(torch {torch.__version__})"
    )
    for column in ("check", "reference", "max |difference|", "tolerance", "result"):
        table.add_column(column)
    ran = [r for r in results if not r.skipped]
    for r in ran:
        table.add_row(
            r.name,
            r.reference,
            f"{r.max_abs_diff:.3g}",
            f"{r.tolerance:.0e}",
            "[green]ok[/green]" if r.passed else "[red]FAILED[/red]",
        )
    console.print(table)
    skipped = [r for r in results if r.skipped]
    for reason in dict.fromkeys(r.skipped for r in skipped):
        names = ", ".join(f"{r.name} vs {r.reference}" for r in skipped if r.skipped == reason)
        console.print(f"skipped: {names}: {reason}", highlight=False, soft_wrap=True)
    failed = sum(r.failed for r in results)
    if failed:
        console.print(f"[red]{failed} of {len(ran)} comparisons failed[/red]")
        return 1
    note = f" ({len(skipped)} skipped)" if skipped else ""
    console.print(f"all {len(ran)} comparisons passed{note}")
    return 0
