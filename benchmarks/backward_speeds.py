"""How fast the CPU backward pass runs in fresh processes: one line per process.

    python benchmarks/backward_speeds.py --processes 16

Each process times 30 dense ``F.conv2d`` forward+backward calls of shape a (batch 8, 64 -> 64
channels, 56x56, 3x3, padding 1), then the median of 15 back-to-back calls of deformconv's CPU
backward on the same shape, then dense forward+backward again. On the project's virtual machine
about a third of the processes ran the backward at half speed (docs/performance.md, "Two speeds of
the backward pass"); this script is how that was measured. It prints medians in ms and is not a
test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

_CHILD = "child"


def _median_ms(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def child() -> None:
    import torch
    import torch.nn.functional as F

    from deformconv.ops import _cpu

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 56, 56, generator=gen)
    weight = torch.randn(64, 64, 3, 3, generator=gen) / 24
    bias = torch.randn(64, generator=gen)
    offset = torch.randn(8, 18, 56, 56, generator=gen) * 2
    mask = torch.sigmoid(torch.randn(8, 9, 56, 56, generator=gen))
    grad = torch.randn(8, 64, 56, 56, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]

    def dense():
        return torch.autograd.grad(F.conv2d(*leaves, padding=1), leaves, grad)

    def backward():
        return _cpu.backward(grad, x, offset, mask, weight, bias, (1, 1), (1, 1), (1, 1))

    before = _median_ms(dense, 30)
    ours = _median_ms(backward, 15)
    after = _median_ms(dense, 15)
    print(f"{ours:.1f} {before:.1f} {after:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=16, help="fresh processes to time")
    args = parser.parse_args(argv)
    print("| process | deformconv CPU backward, ms | dense fwd+bwd before, ms | dense after, ms |")
    print("|---|---|---|---|")
    for i in range(args.processes):
        out = subprocess.run(
            [sys.executable, __file__, _CHILD], capture_output=True, text=True, check=True
        ).stdout.split()
        print(f"| {i + 1} | {out[0]} | {out[1]} | {out[2]} |", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == [_CHILD]:
        child()
    else:
        sys.exit(main())
