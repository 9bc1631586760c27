"""CPU benchmark of deformable convolution v2: each method against dense convolution.

    python benchmarks/bench_cpu.py

The protocol (all of it is here; nothing else needs reading):

- float32, ``torch.set_num_threads(2)`` (``--threads`` changes it for every method);
  deformable convolution v2 (with a mask), random offsets ``randn * 2``, mask
  ``sigmoid(randn)``, weights scaled by ``1 / sqrt(fan_in)``;
- methods: dense ``F.conv2d`` of the same shape (the yardstick: same input, weight, stride,
  padding, dilation), ``torchvision.ops.deform_conv2d``, ONNX Runtime's ``DeformConv`` (forward
  only; a model of one node, opset 19, as many threads), deformconv's portable PyTorch kernel
  (``--methods`` only) and deformconv's Numba CPU kernel;
- forward, and forward+backward: gradients of a random upstream gradient with respect to
  input, offset, mask, weight and bias (dense: input, weight, bias);
- every figure is the median of ``torch.utils.benchmark.Timer.blocked_autorange`` after a
  warm-up call, each method timed in three interleaved slices of ``min_run_time / 3`` (the
  median slice is kept), so a drift of the machine's speed affects every method alike, and
  reported with its ratio to dense convolution of the same shape and direction measured in the
  same process, in the same run (absolute times on a shared machine drift by 2x from run to
  run; ratios measured side by side do not);
- peak memory is the increase of the peak resident set that one forward+backward adds, each in
  a fresh process after a warm-up on a tiny image of the same layer (so that loading code and
  compiling kernels do not count);
- the network rows (``benchmarks/bench_resnet.py``; ``--no-network`` skips them) time
  ResNet-50 with DCNv2 in conv2 of every bottleneck of layer2-4 (mmdetection's R50-DCN)
  against the plain ResNet-50: inference on 1x3x512x512 and a training step (forward and
  backward) on 2x3x320x320, with deformconv's layers and with torchvision's op.

Two pitfalls of timing on a small shared machine are handled: glibc serves an allocation at
least as large as the largest block freed so far with a fresh ``mmap`` (a page fault per 4 KiB
on every call), so a 24 MiB block is freed first and every method runs in the regime of a
long-running process; and ONNX Runtime's thread pool keeps spinning after each run, so it is
timed last. If other processes take CPU during a measurement, it is repeated, and the table
says so underneath; the load average is printed with the table.

The table is printed as Markdown; progress goes to stderr.
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

from deformconv.ops import output_size, use_kernel

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
    size: int  # height (and width, unless given)
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    offset_groups: int = 1
    width: int | None = None

    @property
    def in_size(self) -> tuple[int, int]:
        return self.size, self.size if self.width is None else self.width

    @property
    def out_size(self) -> tuple[int, int]:
        pairs = [(v, v) for v in (self.kernel, self.stride, self.padding, self.dilation)]
        return output_size(*self.in_size, *pairs)

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
        height, width = self.in_size
        return (
            f"batch {self.batch}, {self.in_channels} -> {self.out_channels} channels, "
            f"{height}x{width}, kernel {self.kernel}x{self.kernel}, padding {self.padding}"
            + "".join(f", {e}" for e in extra)
        )


SHAPES = {
    s.name: s
    for s in (
        Shape("a", 8, 64, 64, 56),
        Shape("b", 2, 256, 256, 28),
        Shape("c", 32, 32, 32, 28),
        # Frame alignment in video restoration (EDVR, BasicVSR++): one 180x320 frame.
        Shape("video", 1, 64, 64, 180, width=320, offset_groups=8),
        Shape("dilated og4", 4, 96, 96, 40, padding=2, dilation=2, offset_groups=4),
        Shape("5x5 stride 2", 8, 48, 64, 32, kernel=5, stride=2, padding=2),
        Shape("a stride 2", 8, 64, 64, 56, stride=2),
        Shape("a dilation 2", 8, 64, 64, 56, padding=2, dilation=2),
        Shape("b 5x5", 2, 256, 256, 28, kernel=5, padding=2),
        Shape("a offset groups 4", 8, 64, 64, 56, offset_groups=4),
    )
}
DEFAULT_SHAPES = ("a", "b", "c", "video", "dilated og4", "5x5 stride 2")
DEFAULT_METHODS = ("dense", "torchvision", "onnxruntime", "deformconv")


def inputs(shape: Shape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 input, weight, bias, offsets ``randn * 2``, mask ``sigmoid(randn)``, grad."""
    gen = torch.Generator().manual_seed(seed)
    taps = shape.kernel**2
    out = shape.out_size
    return {
        "input": torch.randn(shape.batch, shape.in_channels, *shape.in_size, generator=gen),
        "weight": torch.randn(
            shape.out_channels, shape.in_channels, shape.kernel, shape.kernel, generator=gen
        )
        / (shape.in_channels * taps) ** 0.5,
        "bias": torch.randn(shape.out_channels, generator=gen),
        "offset": torch.randn(shape.batch, 2 * shape.offset_groups * taps, *out, generator=gen) * 2,
        "mask": torch.sigmoid(
            torch.randn(shape.batch, shape.offset_groups * taps, *out, generator=gen)
        ),
        "grad": torch.randn(shape.batch, shape.out_channels, *out, generator=gen),
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
    out_h, out_w = shape.out_size
    graph = helper.make_graph(
        [node],
        "deform_conv",
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape))
            for n, a in zip(names, arrays, strict=True)
        ],
        [
            helper.make_tensor_value_info(
                "Y", TensorProto.FLOAT, [shape.batch, shape.out_channels, out_h, out_w]
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


def _clean_median(timer: Timer, min_run_time: float, retries: int = 1) -> float:
    """Median of ``timer.blocked_autorange``; a measurement during which other processes took
    more than a quarter of a core is repeated (up to ``retries`` times, so that a busy machine
    cannot stretch the run without bound) and the least disturbed one kept."""
    best = None
    for _ in range(retries + 1):
        with _Interference() as load:
            median = timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
        share = load.foreign / load.wall
        if best is None or share < best[0]:
            best = (share, median)
        if share < 0.25:
            break
        time.sleep(0.5)
    return best[1]


def on_portable(fn: Callable[[], object]) -> Callable[[], object]:
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
                if fn is not None:
                    timers[(method, direction)] = warm_timer(
                        on_portable(fn) if method == "portable" else fn
                    )
        results.update(interleaved_medians(timers, min_run_time, rounds))
        del timers
        gc.collect()
    return results


def warm_timer(fn: Callable[[], object]) -> Timer:
    """A timer of ``fn`` on ``THREADS`` threads, after one warm-up call (which compiles kernels
    and sizes buffers)."""
    fn()
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=THREADS)


def interleaved_medians(timers: dict, min_run_time: float, rounds: int = 3) -> dict:
    """Medians in ms of ``timers``, each timed in ``rounds`` interleaved slices of
    ``min_run_time / rounds`` seconds (the median of its slices is kept), so that a drift of the
    machine's speed during the run affects them all alike."""
    slices: dict = {key: [] for key in timers}
    for _ in range(rounds):
        for key, timer in timers.items():
            slices[key].append(_clean_median(timer, min_run_time / rounds))
    return {key: statistics.median(values) for key, values in slices.items()}


def check_agreement(shape: Shape) -> float:
    """Largest difference between deformconv's and ONNX Runtime's outputs (a sanity check)."""
    t = inputs(shape)
    ours = step_functions("deformconv", shape, t)[0]()
    theirs = torch.from_numpy(step_functions("onnxruntime", shape, t)[0]()[0])
    return float((ours - theirs).abs().max())


def _memory_child(method: str, shape_name: str, threads: str) -> None:
    """Run in a fresh process: the peak-RSS increase of one forward+backward, in bytes."""
    torch.set_num_threads(int(threads))
    shape = SHAPES[shape_name]
    # Load code and JIT kernels on a tiny image of the same layer first (same channels and
    # kernel, so the same kernels run): code is not the op's memory.
    tiny = Shape(
        "tiny",
        1,
        shape.in_channels,
        shape.out_channels,
        8,
        shape.kernel,
        1,
        shape.padding,
        1,
        shape.offset_groups,
    )
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
        [sys.executable, __file__, "--memory-child", method, shape.name, str(THREADS)],
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
    global THREADS
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shapes",
        default=",".join(DEFAULT_SHAPES),
        help=f"comma-separated shape names (default: {','.join(DEFAULT_SHAPES)}); known: "
        + ", ".join(f"{name!r} ({shape.describe()})" for name, shape in SHAPES.items()),
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)}; dense is always "
        "timed): " + ", ".join(METHODS),
    )
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per figure")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory processes")
    parser.add_argument("--no-network", action="store_true", help="skip the ResNet-50 rows")
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"threads of every method (default {THREADS}; 1 gives ratios that other processes "
        "on a shared machine disturb less)",
    )
    parser.add_argument(
        "--memory-child", nargs=3, metavar=("METHOD", "SHAPE", "THREADS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.memory_child:
        _memory_child(*args.memory_child)
        return 0
    unknown = [n.strip() for n in args.shapes.split(",") if n.strip() not in SHAPES]
    if unknown:
        parser.error(
            f"--shapes: unknown {', '.join(map(repr, unknown))}; known: {', '.join(SHAPES)}"
        )
    unknown = [m.strip() for m in args.methods.split(",") if m.strip() not in METHODS]
    if unknown:
        parser.error(
            f"--methods: unknown {', '.join(map(repr, unknown))}; known: {', '.join(METHODS)}"
        )

    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    THREADS = args.threads
    torch.set_num_threads(THREADS)
    _settle_allocator()
    shapes = [SHAPES[name.strip()] for name in args.shapes.split(",")]
    chosen = {m.strip() for m in args.methods.split(",")}
    methods = ["dense"] + [m for m in METHODS if m != "dense" and m in chosen]
    start = time.perf_counter()
    loads = [os.getloadavg()[0]]
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
    network = None
    if not args.no_network:
        import bench_resnet

        names = ("plain", "deformconv") + (("torchvision",) if "torchvision" in chosen else ())
        network = bench_resnet.measure(names=names)
        gc.collect()
        print(f"networks ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    loads.append(os.getloadavg()[0])
    if not args.no_memory:
        jobs = {(s.name, m): (s, m) for s in shapes for m in methods if m != "onnxruntime"}
        # A process's peak resident memory does not depend on how fast it runs, so the fresh
        # processes are measured two at a time.
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {pool.submit(measure_memory, *job): key for key, job in jobs.items()}
            for future in as_completed(futures):
                memory[futures[future]] = future.result()
        print(f"memory ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python benchmarks/bench_cpu.py", *given])
    print(f"`{command}` on {machine()}; load average {loads[0]:.2f} before, {loads[1]:.2f} after")
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
    if network is not None:
        import bench_resnet

        print()
        print(
            "ResNet-50 with DCNv2 in conv2 of layer2-4 against the plain ResNet-50 "
            f"(`benchmarks/bench_resnet.py`, {THREADS} threads, 3 interleaved rounds, medians in "
            "ms; in brackets the ratio to the plain network):"
        )
        print()
        print(bench_resnet.table(network))
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
