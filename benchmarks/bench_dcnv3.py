"""CPU benchmark of the DCNv3 core on InternImage-T's four stages, and of a whole stage stack.

    python benchmarks/bench_dcnv3.py

Core: at 224x224 input and batch 8, InternImage-T's stages are 56x56x64 with 4 groups,
28x28x128 / 8, 14x14x256 / 16 and 7x7x512 / 32 (3x3 kernel, stride 1, padding 1, group width
16). For each, in one process, float32 on 2 threads: the upstream ``grid_sample`` formulation
(InternImage's ``dcnv3_core_pytorch``, written out below from its semantics), deformconv's DCNv3
operator (the Numba CPU kernel) and its portable kernel, and a depthwise 3x3 ``nn.Conv2d`` of the
same shape (on a contiguous NCHW tensor, and on the channels-last view InternImage's ``dw_conv``
receives), forward and forward+backward (gradients of input, offsets and mask; of input and
weight for the convolution). Offsets are ``randn * 2``, masks a softmax over each group's points.
Every figure is a median of ``torch.utils.benchmark`` after a warm-up call, timed in interleaved
slices so that drifts of the machine's speed touch every method alike; ratios compare figures
of the same run.

Stack: InternImage-T's stages after the stem (depths 4, 4, 18, 4; channels 64 to 512; a block is
``x + dcn(norm1(x))`` then ``x + mlp(norm2(x))`` with DCNv3 layers, LayerNorms and 4x MLPs, and
a strided 3x3 convolution with LayerNorm between stages), per image: inference at batch 1 and a
training step (forward and backward) at batch 8 divided by 8, with deformconv's core and with the
upstream formulation in the same layers.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import deformconv.nn.dcnv3 as dcnv3_layer
from bench_cpu import (
    THREADS,
    _Interference,
    _settle_allocator,
    interleaved_medians,
    machine,
    on_portable,
    warm_timer,
)
from deformconv.nn import DCNv3
from deformconv.ops import dcnv3

STAGES = {"1": (56, 64, 4), "2": (28, 128, 8), "3": (14, 256, 16), "4": (7, 512, 32)}
BATCH = 8
DEPTHS = (4, 4, 18, 4)
METHODS = ("reference", "deformconv", "portable", "dw_nchw", "dw_nhwc")
# The portable kernel (the fallback on devices without a fast kernel) is slow; --methods adds it.
DEFAULT_METHODS = ("reference", "deformconv", "dw_nchw", "dw_nhwc")
LABELS = {
    "reference": "upstream `grid_sample` formulation",
    "deformconv": "deformconv DCNv3 (Numba CPU kernel)",
    "portable": "deformconv DCNv3 (portable kernel)",
    "dw_nchw": "depthwise 3x3 `nn.Conv2d`, NCHW",
    "dw_nhwc": "depthwise 3x3 `nn.Conv2d`, channels-last",
}


def upstream_dcnv3_core(
    input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
    dilation_h, dilation_w, group, group_channels, offset_scale, remove_center,
):  # fmt: skip
    """InternImage's ``dcnv3_core_pytorch`` semantics, step by step as upstream computes them:
    pad (W by pad_h, H by pad_w), normalised reference points and dilation grid, offsets over
    ``[W, H]``, ``grid_sample(bilinear, zeros, align_corners=False)`` per group, mask, sum."""
    x = F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])
    n, h, w, _ = x.shape
    _, ho, wo, _ = offset.shape
    opts = dict(dtype=x.dtype, device=x.device)
    half_h, half_w = dilation_h * (kernel_h - 1) // 2, dilation_w * (kernel_w - 1) // 2
    ref_y, ref_x = torch.meshgrid(
        torch.linspace(half_h + 0.5, half_h + 0.5 + (ho - 1) * stride_h, ho, **opts),
        torch.linspace(half_w + 0.5, half_w + 0.5 + (wo - 1) * stride_w, wo, **opts),
        indexing="ij",
    )
    ref = torch.stack((ref_x.reshape(-1)[None] / w, ref_y.reshape(-1)[None] / h), -1)
    ref = ref.reshape(1, ho, wo, 1, 2)
    gx, gy = torch.meshgrid(
        torch.linspace(-half_w, -half_w + (kernel_w - 1) * dilation_w, kernel_w, **opts),
        torch.linspace(-half_h, -half_h + (kernel_h - 1) * dilation_h, kernel_h, **opts),
        indexing="ij",
    )
    grid = torch.stack([gx / w, gy / h], -1).reshape(-1, 1, 2).repeat(1, group, 1)
    grid = grid.permute(1, 0, 2).reshape(1, 1, 1, group * kernel_h * kernel_w, 2)
    points = kernel_h * kernel_w - int(remove_center)
    norm = torch.tensor([w, h], **opts).reshape(1, 1, 1, 2).repeat(1, 1, 1, group * points)
    locations = (ref + grid * offset_scale).repeat(n, 1, 1, 1, 1)
    if remove_center:
        centre = (kernel_w * kernel_h - 1) // 2
        keep = [i for i in range(locations.shape[-2]) if (i - centre) % (2 * centre + 1) != 0]
        locations = locations[:, :, :, keep, :]
    locations = locations.flatten(3, 4) + offset * offset_scale / norm
    grids = (2 * locations - 1).view(n, ho * wo, group, points, 2).transpose(1, 2).flatten(0, 1)
    planes = x.view(n, h * w, -1).transpose(1, 2).reshape(n * group, group_channels, h, w)
    sampled = F.grid_sample(planes, grids, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # fmt: skip
    weights = mask.view(n, ho * wo, group, points).transpose(1, 2).reshape(n * group, 1, -1, points)
    out = (sampled * weights).sum(-1).view(n, group * group_channels, ho * wo)
    return out.transpose(1, 2).reshape(n, ho, wo, -1).contiguous()


def core_inputs(stage: str, seed: int = 0) -> dict[str, torch.Tensor]:
    size, channels, group = STAGES[stage]
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, size, size)
    logits = torch.randn(*shape, group, 9, generator=gen)
    return {
        "input": torch.randn(*shape, channels, generator=gen),
        "offset": torch.randn(*shape, group * 18, generator=gen) * 2,
        "mask": torch.softmax(logits, -1).reshape(*shape, -1),
        "grad": torch.randn(*shape, channels, generator=gen),
    }


def _core_steps(core: Callable, stage: str, t: dict) -> tuple[Callable, Callable]:
    group = STAGES[stage][2]
    args = (3, 3, 1, 1, 1, 1, 1, 1, group, t["input"].shape[-1] // group, 1.0, False)
    leaves = [t[k].clone().requires_grad_() for k in ("input", "offset", "mask")]

    def forward():
        with torch.no_grad():
            return core(t["input"], t["offset"], t["mask"], *args)

    def forward_backward():
        out = core(*leaves, *args)
        return torch.autograd.grad(out, leaves, t["grad"])

    return forward, forward_backward


def _conv_steps(stage: str, t: dict, channels_last: bool) -> tuple[Callable, Callable]:
    channels = STAGES[stage][1]
    conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
    x = t["input"].permute(0, 3, 1, 2)  # the view InternImage's dw_conv receives
    if not channels_last:
        x = x.contiguous()
    leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    grad = t["grad"].permute(0, 3, 1, 2)

    def forward():
        with torch.no_grad():
            return conv(x)

    def forward_backward():
        return torch.autograd.grad(conv(leaf), [leaf, conv.weight], grad)

    return forward, forward_backward


def step_functions(method: str, stage: str, t: dict) -> tuple[Callable, Callable]:
    if method == "reference":
        return _core_steps(upstream_dcnv3_core, stage, t)
    if method in ("deformconv", "portable"):
        fwd, fb = _core_steps(dcnv3, stage, t)
        if method == "deformconv":
            return fwd, fb
        return on_portable(fwd), on_portable(fb)
    return _conv_steps(stage, t, channels_last=method == "dw_nhwc")


def _time(fns: dict, min_run_time: float) -> dict:
    """Medians in ms of ``fns``, each warmed up, then timed in interleaved slices."""
    return interleaved_medians({key: warm_timer(fn) for key, fn in fns.items()}, min_run_time)


def measure_core(stage: str, methods, min_run_time: float) -> dict:
    t = core_inputs(stage)
    fns = {}
    for method in methods:
        fwd, fb = step_functions(method, stage, t)
        fns[(method, "forward")] = fwd
        fns[(method, "forward+backward")] = fb
    return _time(fns, min_run_time)


def check_agreement(stage: str) -> float:
    t = core_inputs(stage)
    ours = step_functions("deformconv", stage, t)[0]()
    theirs = step_functions("reference", stage, t)[0]()
    return float((ours - theirs).abs().max())


# --------------------------------------------------------------------------------------------
# The stage stack.


class _Block(nn.Module):
    """InternImage's ``InternImageLayer`` without layer scale and post-norm (InternImage-T)."""

    def __init__(self, channels: int, group: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, eps=1e-6)
        self.dcn = DCNv3(channels=channels, group=group)
        self.norm2 = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels)
        )

    def forward(self, x):
        x = x + self.dcn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(2 * channels, eps=1e-6)

    def forward(self, x):
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def internimage_t_stages() -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, depth in enumerate(DEPTHS):
        _, channels, group = STAGES[str(i + 1)]
        layers += [_Block(channels, group) for _ in range(depth)]
        if i < len(DEPTHS) - 1:
            layers.append(_Downsample(channels))
    torch.manual_seed(0)
    model = nn.Sequential(*layers)
    for name, p in model.named_parameters():  # trained-like offsets and masks, not the init
        if ".offset." in name or ".mask." in name:
            nn.init.normal_(p, std=0.02)
    return model


@contextlib.contextmanager
def _core(fn: Callable) -> Iterator[None]:
    """Run the DCNv3 layers with ``fn`` as their core (upstream's formulation or ours)."""
    saved = dcnv3_layer.dcnv3
    dcnv3_layer.dcnv3 = fn
    try:
        yield
    finally:
        dcnv3_layer.dcnv3 = saved


def measure_stack(min_run_time: float) -> dict:
    model = internimage_t_stages()
    one = torch.randn(1, 56, 56, 64)
    batch = torch.randn(BATCH, 56, 56, 64)

    def inference():
        with torch.no_grad():
            return model(one)

    def training():
        model.zero_grad(set_to_none=True)
        model(batch).square().mean().backward()

    results = {}
    for name, core in (("deformconv", dcnv3), ("reference", upstream_dcnv3_core)):
        with _core(core):
            times = _time({"inference": inference, "training": training}, min_run_time)
        results[(name, "inference")] = times["inference"]
        results[(name, "training")] = times["training"] / BATCH
    return results


# --------------------------------------------------------------------------------------------
# Report.


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uptime unavailable"


def core_tables(stages, results) -> str:
    head = "| operation | " + " | ".join(f"stage {s}: {_describe(s)}" for s in stages)
    lines = [head + " |", "|---|" + "---|" * len(stages)]
    for method in METHODS:
        for direction in ("forward", "forward+backward"):
            if (method, direction) not in results[stages[0]]:
                continue
            cells = [f"{results[s][(method, direction)]:.2f}" for s in stages]
            lines.append(f"| {LABELS[method]} {direction} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios in the same run:", "", lines[0], lines[1]]
    for direction in ("forward", "forward+backward"):
        speedup = [results[s][("reference", direction)] / results[s][("deformconv", direction)]
                   for s in stages]  # fmt: skip
        lines.append(
            f"| reference / deformconv, {direction} | "
            + " | ".join(f"{r:.1f}x" for r in speedup)
            + " |"
        )
        for dw in ("dw_nchw", "dw_nhwc"):
            if (dw, direction) in results[stages[0]]:
                ratio = [results[s][("deformconv", direction)] / results[s][(dw, direction)]
                         for s in stages]  # fmt: skip
                lines.append(
                    f"| deformconv / {LABELS[dw]}, {direction} | "
                    + " | ".join(f"{r:.2f}x" for r in ratio)
                    + " |"
                )
    return "\n".join(lines)


def _describe(stage: str) -> str:
    size, channels, group = STAGES[stage]
    return f"{size}x{size}x{channels} / {group}"


def goals(stages, results) -> str:
    lines = []
    for s in stages:
        r = results[s]
        fwd = r[("reference", "forward")] / r[("deformconv", "forward")]
        fb = r[("reference", "forward+backward")] / r[("deformconv", "forward+backward")]
        dw = r[("deformconv", "forward")] / r[("dw_nchw", "forward")] if (
            ("dw_nchw", "forward") in r
        ) else float("nan")  # fmt: skip
        lines.append(
            f"- stage {s}: forward {fwd:.1f}x faster than the reference (goal 20x: "
            f"{'met' if fwd >= 20 else 'missed'}); forward+backward {fb:.1f}x (goal 10x: "
            f"{'met' if fb >= 10 else 'missed'}); forward {dw:.2f}x the NCHW depthwise conv "
            f"(goal at most 1x: {'met' if dw <= 1 else 'missed'})"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="1,2,3,4", help="comma-separated stages 1-4")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated (reference and deformconv are always timed): "
                        + ", ".join(METHODS))  # fmt: skip
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per figure")
    parser.add_argument("--no-stack", action="store_true", help="skip the stage stack")
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    _settle_allocator()
    stages = [s.strip() for s in args.stages.split(",")]
    chosen = set(args.methods.split(",")) | {"reference", "deformconv"}
    methods = [m for m in METHODS if m in chosen]
    load_before = _uptime()
    start = time.perf_counter()
    results, busy = {}, {}
    for stage in stages:
        difference = check_agreement(stage)
        if difference > 1e-3:
            raise RuntimeError(f"deformconv and the reference disagree on stage {stage}")
        with _Interference() as load:
            results[stage] = measure_core(stage, methods, args.min_run_time)
        busy[stage] = load.foreign / load.wall
        print(f"timed stage {stage} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    stack = None
    if not args.no_stack:
        with _Interference() as load:
            stack = measure_stack(args.min_run_time)
        busy["stack"] = load.foreign / load.wall
        print(f"timed the stack ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python benchmarks/bench_dcnv3.py", *given])
    print(f"`{command}` on {machine()}")
    print()
    print(f"Load before: `{load_before}`; after: `{_uptime()}`.")
    print()
    print(
        f"DCNv3 core, batch {BATCH}, float32, medians in ms (min_run_time {args.min_run_time} s):"
    )
    print()
    print(core_tables(stages, results))
    print()
    print(goals(stages, results))
    if stack is not None:
        print()
        print("InternImage-T stages (after the stem), ms per image:")
        print()
        print("| core | inference, batch 1 | training step, batch 8, per image |")
        print("|---|---|---|")
        for name in ("deformconv", "reference"):
            print(
                f"| {name} | {stack[(name, 'inference')]:.1f} | {stack[(name, 'training')]:.1f} |"
            )
        ratio_i = stack[("reference", "inference")] / stack[("deformconv", "inference")]
        ratio_t = stack[("reference", "training")] / stack[("deformconv", "training")]
        print(f"| reference / deformconv | {ratio_i:.2f}x | {ratio_t:.2f}x |")
    print()
    shares = ", ".join(f"{k} {v:.0%}" for k, v in busy.items())
    print(
        f"CPU time other processes took during the measurements, as a share of one core: {shares}."
    )
    print(f"Total {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
