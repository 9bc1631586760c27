"""CPU benchmark of deformable convolution v2, following the protocol of BENCHMARKS.md.

    python benchmarks/bench_cpu.py

For each shape it times dense ``F.conv2d`` (the yardstick), ``torchvision.ops.deform_conv2d``,
ONNX Runtime's ``DeformConv`` (forward only; a model built with the onnx helper API, opset 19),
deformconv's portable PyTorch kernel and deformconv's Numba CPU kernel, forward and
forward+backward (gradients of input, offset, mask, weight and bias), in one process; every figure
is a median of ``torch.utils.benchmark.Timer.blocked_autorange`` after a warm-up call, with its
ratio to dense convolution of the same shape and direction measured in the same run. Peak memory
is the increase in peak resident memory that one forward+backward adds, each in a fresh process
(two such processes at a time, as timing does not affect it).
The table is printed as Markdown. Other processes busy on the machine make ratios unreliable; the
script measures how much CPU they took during each shape and says so under the table.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from deformconv.ops import use_kernel

THREADS = 2
METHODS = ("dense", "torchvision", "onnxruntime", "portable", "deformconv")
LABELS = {
    "dense": "dense `F.conv2d`",
    "torchvision": "torchvision `deform_conv2d`",
    "onnxruntime": "ONNX Runtime `DeformConv`",
    "portable": "deformconv portable kernel",
    "deformconv": "deformconv Numba CPU kernel",
}


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    in_channels: int
    out_channels: int
    size: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    offset_groups: int = 1

    @property
    def out_size(self) -> int:
        span = self.dilation * (self.kernel - 1) + 1
        return (self.size + 2 * self.padding - span) // self.stride + 1

    def describe(self) -> str:
        extra = [
            f"{label} {value}"
            for label, value, default in (
                ("stride", self.stride, 1),
                ("dilation", self.dilation, 1),
                ("offset groups", self.offset_groups, 1),
            )
            if value != default
        ]
        return (
            f"batch {self.batch}, {self.in_channels} -> {self.out_channels} channels, "
            f"{self.size}x{self.size}, kernel {self.kernel}x{self.kernel}, padding {self.padding}"
            + "".join(f", {e}" for e in extra)
        )


SHAPES = {
    s.name: s
    for s in (
        Shape("a", 8, 64, 64, 56),
        Shape("b", 2, 256, 256, 28),
        Shape("c", 32, 32, 32, 28),
        Shape("a stride 2", 8, 64, 64, 56, stride=2),
        Shape("a dilation 2", 8, 64, 64, 56, padding=2, dilation=2),
        Shape("b 5x5", 2, 256, 256, 28, kernel=5, padding=2),
        Shape("a offset groups 4", 8, 64, 64, 56, offset_groups=4),
    )
}


def inputs(shape: Shape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 input, weight, bias, offsets ``randn * 2``, mask ``sigmoid(randn)``, grad."""
    gen = torch.Generator().manual_seed(seed)
    taps = shape.kernel**2
    out = shape.out_size
    return {
        "input": torch.randn(shape.batch, shape.in_channels, shape.size, shape.size, generator=gen),
        "weight": torch.randn(
            shape.out_channels, shape.in_channels, shape.kernel, shape.kernel, generator=gen
        )
        / (shape.in_channels * taps) ** 0.5,
        "bias": torch.randn(shape.out_channels, generator=gen),
        "offset": torch.randn(shape.batch, 2 * shape.offset_groups * taps, out, out, generator=gen)
        * 2,
        "mask": torch.sigmoid(
            torch.randn(shape.batch, shape.offset_groups * taps, out, out, generator=gen)
        ),
        "grad": torch.randn(shape.batch, shape.out_channels, out, out, generator=gen),
    }


def _conv_args(shape: Shape) -> dict[str, int]:
    return {"stride": shape.stride, "padding": shape.padding, "dilation": shape.dilation}


def _deform(method: str) -> Callable[..., torch.Tensor]:
    if method == "torchvision":
        import torchvision

        return torchvision.ops.deform_conv2d
    from deformconv import deform_conv2d

    return deform_conv2d


def step_functions(method: str, shape: Shape, t: dict[str, torch.Tensor]):
    """(forward, forward+backward) closures of one method on one shape; None where it has none."""
    args = _conv_args(shape)
    if method == "onnxruntime":
        return _onnx_forward(shape, t), None
    if method == "dense":
        leaves = [t[k].clone().requires_grad_() for k in ("input", "weight", "bias")]

        def forward():
            return F.conv2d(t["input"], t["weight"], t["bias"], **args)

        def forward_backward():
            out = F.conv2d(*leaves, **args)
            return torch.autograd.grad(out, leaves, t["grad"])

        return forward, forward_backward
    op = _deform(method)
    names = ("input", "offset", "weight", "bias", "mask")
    leaves = {k: t[k].clone().requires_grad_() for k in names}

    def forward():
        with torch.no_grad():
            return op(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **args)

    def forward_backward():
        out = op(
            leaves["input"],
            leaves["offset"],
            leaves["weight"],
            leaves["bias"],
            mask=leaves["mask"],
            **args,
        )
        return torch.autograd.grad(out, list(leaves.values()), t["grad"])

    return forward, forward_backward


def _onnx_forward(shape: Shape, t: dict[str, torch.Tensor]) -> Callable[[], object]:
    """ONNX Runtime session of one DeformConv node (opset 19) on ``THREADS`` threads."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    names = ("X", "W", "offset", "B", "mask")
    arrays = [t[k].numpy() for k in ("input", "weight", "offset", "bias", "mask")]
    node = helper.make_node(
        "DeformConv",
        list(names),
        ["Y"],
        dilations=[shape.dilation] * 2,
        group=1,
        kernel_shape=[shape.kernel] * 2,
        offset_group=shape.offset_groups,
        pads=[shape.padding] * 4,
        strides=[shape.stride] * 2,
    )
    out = shape.out_size
    graph = helper.make_graph(
        [node],
        "deform_conv",
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape))
            for n, a in zip(names, arrays, strict=True)
        ],
        [
            helper.make_tensor_value_info(
                "Y", TensorProto.FLOAT, [shape.batch, shape.out_channels, out, out]
            )
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = dict(zip(names, arrays, strict=True))
    return lambda: session.run(None, feed)


def _clean_median(timer: Timer, min_run_time: float, retries: int = 3) -> float:
    """Median of ``timer.blocked_autorange``; a measurement during which other processes took
    more than a tenth of a core is repeated (up to ``retries`` times) and the least disturbed
    one kept, as this machine may be shared."""
    best = None
    for _ in range(retries + 1):
        with _Interference() as load:
            median = timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
        share = load.foreign / load.wall
        if best is None or share < best[0]:
            best = (share, median)
        if share < 0.1:
            break
        time.sleep(2.0)
    return best[1]


def _portable(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the dispatcher forced to the portable kernel."""

    def wrapped():
        with use_kernel("portable", "cpu"):
            return fn()

    return wrapped


class _Interference:
    """CPU seconds that other processes used while a block ran (from /proc/stat)."""

    def __enter__(self) -> _Interference:
        self.start = self._busy(), self._own(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = self.start
        self.wall = time.perf_counter() - wall
        self.foreign = max(0.0, (self._busy() - busy) - (self._own() - own))

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:8]]
        except OSError:
            return 0.0
        user, nice, system, _, _, irq, softirq = fields
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def measure_times(shape: Shape, min_run_time: float, methods, rounds: int = 3) -> dict:
    """Medians in ms per (method, direction), each timed in ``rounds`` interleaved slices of
    ``min_run_time / rounds`` seconds (the median of the slices is kept), so that a drift of the
    machine's speed during the run affects dense convolution and the others alike.

    ONNX Runtime comes last, on its own: its thread pool keeps spinning for a while after each
    run and would slow down whatever is timed next; its session is closed before the next shape.
    """
    t = inputs(shape)
    groups = [[m for m in methods if m != "onnxruntime"]]
    if "onnxruntime" in methods:
        groups.append(["onnxruntime"])
    results = {}
    for group in groups:
        timers = {}
        for method in group:
            for direction, fn in zip(
                ("forward", "forward+backward"), step_functions(method, shape, t), strict=True
            ):
                if fn is None:
                    continue
                if method == "portable":
                    fn = _portable(fn)
                fn()
                timers[(method, direction)] = Timer(
                    stmt="fn()", globals={"fn": fn}, num_threads=THREADS
                )
        slices: dict[tuple[str, str], list[float]] = {key: [] for key in timers}
        for _ in range(rounds):
            for key, timer in timers.items():
                slices[key].append(_clean_median(timer, min_run_time / rounds))
        results.update({key: statistics.median(values) for key, values in slices.items()})
        del timers
        gc.collect()
    return results


def check_agreement(shape: Shape) -> float:
    """Largest difference between deformconv's and ONNX Runtime's outputs (a sanity check)."""
    t = inputs(shape)
    ours = step_functions("deformconv", shape, t)[0]()
    theirs = torch.from_numpy(step_functions("onnxruntime", shape, t)[0]()[0])
    return float((ours - theirs).abs().max())


def _memory_child(method: str, shape_name: str) -> None:
    """Run in a fresh process: the peak-RSS increase of one forward+backward, in bytes."""
    torch.set_num_threads(THREADS)
    shape = SHAPES[shape_name]
    # Load code and JIT kernels on a tiny shape first: code is not the op's memory.
    tiny = Shape("tiny", 1, 4, 4, 8, shape.kernel, 1, shape.padding, 1, shape.offset_groups)
    step_functions(method, tiny, inputs(tiny))[1]()
    t = inputs(shape)
    step = step_functions(method, shape, t)[1]
    before = _rss("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current RSS
        step()
        added = _rss("VmHWM") - before
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak
    print(added)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def measure_memory(shape: Shape, method: str) -> float:
    env = dict(os.environ)
    if method == "portable":
        env["DEFORMCONV_CPU_KERNEL"] = "portable"
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", method, shape.name],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return int(result.stdout.split()[-1]) / 2**20


def _cell(results: dict, method: str, direction: str, dense: float) -> str:
    value = results.get((method, direction))
    if value is None:
        return "-"
    if method == "dense":
        return f"{value:.1f}"
    return f"{value:.1f} ({value / dense:.2f}x)"


def table(shapes, results, memory) -> str:
    header = "| operation | " + " | ".join(s.name for s in shapes) + " |"
    lines = [header, "|---" * (len(shapes) + 1) + "|"]
    for method in METHODS:
        for direction in ("forward", "forward+backward"):
            if not any((method, direction) in results[s.name] for s in shapes):
                continue
            cells = [
                _cell(results[s.name], method, direction, results[s.name][("dense", direction)])
                for s in shapes
            ]
            lines.append(f"| {LABELS[method]} {direction} | " + " | ".join(cells) + " |")
    for method in METHODS:
        if any((s.name, method) in memory for s in shapes):
            cells = [
                f"{memory[(s.name, method)]:.0f}" if (s.name, method) in memory else "-"
                for s in shapes
            ]
            lines.append(
                f"| peak memory of forward+backward, MiB: {LABELS[method]} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    versions = [f"torch {torch.__version__}"]
    for name in ("torchvision", "onnxruntime", "numba"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} missing")
    return f"{model}, {os.cpu_count()} CPUs, {THREADS} threads; " + ", ".join(versions)


def _settle_allocator() -> None:
    """Raise glibc's dynamic mmap threshold (to 24 MiB) before timing anything.

    glibc serves an allocation at least as large as the largest block freed so far with a fresh
    mmap, which costs a page fault per 4 KiB on every call. Without this, whether a tensor of a
    few MiB pays those faults depends on what the process allocated before: dense ``F.conv2d``
    on shape a took 13-14 ms with about 4,000 page faults per call in a fresh process and 9 ms
    with 160 after one large block had been freed. A long-running training process frees large
    blocks all the time, so every method is timed in the second regime.
    """
    block = torch.empty(24 * 2**20 // 4)
    block.fill_(0)
    del block


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help="comma-separated shape names (default: all): " + ", ".join(SHAPES),
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated methods (default: all; dense is always timed): " + ", ".join(METHODS),
    )
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per figure")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory processes")
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("METHOD", "SHAPE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.memory_child:
        _memory_child(*args.memory_child)
        return 0

    torch.set_num_threads(THREADS)
    _settle_allocator()
    shapes = [SHAPES[name.strip()] for name in args.shapes.split(",")]
    methods = ["dense"] + [m for m in METHODS if m != "dense" and m in args.methods.split(",")]
    start = time.perf_counter()
    results, memory, busy = {}, {}, {}
    for shape in shapes:
        with _Interference() as load:
            results[shape.name] = measure_times(shape, args.min_run_time, methods)
        busy[shape.name] = load.foreign / load.wall
        if {"onnxruntime", "deformconv"} <= set(methods):
            difference = check_agreement(shape)
            if difference > 1e-3:
                raise RuntimeError(
                    f"deformconv and ONNX Runtime disagree on {shape.name}: {difference}"
                )
            gc.collect()
        print(f"timed {shape.name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if not args.no_memory:
        jobs = {(s.name, m): (s, m) for s in shapes for m in methods if m != "onnxruntime"}
        # A process's peak resident memory does not depend on how fast it runs, so the fresh
        # processes are measured two at a time.
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            futures = {pool.submit(measure_memory, *job): key for key, job in jobs.items()}
            for future in as_completed(futures):
                memory[futures[future]] = future.result()
        print(f"memory ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python benchmarks/bench_cpu.py", *given])
    print(f"`{command}` on {machine()}")
    print()
    print(
        "Medians in ms; in brackets the ratio to dense `F.conv2d` of the same shape and direction,"
    )
    print(f"measured in the same run (min_run_time {args.min_run_time} s). Float32, DCNv2 (mask).")
    print()
    print(table(shapes, results, memory))
    print()
    for shape in shapes:
        print(f"- {shape.name}: {shape.describe()}")
    noisy = {name: share for name, share in busy.items() if share > 0.1}
    if noisy:
        print()
        print(
            "Warning: other processes used CPU during the timing of "
            + ", ".join(f"{name} ({share:.0%} of a core)" for name, share in noisy.items())
            + "; those ratios are unreliable."
        )
    print(f"\nTotal time {time.perf_counter() - start:.0f} s.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
