"""``deformconv bench``: time deformable convolution on your shape against dense convolution.

Forward and forward+backward medians of ``deformconv.deform_conv2d`` (with the kernel the
dispatcher picks on the device), dense ``F.conv2d`` of the same shape and, when installed,
``torchvision.ops.deform_conv2d``, each with its ratio to dense convolution measured in the same
process. Offsets are ``randn * 2`` and the mask ``sigmoid(randn)``, as in the project's benchmarks.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deformconv.cli._common import first_line, parse_pair, print_error

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BenchConfig:
    """One deformable-convolution call to time; pairs are (height, width)."""

    batch: int = 8
    in_channels: int = 64
    out_channels: int = 64
    size: tuple[int, int] = (56, 56)
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    offset_groups: int = 1
    modulated: bool = True
    dtype: torch.dtype = torch.float32
    device: str = "cpu"


@dataclass(frozen=True)
class BenchRow:
    """Medians in milliseconds (``None`` when not measured) and ratios to dense convolution."""

    name: str
    forward_ms: float
    forward_backward_ms: float | None
    forward_ratio: float
    forward_backward_ratio: float | None


def _tensors(cfg: BenchConfig) -> dict[str, Tensor]:
    from deformconv.ops import output_size

    gen = torch.Generator().manual_seed(0)
    out_h, out_w = output_size(*cfg.size, cfg.kernel, cfg.stride, cfg.padding, cfg.dilation)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"kernel {cfg.kernel} with dilation {cfg.dilation} does not fit the input {cfg.size} "
            f"padded by {cfg.padding}: the output would be {out_h}x{out_w}"
        )
    taps = cfg.kernel[0] * cfg.kernel[1]

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device=cfg.device, dtype=cfg.dtype)

    return {
        "input": rand(cfg.batch, cfg.in_channels, *cfg.size),
        "weight": rand(cfg.out_channels, cfg.in_channels // cfg.groups, *cfg.kernel),
        "bias": rand(cfg.out_channels),
        "offset": rand(cfg.batch, 2 * cfg.offset_groups * taps, out_h, out_w) * 2,
        "mask": torch.sigmoid(rand(cfg.batch, cfg.offset_groups * taps, out_h, out_w)),
        "grad": rand(cfg.batch, cfg.out_channels, out_h, out_w),
    }


def _steps(op: Callable[..., Tensor] | None, t: dict[str, Tensor], cfg: BenchConfig):
    """Forward and forward+backward closures of a deformable op, or of dense conv (``None``)."""
    conv = {"stride": cfg.stride, "padding": cfg.padding, "dilation": cfg.dilation}
    names = ("input", "weight", "bias") if op is None else ("input", "offset", "weight", "bias")
    if op is not None and cfg.modulated:
        names += ("mask",)
    leaves = {k: t[k].clone().requires_grad_() for k in names}

    def call(v: dict[str, Tensor]) -> Tensor:
        if op is None:
            return F.conv2d(v["input"], v["weight"], v["bias"], groups=cfg.groups, **conv)
        return op(v["input"], v["offset"], v["weight"], v["bias"], mask=v.get("mask"), **conv)

    def forward() -> Tensor:
        with torch.no_grad():
            return call(t)

    def forward_backward() -> tuple[Tensor, ...]:
        return torch.autograd.grad(call(leaves), list(leaves.values()), t["grad"])

    return forward, forward_backward


def _settle_allocator() -> None:
    """Free one 24 MiB block first, which raises glibc's dynamic mmap threshold: otherwise every
    tensor of a few MiB that dense convolution allocates may cost a page fault per 4 KiB on
    every call (whether it does depends on what the process freed before), which made dense
    ``F.conv2d`` 1.5x slower from one run to the next."""
    block = torch.empty(24 * 2**20 // 4)
    block.fill_(0)
    del block


class _NoCudaRuntimeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _timer() -> type:
    """``torch.utils.benchmark.Timer``, imported without the "No CUDA runtime is found" line.

    That module imports ``torch.utils.cpp_extension``, which logs the line on every machine
    without CUDA; it concerns building C++ extensions, which nothing here does.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _NoCudaRuntimeFilter()
    logger.addFilter(quiet)
    try:
        from torch.utils.benchmark import Timer
    finally:
        logger.removeFilter(quiet)
    return Timer


def _median_ms(fn: Callable[[], object], min_run_time: float) -> float:
    Timer = _timer()
    fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def benchmark(cfg: BenchConfig, min_run_time: float = 0.5, backward: bool = True) -> list[BenchRow]:
    """Time dense convolution, deformconv and (when installed) torchvision on one shape.

    Args:
        cfg: the shape, options, dtype and device of the call.
        min_run_time: seconds of timing per figure (``Timer.blocked_autorange``).
        backward: also time forward+backward (gradients of every input).

    Returns:
        One row per implementation, dense ``F.conv2d`` first.

    Example:
        >>> rows = benchmark(BenchConfig(1, 4, 4, (6, 6)), min_run_time=0.01)
        >>> [r.name for r in rows][:2]
        ['dense F.conv2d', 'deformconv']
        >>> rows[0].forward_ratio
        1.0
    """
    from deformconv import deform_conv2d

    _settle_allocator()
    t = _tensors(cfg)
    ops: list[tuple[str, Callable[..., Tensor] | None]] = [
        ("dense F.conv2d", None),
        ("deformconv", deform_conv2d),
    ]
    try:
        import torchvision

        if cfg.dtype != torch.bfloat16:
            ops.append(("torchvision", torchvision.ops.deform_conv2d))
    except ImportError:
        pass
    times = []
    for _, op in ops:
        forward, forward_backward = _steps(op, t, cfg)
        times.append(
            (
                _median_ms(forward, min_run_time),
                _median_ms(forward_backward, min_run_time) if backward else None,
            )
        )
    dense_f, dense_fb = times[0]
    return [
        BenchRow(
            name=name,
            forward_ms=f,
            forward_backward_ms=fb,
            forward_ratio=f / dense_f,
            forward_backward_ratio=None if fb is None or dense_fb is None else fb / dense_fb,
        )
        for (name, _), (f, fb) in zip(ops, times, strict=True)
    ]


def _pair(text: str) -> tuple[int, int]:
    pair = parse_pair(text)
    if pair is None:
        raise argparse.ArgumentTypeError(f"expected N or HxW (e.g. 3 or 3x5), got {text!r}")
    return pair


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time deformable convolution on a shape against dense convolution",
        description="Time deform_conv2d forward and forward+backward on one shape against dense "
        "F.conv2d of the same shape (and torchvision.ops.deform_conv2d when installed), with "
        "ratios measured in the same process. Offsets randn * 2, mask sigmoid(randn).",
    )
    defaults = BenchConfig()
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--in-channels", type=int, default=defaults.in_channels)
    parser.add_argument("--out-channels", type=int, default=defaults.out_channels)
    parser.add_argument("--size", type=_pair, default=defaults.size, help="N or HxW")
    parser.add_argument("--kernel", type=_pair, default=defaults.kernel, help="N or HxW")
    parser.add_argument("--stride", type=_pair, default=defaults.stride)
    parser.add_argument("--padding", type=_pair, default=defaults.padding)
    parser.add_argument("--dilation", type=_pair, default=defaults.dilation)
    parser.add_argument("--groups", type=int, default=defaults.groups)
    parser.add_argument("--offset-groups", type=int, default=defaults.offset_groups)
    parser.add_argument("--v1", action="store_true", help="no modulation mask (DCNv1)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per figure")
    parser.add_argument("--forward-only", action="store_true", help="skip forward+backward")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(
        batch=args.batch,
        in_channels=args.in_channels,
        out_channels=args.out_channels,
        size=args.size,
        kernel=args.kernel,
        stride=args.stride,
        padding=args.padding,
        dilation=args.dilation,
        groups=args.groups,
        offset_groups=args.offset_groups,
        modulated=not args.v1,
        dtype=_DTYPES[args.dtype],
        device=args.device,
    )
    try:
        rows = benchmark(cfg, args.min_run_time, backward=not args.forward_only)
    except (ValueError, TypeError, RuntimeError) as error:
        print_error("bench", first_line(error))
        return 2
    from deformconv.ops import active_kernel

    kernel = active_kernel(torch.device(args.device).type)
    table = Table(
        title=f"batch {cfg.batch}, {cfg.in_channels} -> {cfg.out_channels} channels, "
        f"{cfg.size[0]}x{cfg.size[1]}, kernel {cfg.kernel[0]}x{cfg.kernel[1]}, "
        f"{args.dtype} on {args.device} ({torch.get_num_threads()} threads, kernel {kernel})"
    )
    for column in (
        "implementation",
        "forward ms",
        "forward / dense",
        "fwd+bwd ms",
        "fwd+bwd / dense",
    ):
        table.add_column(column, justify="left" if column == "implementation" else "right")
    for r in rows:
        table.add_row(
            r.name,
            f"{r.forward_ms:.2f}",
            f"{r.forward_ratio:.2f}x",
            "-" if r.forward_backward_ms is None else f"{r.forward_backward_ms:.2f}",
            "-" if r.forward_backward_ratio is None else f"{r.forward_backward_ratio:.2f}x",
        )
    console.print(table)
    return 0
