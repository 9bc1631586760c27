"""The GPU check of deformconv's CUDA path: parity and benchmarks, in one unattended run.

    python benchmarks/gpu_check.py --json gpu_check.json        # on a machine with a GPU
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke   # CPU, tiny shapes (CI)

1. Parity: forward and the five gradients (input, offset, mask, weight, bias) of the Triton
   kernel, through the public operator, against torchvision's op and deformconv's portable
   kernel on the same device, on 30+ configurations: strides, padding, dilation, groups, offset
   groups, v1 and v2, channels_last and non-contiguous inputs, float16/bfloat16 (compared with
   the references in float32 on the same rounded inputs), batch 0, a batch whose launch needs
   the grid fix (1024 images, 4 offset groups, 5x5 kernel), the deterministic backward (checked
   bit-identical between two runs), a small workspace budget, and tensors on ``cuda:1`` when
   there are two GPUs. Errors are max |got - reference| / max |reference| per tensor.
2. Benchmarks: the CPU benchmark's shapes a, b and c (batch 8 x 64 ch x 56x56, batch 2 x 256
   ch x 28x28, batch 32 x 32 ch x 28x28), float32 and float16, forward and forward+backward
   medians (``torch.utils.benchmark``) of dense cuDNN ``F.conv2d``,
   torchvision's op, the portable kernel and the Triton kernel, with ratios to dense convolution
   measured in the same run, and the peak memory one forward+backward adds
   (``torch.cuda.max_memory_allocated``).
3. DCNv3/DCNv4 parity and 4. DCNv3 benchmarks (benchmarks/_gpu_check_dcnv.py): the Triton
   kernel of ``deformconv.ops.dcnv3``/``dcnv4`` against the portable kernel and the upstream
   ``grid_sample`` formulation on 25 configurations, and the DCNv3 core on InternImage-T's four
   stages against the portable kernel, that formulation and a depthwise 3x3 convolution.

The sections run in the order parity, DCNv3/DCNv4 parity, benchmarks, DCNv3 benchmarks, and
share their loops (benchmarks/_gpu_check_common.py). Every section, configuration and
measurement is isolated: a failure is reported and the run goes on. Progress lines go to stdout
as it runs, then one summary (Markdown tables); ``--json`` writes the summary as JSON too
(rewritten after each configuration and measurement). Exit code 0 when every parity check of
both parity sections ran and passed, 1 otherwise. Past ``--time-limit`` seconds (default 480,
for a machine that stops the run at 600) no configuration or measurement of any section starts;
those not run are listed as such and, for parity, fail the check.

``--smoke`` runs everything on the CPU on tiny shapes, with the Triton kernels in Triton's
interpreter, so that this script cannot rot before it meets a GPU (tests/benchmarks).
"""

from __future__ import annotations

import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:  # the interpreter is chosen when Triton is imported, which happens below
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Deterministic cuBLAS, for the deterministic-backward configuration (PyTorch's reproducibility
# notes); it must be set before cuBLAS starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from types import ModuleType  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from _gpu_check_common import (  # noqa: E402
    DTYPES,
    TOLERANCE,
    add_ratios,
    bench_tables,
    describe,
    failed,
    leaf,
    log,
    no_fallback,
    parity_table,
    reference_copies,
    rel_error,
    run_benchmarks,
    run_checks,
    run_under_test,
    start_check,
    time_steps,
    verdict,
)
from deformconv import deform_conv2d  # noqa: E402
from deformconv.ops import active_kernel, output_size, use_kernel, workspace_budget  # noqa: E402

GRADS = ("input", "offset", "mask", "weight", "bias")
REFERENCES = ("portable", "torchvision")


def dcnv() -> ModuleType:
    """The DCNv3/DCNv4 sections, imported when they run: a failure to import them is theirs
    alone, and the deformable-convolution sections still run."""
    import _gpu_check_dcnv

    return _gpu_check_dcnv


@dataclass(frozen=True)
class Config:
    """One parity configuration; pairs are (height, width)."""

    name: str
    batch: int = 2
    channels: int = 16
    out_channels: int = 16
    size: tuple[int, int] = (12, 12)
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    offset_groups: int = 1
    mask: bool = True
    bias: bool = True
    dtype: str = "float32"
    layout: str = "contiguous"  # or channels_last, strided (input), strided_offset
    offset_scale: float = 2.0
    deterministic: bool = False
    budget: int | None = None
    device_index: int | None = None
    non_finite: bool = False
    max_grid_x: int | None = None  # smoke: lower the launch limit to split launches


def parity_configs(smoke: bool) -> list[Config]:
    if smoke:
        # One image (the interpreter's time grows with images x taps), two where a test needs
        # more than one.
        base = {"batch": 1, "channels": 4, "out_channels": 4, "size": (5, 6)}
        return [
            Config("base", **base),
            Config("float64", **base, dtype="float64"),
            Config("v1 (no mask)", **base, mask=False, bias=False),
            Config("groups 2, offset groups 2", **base, groups=2, offset_groups=2),
            Config("channels_last", **base, layout="channels_last"),
            Config("strided input", **base, layout="strided"),
            Config("float16", **base, dtype="float16"),
            Config("bfloat16", **base, dtype="bfloat16"),
            Config("batch 0", **{**base, "batch": 0}),
            Config("split launches", **{**base, "batch": 2}, max_grid_x=9),
            Config("deterministic", **base, deterministic=True),
            Config("cuda:1", **base, device_index=1),
        ]
    grid_fix = {"batch": 1024, "channels": 8, "out_channels": 8, "size": (8, 8)}
    grid_fix.update(kernel=(5, 5), padding=(2, 2), offset_groups=4)
    return [
        Config("base"),
        Config("float64", dtype="float64"),
        Config("v1 (no mask)", mask=False),
        Config("no bias", bias=False),
        Config("stride 2", stride=(2, 2)),
        Config("dilation 2", dilation=(2, 2), padding=(2, 2)),
        Config("5x5 kernel", kernel=(5, 5), padding=(2, 2)),
        Config("3x2 kernel", kernel=(3, 2), padding=(1, 0)),
        Config("1x1 kernel", kernel=(1, 1), padding=(0, 0)),
        Config("stride/padding/dilation mixed", stride=(2, 1), padding=(0, 1), dilation=(1, 2)),
        Config("weight groups 4", groups=4),
        Config("offset groups 4", offset_groups=4),
        Config("groups 2, offset groups 2", groups=2, offset_groups=2),
        Config("64 channels (4 channel blocks)", channels=64, out_channels=32),
        Config("24 channels (partial block)", channels=24, out_channels=8),
        Config("odd 13x17 image", size=(13, 17)),
        Config("64x64 image", size=(64, 64), channels=8, out_channels=8),
        Config("large offsets", offset_scale=10.0),
        Config("zero offsets", offset_scale=0.0),
        Config("batch 1", batch=1),
        Config("batch 0", batch=0),
        Config("channels_last", layout="channels_last"),
        Config("strided input", layout="strided"),
        Config("strided offset and mask", layout="strided_offset"),
        Config("non-finite offsets (vs portable)", non_finite=True),
        Config("float16", dtype="float16"),
        Config("float16 channels_last", dtype="float16", layout="channels_last"),
        Config("float16 offset groups 4", dtype="float16", offset_groups=4),
        Config("float16 batch 0", dtype="float16", batch=0),
        Config("bfloat16", dtype="bfloat16"),
        Config("bfloat16 v1", dtype="bfloat16", mask=False),
        Config("bfloat16 5x5", dtype="bfloat16", kernel=(5, 5), padding=(2, 2)),
        Config("small workspace (chunks)", batch=8, budget=2**16),
        Config("grid fix: batch 1024, 4 offset groups, 5x5", **grid_fix),
        Config("grid fix, float16", **grid_fix, dtype="float16"),
        Config("deterministic backward", deterministic=True),
        Config("deterministic backward float16", deterministic=True, dtype="float16"),
        Config("deterministic, chunks", deterministic=True, batch=8, budget=2**16),
        Config("cuda:1 (non-default device)", device_index=1),
    ]


# ---------------------------------------------------------------------------------------------
# Implementations. Each runs forward and backward and returns (output, five gradients).


def _leaves(t: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
    return {k: None if v is None else leaf(v.detach()) for k, v in t.items()}


def _call_op(op: Callable[..., Tensor], t: dict[str, Tensor | None], cfg: Config) -> Tensor:
    return op(
        t["input"], t["offset"], t["weight"], t["bias"], stride=cfg.stride,
        padding=cfg.padding, dilation=cfg.dilation, mask=t["mask"],
    )  # fmt: skip


class _TritonOnCpu(torch.autograd.Function):
    """The Triton kernels called directly (smoke runs on CPU: the dispatcher maps CPU to Numba)."""

    @staticmethod
    def forward(ctx, input, offset, mask, weight, bias, params):  # type: ignore[override]
        from deformconv.ops import _triton

        ctx.save_for_backward(input, offset, mask, weight, bias)
        ctx.params = params
        if input.shape[0] == 0:
            return input.new_zeros((0, weight.shape[0], *offset.shape[2:]))
        return _triton.forward(input, offset, mask, weight, bias, *params)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        from deformconv.ops import _triton

        if ctx.saved_tensors[0].shape[0] == 0:
            zeros = [None if t is None else torch.zeros_like(t) for t in ctx.saved_tensors]
            return (*zeros, None)
        grads = _triton.backward(grad.contiguous(), *ctx.saved_tensors, *ctx.params)
        return (*grads, None)


def _triton_cpu(
    input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None
):
    return _TritonOnCpu.apply(input, offset, mask, weight, bias, (stride, padding, dilation))


@contextlib.contextmanager
def implementation(name: str, device: torch.device) -> Iterator[Callable[..., Tensor]]:
    """The deformable-convolution callable of ``name`` on ``device``, and the kernel choice it
    needs held for forward and backward."""
    if name == "torchvision":
        import torchvision

        yield torchvision.ops.deform_conv2d
    elif name == "triton" and device.type != "cuda":
        yield _triton_cpu
    else:
        with use_kernel(name, device.type):
            yield deform_conv2d


def run_impl(name: str, t: dict, cfg: Config, upstream: Tensor, device: torch.device):
    leaves = _leaves(t)
    with implementation(name, device) as op, no_fallback():
        out = _call_op(op, leaves, cfg)
        present = [leaves[g] for g in GRADS if leaves[g] is not None]
        grads = iter(torch.autograd.grad(out, present, upstream.to(out.dtype)))
        if name == "triton" and device.type == "cuda" and active_kernel("cuda") != "triton":
            raise RuntimeError("the Triton kernel was replaced by the portable kernel")
    return out.detach(), {g: None if leaves[g] is None else next(grads) for g in GRADS}


# ---------------------------------------------------------------------------------------------
# Parity.


def make_tensors(cfg: Config, device: torch.device) -> tuple[dict, Tensor]:
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[cfg.dtype]
    out_h, out_w = output_size(*cfg.size, cfg.kernel, cfg.stride, cfg.padding, cfg.dilation)
    taps = cfg.kernel[0] * cfg.kernel[1]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    t = {
        "input": rand(cfg.batch, cfg.channels, *cfg.size),
        "offset": rand(
            cfg.batch, 2 * cfg.offset_groups * taps, out_h, out_w, scale=cfg.offset_scale
        ),
        "mask": torch.sigmoid(rand(cfg.batch, cfg.offset_groups * taps, out_h, out_w)),
        "weight": rand(cfg.out_channels, cfg.channels // cfg.groups, *cfg.kernel, scale=0.3),
        "bias": rand(cfg.out_channels),
    }
    if not cfg.mask:
        t["mask"] = None
    if not cfg.bias:
        t["bias"] = None
    if cfg.non_finite and cfg.batch:
        t["offset"][0, 0, 0, 0] = float("nan")
        t["offset"][-1, 1, -1, -1] = float("inf")
    if cfg.layout == "channels_last":
        t["input"] = t["input"].to(memory_format=torch.channels_last)
    elif cfg.layout == "strided":
        wide = torch.full((*t["input"].shape[:3], 2 * cfg.size[1]), float("nan"), device=device)
        wide = wide.to(dtype)
        wide[..., ::2] = t["input"]
        t["input"] = wide[..., ::2]
    elif cfg.layout == "strided_offset":
        for key in ("offset", "mask"):
            if t[key] is not None:
                t[key] = t[key].transpose(2, 3).contiguous().transpose(2, 3)
    upstream = rand(cfg.batch, cfg.out_channels, out_h, out_w)
    return t, upstream


def check_config(cfg: Config, base_device: torch.device) -> dict:
    result, device = start_check(cfg, base_device)
    if device is None:
        return result
    errors: dict[str, dict[str, float]] = {}
    t, upstream = make_tensors(cfg, device)
    ref_t, ref_up = reference_copies(t, upstream, cfg.dtype)
    out, grads = run_under_test(
        lambda: run_impl("triton", t, cfg, upstream, device), cfg, device, result, errors
    )
    for ref_name in REFERENCES[:1] if cfg.non_finite else REFERENCES:
        try:
            with workspace_budget(cfg.budget) if cfg.budget else contextlib.nullcontext():
                ref_out, ref_grads = run_impl(ref_name, ref_t, cfg, ref_up, device)
        except (NotImplementedError, RuntimeError) as exc:
            if ref_name == "torchvision":
                result["notes"].append(f"torchvision not compared: {type(exc).__name__}: {exc}")
                continue
            raise
        found = {"output": rel_error(out, ref_out)}
        found.update({g: rel_error(grads[g], ref_grads[g]) for g in GRADS if grads[g] is not None})
        errors[f"vs {ref_name}"] = found
    return verdict(result, errors, TOLERANCE[cfg.dtype])


# ---------------------------------------------------------------------------------------------
# Benchmarks.


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    channels: int
    size: int


def bench_shapes(smoke: bool) -> list[Shape]:
    if smoke:
        return [Shape("tiny", 1, 4, 6)]
    # The CPU benchmark's shapes (benchmarks/bench_cpu.py): 3x3 kernel, padding 1, as many
    # output channels as input channels.
    return [Shape("a", 8, 64, 56), Shape("b", 2, 256, 28), Shape("c", 32, 32, 28)]


METHODS = {
    "dense": "dense cuDNN `F.conv2d`",
    "torchvision": "torchvision `deform_conv2d`",
    "portable": "deformconv portable kernel",
    "triton": "deformconv Triton kernel",
}


def _bench_tensors(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)

    def rand(*dims):
        return torch.randn(*dims, generator=gen).to(device, dtype)

    b, c, s = shape.batch, shape.channels, shape.size
    return {
        "input": rand(b, c, s, s),
        "offset": rand(b, 18, s, s) * 2,
        "mask": torch.sigmoid(rand(b, 9, s, s)),
        "weight": rand(c, c, 3, 3),
        "bias": rand(c),
        "grad": rand(b, c, s, s),
    }


def _steps(method: str, t: dict[str, Tensor], op: Callable[..., Tensor] | None):
    """Forward and forward+backward closures of ``op`` (dense convolution when ``None``)."""
    names = ("input", "weight", "bias") if op is None else GRADS
    leaves = {k: leaf(t[k]) for k in names}

    def call():
        if op is None:
            return F.conv2d(leaves["input"], leaves["weight"], leaves["bias"], padding=1)
        return op(
            leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"],
            padding=(1, 1), mask=leaves["mask"],
        )  # fmt: skip

    def forward():
        with torch.no_grad():
            return call()

    def forward_backward():
        for v in leaves.values():
            v.grad = None
        call().backward(t["grad"])

    return forward, forward_backward


def benchmark_section(
    device: torch.device,
    smoke: bool,
    deadline: float,
    min_run_time: float,
    rows: list,
    save: Callable[[], None],
) -> list[dict]:
    """Time every method, appending to ``rows`` (and saving) as each measurement ends."""

    def measure(method: str, t: dict[str, Tensor], row: dict) -> None:
        dense = method == "dense"
        with (
            contextlib.nullcontext() if dense else implementation(method, device) as op,
            no_fallback(),
        ):
            time_steps(row, *_steps(method, t, op), device, min_run_time)

    plan = [
        (
            name,
            shape.name,
            lambda shape=shape, dtype=DTYPES[name]: _bench_tensors(shape, dtype, device),
        )
        for name in ("float32", "float16")
        for shape in bench_shapes(smoke)
    ]
    run_benchmarks("bench", plan, METHODS, measure, deadline, rows, save)
    add_ratios(rows, "dense")
    return rows


# ---------------------------------------------------------------------------------------------
# Summary.


def environment(device: torch.device, smoke: bool) -> dict:
    import deformconv

    env = {
        "deformconv": deformconv.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "smoke": smoke,
        "interpreter": os.environ.get("TRITON_INTERPRET", "") == "1",
    }
    for name in ("triton", "torchvision"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:
            env[name] = f"unavailable ({type(exc).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
            cuda=torch.version.cuda,
            float32_matmul_precision=torch.get_float32_matmul_precision(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        )
    return env


def write_json(path: str | None, summary: dict) -> None:
    if not path:
        return
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    os.replace(tmp, path)


def print_summary(summary: dict, smoke: bool) -> None:
    """The run's one summary: environment, parity tables, benchmark tables, verdict."""
    print("\n# deformconv GPU check" + (" (smoke, CPU, Triton interpreter)" if smoke else ""))
    print("\n`" + summary["command"] + "`")
    print("\n" + ", ".join(f"{k} {v}" for k, v in summary.get("environment", {}).items()))
    for title, key in (("deform_conv2d parity", "parity"), ("DCNv3/DCNv4 parity", "dcnv_parity")):
        results = summary[key]
        if results:
            references = REFERENCES if key == "parity" else dcnv().REFERENCES
            passed = sum(r["status"] == "pass" for r in results)
            skipped = sum(r["status"] == "skipped" for r in results)
            print(
                f"\n{title}: {passed} of {len(results)} configurations passed, {skipped} skipped, "
                f"{len(failed(results))} failed\n"
            )
            print(parity_table(results, references))
    if summary["benchmarks"]:
        print(
            "\ndeform_conv2d v2, 3x3, padding 1 (the benchmark protocol's shapes; tiny in --smoke)"
        )
        print(bench_tables(summary["benchmarks"], METHODS, "dense", "dense convolution"))
    if summary["dcnv_benchmarks"]:
        print(dcnv().bench_report(summary["dcnv_benchmarks"]))
    outcome = (
        "PASSED"
        if summary["passed"]
        else "FAILED: " + "; ".join(summary["failures"] or ["no parity results"])
    )
    print(f"\nGPU check {outcome} in {summary['elapsed_s']} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreter")
    parser.add_argument("--json", help="also write the summary as JSON to this path")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=480.0,
        help="seconds after which no configuration or measurement starts (default 480)",
    )
    parser.add_argument("--skip-bench", action="store_true", help="parity only")
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.time_limit
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    else:
        print("gpu_check: no CUDA device is available; use --smoke for the CPU run", flush=True)
        return 2
    summary: dict = {
        "sections": {},
        "command": " ".join(
            ["python benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    for key in ("parity", "dcnv_parity", "benchmarks", "dcnv_benchmarks"):
        summary[key] = []

    def save() -> None:
        summary["elapsed_s"] = round(time.monotonic() - started, 1)
        write_json(args.json, summary)

    # Each section looks its functions up when it runs (the DCNv3 ones are imported then).
    def parity(key: str, functions: Callable[[], tuple[Callable, Callable]]) -> Callable[[], list]:
        """A parity section: ``check(config)`` of each of ``configs(smoke)``."""

        def run() -> list[dict]:
            log(f"{key} on {device}")
            configs, check = functions()
            checks = functools.partial(check, base_device=device)
            return run_checks(key, configs(args.smoke), checks, deadline, summary[key], save)

        return run

    def bench(key: str, section: Callable[[], Callable[..., list]]) -> Callable[[], list]:
        min_run_time = 0.01 if args.smoke else 0.25
        return lambda: section()(device, args.smoke, deadline, min_run_time, summary[key], save)

    sections: list[tuple[str, Callable[[], object]]] = [
        ("environment", lambda: environment(device, args.smoke)),
        ("parity", parity("parity", lambda: (parity_configs, check_config))),
        (
            "dcnv_parity",
            parity("dcnv_parity", lambda: (dcnv().parity_configs, dcnv().check_config)),
        ),
    ]
    if not args.skip_bench:
        sections.append(("benchmarks", bench("benchmarks", lambda: benchmark_section)))
        sections.append(
            ("dcnv_benchmarks", bench("dcnv_benchmarks", lambda: dcnv().benchmark_section))
        )
    for name, run in sections:
        log(f"section {name}")
        try:
            summary[name] = run()
            summary["sections"][name] = "ok"
        except Exception as exc:  # a section's crash is reported and the next one runs
            summary["sections"][name] = f"ERROR: {describe(exc)}"
            log(f"section {name} failed: {summary['sections'][name]}")
        save()

    failures = failed(summary["parity"]) + failed(summary["dcnv_parity"])
    crashed = [n for n, s in summary["sections"].items() if s != "ok"]
    ran = bool(summary["parity"]) and bool(summary["dcnv_parity"])
    summary["passed"] = not failures and not crashed and ran
    summary["failures"] = failures + [f"section {n}" for n in crashed]
    save()

    print_summary(summary, args.smoke)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
