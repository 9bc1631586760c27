"""The DCNv3/DCNv4 sections of benchmarks/gpu_check.py (run through it, not on their own).

1. Parity: the forward and the input, offset and mask gradients of ``deformconv.ops.dcnv3`` and
   ``dcnv4`` with the Triton kernel against the portable kernel on the same device, and against
   the upstream ``grid_sample`` formulation (InternImage's ``dcnv3_core_pytorch``, written out
   below) for everything but the offset gradient: float64, float32,
   float16/bfloat16 (compared with float32 references on the same rounded inputs),
   remove_center, offset scales other than 1, stride 2, dilation 2, a non-square kernel with
   unequal paddings, group widths that are not multiples of 16 (5, 24, 40), batch 0, an input
   that is a permuted NCHW tensor with strided offsets and masks, non-finite offsets, DCNv4's
   packed ``offset_mask`` with and without padding columns (junk values that must be ignored and
   get zero gradient), the deterministic backward (bit-identical between two runs; for DCNv3 in
   chunks of a small workspace), launches split over images (the axis-0 limit lowered so that 64
   images of 28x28x128 with 8 groups need 13 launches; to pass CUDA's real limit of 2**31 - 1
   programs, that shape would need over 10 million images), the int64 indexing variant (its
   threshold lowered), and ``cuda:1`` when there are two GPUs.
2. Benchmarks: the DCNv3 core on InternImage-T's four stages at batch 8 (56x56x64 with 4 groups,
   28x28x128 / 8, 14x14x256 / 16, 7x7x512 / 32; 3x3, stride 1, padding 1, group width 16),
   float32 and float16, forward and forward+backward (gradients of input, offsets and mask) of
   the Triton kernel, the portable kernel, the ``grid_sample`` formulation and a depthwise 3x3
   ``nn.Conv2d`` of the same shape (NCHW, gradients of input, weight and bias), with ratios to
   the depthwise convolution, the peak memory of one forward+backward, and the forward's
   agreement with the ``grid_sample`` formulation.

Errors are max |got - reference| / max |reference| per tensor; the tolerances are
``_gpu_check_common.TOLERANCE``'s. The offset gradient is compared with the portable kernel only:
it jumps where a sampling position crosses a pixel border, and the ``grid_sample`` formulation
computes positions in normalised coordinates, with other float32 roundings. For the same reason
the offset scale other than 1 runs in float64 on a GPU, where Triton may fuse the scaling into a
fused multiply-add that PyTorch's portable kernel does not.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from _gpu_check_common import (
    DTYPES,
    TOLERANCE,
    add_ratios,
    bench_tables,
    describe,
    leaf,
    no_fallback,
    reference_copies,
    rel_error,
    run_benchmarks,
    run_under_test,
    start_check,
    time_steps,
    verdict,
)
from deformconv.ops import _launch, active_kernel, dcnv3, dcnv4, use_kernel
from deformconv.ops._dcnv3_geometry import Sampling, make_sampling

REFERENCES = ("portable", "grid_sample")
IM2COL_STEP = 256  # DCNv4Function's argument; accepted and unused by deformconv


@dataclass(frozen=True)
class DcnvConfig:
    """One DCNv3 or DCNv4 configuration; pairs are (height, width), ``pad`` is ``(pad_h,
    pad_w)`` as the operators take them (DCNv3 pads H by ``pad_w``, see ops/dcnv3.py)."""

    name: str
    op: str = "dcnv3"  # or "dcnv4": offsets and mask packed into one offset_mask
    batch: int = 2
    size: tuple[int, int] = (9, 10)
    group: int = 2
    group_channels: int = 16
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    offset_scale: float = 1.0
    remove_center: bool = False
    dtype: str = "float32"
    layout: str = "contiguous"  # or strided: input a permuted NCHW tensor, offsets transposed
    padded: bool = True  # DCNv4: offset_mask width rounded up to a multiple of 8, as upstream
    non_finite: bool = False
    deterministic: bool = False
    budget: int | None = None
    max_grid_x: int | None = None  # lowered launch limit: the images split over launches
    index_limit: int | None = None  # lowered int32 threshold: the int64 variant runs
    device_index: int | None = None

    @property
    def packed(self) -> bool:
        return self.op == "dcnv4"

    @property
    def points(self) -> int:
        return self.kernel[0] * self.kernel[1] - int(self.remove_center)

    @property
    def offset_width(self) -> int:
        if not self.packed:
            return 2 * self.group * self.points
        need = 3 * self.group * self.points
        return -(-need // 8) * 8 if self.padded else need

    def sampling(self) -> Sampling:
        return make_sampling(
            *self.size, self.kernel, self.stride, self.pad if self.packed else self.pad[::-1],
            self.dilation, self.group, self.group_channels, self.offset_scale,
            self.remove_center, self.packed, self.offset_width,
        )  # fmt: skip

    def args(self) -> tuple:
        """``kernel_h`` to ``offset_scale``, in the operators' order."""
        return (
            *self.kernel, *self.stride, *self.pad, *self.dilation, self.group,
            self.group_channels, self.offset_scale,
        )  # fmt: skip


def parity_configs(smoke: bool) -> list[DcnvConfig]:
    if smoke:
        # One image of 4x5 pixels (the interpreter runs each program in Python), two groups.
        base = {"batch": 1, "size": (4, 5), "group_channels": 4}
        return [
            DcnvConfig("dcnv3 base", **base),
            DcnvConfig(
                "dcnv3 float64, remove_center, offset_scale 1.75",
                **base,
                dtype="float64",
                remove_center=True,
                offset_scale=1.75,
            ),
            DcnvConfig(
                "dcnv3 stride 2, dilation 2, 3x2 kernel",
                **base,
                stride=(2, 2),
                dilation=(2, 2),
                kernel=(3, 2),
                pad=(1, 2),
            ),
            DcnvConfig("dcnv3 group width 5", **{**base, "group_channels": 5}),
            DcnvConfig(
                "dcnv3 strided input (NCHW view), offset and mask", **base, layout="strided"
            ),
            DcnvConfig("dcnv3 float16", **base, dtype="float16"),
            DcnvConfig("dcnv3 bfloat16", **base, dtype="bfloat16"),
            DcnvConfig("dcnv3 batch 0", **{**base, "batch": 0}),
            DcnvConfig("dcnv3 deterministic backward", **base, deterministic=True),
            DcnvConfig("dcnv3 split launches", **{**base, "batch": 2}, max_grid_x=2),
            DcnvConfig("dcnv3 int64 indexing", **base, index_limit=16),
            DcnvConfig("dcnv4 padding columns", **base, op="dcnv4"),
            DcnvConfig("dcnv4 float16", **base, op="dcnv4", dtype="float16"),
            DcnvConfig("dcnv3 cuda:1", **base, device_index=1),
        ]
    stage2 = {"batch": 64, "size": (28, 28), "group": 8}
    chunks = {"batch": 8, "deterministic": True, "budget": 2**16}
    return [
        DcnvConfig("dcnv3 base"),
        DcnvConfig("dcnv3 float64", dtype="float64"),
        DcnvConfig("dcnv3 float16", dtype="float16"),
        DcnvConfig("dcnv3 bfloat16", dtype="bfloat16"),
        DcnvConfig("dcnv3 remove_center", remove_center=True),
        DcnvConfig("dcnv3 offset_scale 1.75 (float64)", offset_scale=1.75, dtype="float64"),
        DcnvConfig("dcnv3 stride 2", stride=(2, 2)),
        DcnvConfig("dcnv3 dilation 2", dilation=(2, 2), pad=(2, 2)),
        DcnvConfig("dcnv3 3x5 kernel, pad_h 2, pad_w 1", kernel=(3, 5), pad=(2, 1)),
        DcnvConfig("dcnv3 group width 5, 3 groups", group=3, group_channels=5),
        DcnvConfig("dcnv3 group width 40 (two channel blocks)", group_channels=40),
        DcnvConfig("dcnv3 float16, group width 24", dtype="float16", group_channels=24),
        DcnvConfig("dcnv3 batch 0", batch=0),
        DcnvConfig("dcnv3 strided input (NCHW view), offset and mask", layout="strided"),
        DcnvConfig("dcnv3 non-finite offsets", non_finite=True),
        DcnvConfig("dcnv3 deterministic backward, small workspace (chunks)", **chunks),
        DcnvConfig("dcnv3 split launches: batch 64, 28x28x128 / 8", **stage2, max_grid_x=1000),
        DcnvConfig("dcnv3 int64 indexing", index_limit=16),
        DcnvConfig("dcnv4 padding columns", op="dcnv4"),
        DcnvConfig("dcnv4 float16", op="dcnv4", dtype="float16"),
        DcnvConfig(
            "dcnv4 float64, remove_center, stride 2, unpadded",
            op="dcnv4",
            dtype="float64",
            remove_center=True,
            stride=(2, 2),
            padded=False,
        ),
        DcnvConfig("dcnv4 2x3 kernel, pad_h 0, pad_w 1", op="dcnv4", kernel=(2, 3), pad=(0, 1)),
        DcnvConfig("dcnv4 deterministic backward", op="dcnv4", deterministic=True),
        DcnvConfig("dcnv4 batch 0", op="dcnv4", batch=0),
        DcnvConfig("dcnv3 cuda:1 (non-default device)", device_index=1),
    ]


# ---------------------------------------------------------------------------------------------
# Implementations: each is called as ``core(cfg, input, offset, mask)``, with ``mask`` None and
# ``offset`` the packed offset_mask for DCNv4.


class _TritonOnCpu(torch.autograd.Function):
    """The Triton kernels called directly (smoke runs on CPU: the dispatcher maps CPU to Numba)."""

    @staticmethod
    def forward(ctx, input, offset, mask, s):  # type: ignore[override]
        from deformconv.ops import _dcnv3_triton

        ctx.save_for_backward(input, offset, mask)
        ctx.s = s
        if input.shape[0] == 0:
            return input.new_zeros((0, s.out_h, s.out_w, s.channels))
        return _dcnv3_triton.forward(input, offset, offset if mask is None else mask, s)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        from deformconv.ops import _dcnv3_triton

        input, offset, mask = ctx.saved_tensors
        if input.shape[0] == 0:
            zeros = [None if t is None else torch.zeros_like(t) for t in (input, offset, mask)]
            return (*zeros, None)
        gi, go, gm = _dcnv3_triton.backward(
            grad.contiguous(), input, offset, offset if mask is None else mask, ctx.s
        )
        return gi, go, None if mask is None else gm, None


def _triton_cpu(cfg: DcnvConfig, input: Tensor, offset: Tensor, mask: Tensor | None) -> Tensor:
    return _TritonOnCpu.apply(input, offset, mask, cfg.sampling())


def _operator(cfg: DcnvConfig, input: Tensor, offset: Tensor, mask: Tensor | None) -> Tensor:
    if cfg.packed:
        return dcnv4(input, offset, *cfg.args(), IM2COL_STEP, cfg.remove_center)
    return dcnv3(input, offset, mask, *cfg.args(), cfg.remove_center)


def _unpack(cfg: DcnvConfig, offset_mask: Tensor) -> tuple[Tensor, Tensor]:
    """DCNv4's packed columns as offsets ``(N, Ho, Wo, G, 2P)`` and mask ``(N, Ho, Wo, G, P)``."""
    p = cfg.points
    groups = offset_mask[..., : 3 * cfg.group * p].unflatten(-1, (cfg.group, 3 * p))
    return groups[..., : 2 * p], groups[..., 2 * p :]


def _grid_sample(cfg: DcnvConfig, input: Tensor, offset: Tensor, mask: Tensor | None) -> Tensor:
    """The core as InternImage's ``dcnv3_core_pytorch`` (classification/ops_dcnv3/functions/
    dcnv3_func.py) computes it, the only option of users without the CUDA extension: zero-pad the
    channels-last input, put each output pixel's reference point at the centre of its window,
    add the dilated kernel points (x-outer, y-inner, less the centre for ``remove_center``) and
    the offsets, both scaled by ``offset_scale``, normalise to ``grid_sample``'s [-1, 1] frame
    (``align_corners=False``, pixel ``k`` covering ``[k, k + 1)``), sample each group's channels
    bilinearly with zeros outside, and sum the samples weighted by the mask.

    Written from those semantics alone (no deformconv code, no other benchmark script), so that
    it is a reference independent of the kernels. Upstream pads H by ``pad_w`` and W by
    ``pad_h``; DCNv4's CUDA kernel pads H by ``pad_h`` (tests/dcnv_reference.py)."""
    if cfg.packed:
        offset, mask = (part.flatten(3) for part in _unpack(cfg, offset))
        pad_rows, pad_cols = cfg.pad
    else:
        pad_cols, pad_rows = cfg.pad
    assert mask is not None
    (kh, kw), (sh, sw), (dh, dw) = cfg.kernel, cfg.stride, cfg.dilation
    n, out_h, out_w = offset.shape[:3]
    g, d, p = cfg.group, cfg.group_channels, cfg.points
    padded = F.pad(input, (0, 0, pad_cols, pad_cols, pad_rows, pad_rows))
    rows, cols = padded.shape[1:3]
    half_h, half_w = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    points = [
        (i * dw - half_w, j * dh - half_h)
        for i in range(kw)
        for j in range(kh)
        if not (cfg.remove_center and (i, j) == (kw // 2, kh // 2))
    ]
    opts = {"dtype": input.dtype, "device": input.device}
    tap_x, tap_y = torch.tensor(points, **opts).unbind(-1)
    centre_y = torch.arange(out_h, **opts) * sh + half_h + 0.5
    centre_x = torch.arange(out_w, **opts) * sw + half_w + 0.5
    shifts = offset.reshape(n, out_h, out_w, g, p, 2)
    x = centre_x.view(1, 1, -1, 1, 1) + (tap_x + shifts[..., 0]) * cfg.offset_scale
    y = centre_y.view(1, -1, 1, 1, 1) + (tap_y + shifts[..., 1]) * cfg.offset_scale
    grid = torch.stack((x / cols * 2 - 1, y / rows * 2 - 1), dim=-1)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * g, out_h * out_w, p, 2)
    planes = (
        padded.reshape(n, rows, cols, g, d).permute(0, 3, 4, 1, 2).reshape(n * g, d, rows, cols)
    )
    samples = F.grid_sample(
        planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    weights = mask.reshape(n, out_h * out_w, g, p).permute(0, 2, 1, 3).reshape(n * g, 1, -1, p)
    out = (samples * weights).sum(-1).reshape(n, g * d, out_h, out_w)
    return out.permute(0, 2, 3, 1)


Core = Callable[[DcnvConfig, Tensor, Tensor, "Tensor | None"], Tensor]


@contextlib.contextmanager
def implementation(name: str, device: torch.device) -> Iterator[Core]:
    """The DCNv3/DCNv4 core of ``name`` on ``device``, and the kernel choice it needs held for
    forward and backward."""
    if name == "grid_sample":
        yield _grid_sample
    elif name == "triton" and device.type != "cuda":
        yield _triton_cpu
    else:
        with use_kernel(name, device.type):
            yield _operator


def _parts(cfg: DcnvConfig, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """The gradients by name; DCNv4's offset_mask gradient split into offset, mask and padding
    columns."""
    if not cfg.packed:
        return grads
    om = grads.pop("offset_mask")
    grads["offset"], grads["mask"] = _unpack(cfg, om)
    need = 3 * cfg.group * cfg.points
    if om.shape[-1] > need:
        grads["padding"] = om[..., need:]
    return grads


def run_impl(
    name: str, t: dict[str, Tensor], cfg: DcnvConfig, upstream: Tensor, device: torch.device
) -> tuple[Tensor, dict[str, Tensor]]:
    """Output and gradients of implementation ``name`` on ``t``'s tensors."""
    leaves = {k: leaf(v.detach()) for k, v in t.items()}
    offset = leaves["offset_mask"] if cfg.packed else leaves["offset"]
    with implementation(name, device) as core, no_fallback():
        out = core(cfg, leaves["input"], offset, leaves.get("mask"))
        grads = torch.autograd.grad(out, list(leaves.values()), upstream.to(out.dtype))
        replaced = device.type == "cuda" and active_kernel("cuda", "dcnv3") != "triton"
        if name == "triton" and replaced:
            raise RuntimeError("the Triton kernel was replaced by the portable kernel")
    return out.detach(), _parts(cfg, dict(zip(leaves, grads, strict=True)))


# ---------------------------------------------------------------------------------------------
# Parity.


def make_tensors(cfg: DcnvConfig, device: torch.device) -> tuple[dict[str, Tensor], Tensor]:
    """Input, offsets (``randn * 2``), mask (a softmax over each group's points, as InternImage's
    layer) or DCNv4's offset_mask with junk (``randn * 100``) in its padding columns, and an
    upstream gradient."""
    gen = torch.Generator().manual_seed(0)
    s = cfg.sampling()
    lead = (cfg.batch, s.out_h, s.out_w)
    g, p = cfg.group, cfg.points

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    offset = rand(*lead, g, p, 2, scale=2.0)
    mask = torch.softmax(rand(*lead, g, p), dim=-1)
    if cfg.non_finite and cfg.batch:
        offset[0, 0, 0, 0, 0, 0] = float("nan")
        offset[-1, -1, -1, -1, -1, 1] = float("inf")
    t = {"input": rand(cfg.batch, *cfg.size, s.channels)}
    if cfg.packed:
        junk = rand(*lead, s.offset_width - 3 * g * p, scale=100.0)
        body = torch.cat((offset.flatten(-2), mask), dim=-1).flatten(3)
        t["offset_mask"] = torch.cat((body, junk), dim=-1)
    else:
        t.update(offset=offset.flatten(3), mask=mask.flatten(3))
    upstream = rand(*lead, s.channels)
    t = {k: v.to(device, DTYPES[cfg.dtype]) for k, v in t.items()}
    if cfg.layout == "strided":
        t["input"] = t["input"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
        for key in ("offset", "mask", "offset_mask"):
            if key in t:
                t[key] = t[key].transpose(1, 2).contiguous().transpose(1, 2)
    return t, upstream.to(device, DTYPES[cfg.dtype])


@contextlib.contextmanager
def _recorded_launches() -> Iterator[list[tuple[str, tuple[int, ...], bool]]]:
    """``(kernel, grid, INDEX_64)`` of every Triton launch inside the block."""
    seen: list[tuple[str, tuple[int, ...], bool]] = []
    real = _launch.launch

    def record(kernel, grid, *args, **meta):
        name = getattr(getattr(kernel, "fn", kernel), "__name__", "kernel")
        seen.append((name, tuple(grid), bool(meta.get("INDEX_64"))))
        return real(kernel, grid, *args, **meta)

    _launch.launch = record
    try:
        yield seen
    finally:
        _launch.launch = real


def _launch_checks(cfg: DcnvConfig, seen: list, notes: list[str], errors: dict) -> None:
    """What the split-launch and int64 configurations must show in their launches."""
    if cfg.max_grid_x is not None:
        forward = sum(name == "forward_kernel" for name, _, _ in seen)
        widest = max((grid[0] for _, grid, _ in seen), default=0)
        notes.append(f"forward in {forward} launches of at most {widest} programs")
        if forward < 2 or widest > cfg.max_grid_x:
            errors.setdefault("launches", {})["split"] = float("inf")
    if cfg.index_limit is not None:
        wide = sum(index_64 for _, _, index_64 in seen)
        notes.append(f"int64 indexing in {wide} of {len(seen)} launches")
        if not seen or wide < len(seen):
            errors.setdefault("launches", {})["int64"] = float("inf")


def check_config(cfg: DcnvConfig, base_device: torch.device) -> dict:
    result, device = start_check(cfg, base_device)
    if device is None:
        return result
    errors: dict[str, dict[str, float]] = {}
    t, upstream = make_tensors(cfg, device)
    ref_t, ref_up = reference_copies(t, upstream, cfg.dtype)
    with _recorded_launches() as seen:
        out, grads = run_under_test(
            lambda: run_impl("triton", t, cfg, upstream, device), cfg, device, result, errors
        )
    _launch_checks(cfg, seen, result["notes"], errors)
    for ref_name in REFERENCES:
        if ref_name == "grid_sample" and (cfg.batch == 0 or cfg.non_finite):
            why = "batch 0" if cfg.batch == 0 else "non-finite offsets"
            result["notes"].append(f"not compared with grid_sample: {why}")
            continue
        ref_out, ref_grads = run_impl(ref_name, ref_t, cfg, ref_up, device)
        keys = [k for k in grads if ref_name == "portable" or k != "offset"]
        found = {"output": rel_error(out, ref_out)}
        found.update({k: rel_error(grads[k], ref_grads[k]) for k in keys})
        errors[f"vs {ref_name}"] = found
    return verdict(result, errors, TOLERANCE[cfg.dtype])


# ---------------------------------------------------------------------------------------------
# Benchmarks.

# InternImage-T at 224x224 (docs/dcnv3-dcnv4.md, benchmarks/bench_dcnv3.py): per stage the
# size, channels and groups; group width 16, batch 8.
STAGES = ((56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32))
BATCH = 8
METHODS = {
    "depthwise": "depthwise 3x3 `nn.Conv2d` (NCHW)",
    "grid_sample": "upstream `grid_sample` formulation",
    "portable": "deformconv DCNv3 portable kernel",
    "triton": "deformconv DCNv3 Triton kernel",
}


def bench_configs(smoke: bool) -> list[DcnvConfig]:
    if smoke:
        return [DcnvConfig("tiny: 1x5x5x8 / 2", batch=1, size=(5, 5), group_channels=4)]
    return [
        DcnvConfig(
            f"stage {i}: {BATCH}x{size}x{size}x{channels} / {group}",
            batch=BATCH,
            size=(size, size),
            group=group,
            group_channels=channels // group,
        )
        for i, (size, channels, group) in enumerate(STAGES, 1)
    ]


def _steps(method: str, cfg: DcnvConfig, t: dict[str, Tensor], core: Core | None):
    """Forward and forward+backward closures of ``core`` (the depthwise convolution when
    ``None``)."""
    if core is None:
        channels = t["input"].shape[-1]
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        conv = conv.to(t["input"].device, t["input"].dtype)
        x = t["input"].permute(0, 3, 1, 2).contiguous()
        x_leaf, grad = leaf(x), t["grad"].permute(0, 3, 1, 2).contiguous()
        params = [x_leaf, *conv.parameters()]

        def call_conv() -> Tensor:
            return conv(x)

        def forward_backward_conv():
            return torch.autograd.grad(conv(x_leaf), params, grad)

        return _no_grad(call_conv), forward_backward_conv
    leaves = [leaf(t[k]) for k in ("input", "offset", "mask")]

    def call() -> Tensor:
        return core(cfg, t["input"], t["offset"], t["mask"])

    def forward_backward():
        return torch.autograd.grad(core(cfg, *leaves), leaves, t["grad"])

    return _no_grad(call), forward_backward


def _no_grad(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    def forward() -> Tensor:
        with torch.no_grad():
            return fn()

    return forward


def _agreement(cfg: DcnvConfig, t: dict, forward: Callable[[], Tensor]) -> float:
    """The forward's error against the ``grid_sample`` formulation in float32 on the same
    inputs (computed once per shape and dtype)."""
    if "reference" not in t:
        x, offset, mask = (t[k].float() for k in ("input", "offset", "mask"))
        with torch.no_grad():
            t["reference"] = _grid_sample(cfg, x, offset, mask)
    return rel_error(forward(), t["reference"])


def benchmark_section(
    device: torch.device,
    smoke: bool,
    deadline: float,
    min_run_time: float,
    rows: list,
    save: Callable[[], None],
) -> list[dict]:
    """Time every method on every stage, appending to ``rows`` (and saving) as each ends."""
    configs = {cfg.name: cfg for cfg in bench_configs(smoke)}

    def tensors(cfg: DcnvConfig, dtype: str) -> Callable[[], dict]:
        def make() -> dict:
            t, upstream = make_tensors(dataclasses.replace(cfg, dtype=dtype), device)
            return {**t, "grad": upstream}

        return make

    def measure(method: str, t: dict, row: dict) -> None:
        cfg = configs[row["shape"]]
        depthwise = method == "depthwise"
        with (
            contextlib.nullcontext() if depthwise else implementation(method, device) as core,
            no_fallback(),
        ):
            forward, forward_backward = _steps(method, cfg, t, core)
            time_steps(row, forward, forward_backward, device, min_run_time)
            if method in ("portable", "triton"):
                try:
                    row["forward_error_vs_grid_sample"] = _agreement(cfg, t, forward)
                except Exception as exc:  # the timings stand without it
                    row["agreement_error"] = describe(exc)

    plan = [
        (dtype, cfg.name, tensors(cfg, dtype))
        for dtype in ("float32", "float16")
        for cfg in configs.values()
    ]
    run_benchmarks("dcnv bench", plan, METHODS, measure, deadline, rows, save)
    add_ratios(rows, "depthwise")
    return rows


def bench_report(rows: list[dict]) -> str:
    """The benchmark tables and the forward's agreement with the ``grid_sample`` formulation."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    lines = [
        "\nDCNv3 core on InternImage-T's stages (batch x height x width x channels / groups), 3x3,"
        " stride 1, padding 1",
        bench_tables(rows, METHODS, "depthwise", "the depthwise 3x3 convolution"),
        "\nForward against the `grid_sample` formulation (float32, same inputs): max |difference|"
        " / max |reference|",
        "| kernel, dtype | " + " | ".join(shapes) + " |",
        "|---" * (len(shapes) + 1) + "|",
    ]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for method in ("portable", "triton"):
            pick = {r["shape"]: r for r in rows if r["dtype"] == dtype and r["method"] == method}
            cells = [
                f"{pick[s]['forward_error_vs_grid_sample']:.1e}"
                if "forward_error_vs_grid_sample" in pick.get(s, {})
                else "n/a"
                for s in shapes
            ]
            lines.append(f"| {method}, {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
