"""Fast CPU kernel for DCNv3/DCNv4: Numba on all cores, channels-last, no workspace.

A group's channels are contiguous in the channels-last input, so each bilinear corner of a point
is one contiguous run of ``group_channels`` values. The coordinates and bilinear weights of a
(pixel, group, point) are computed once and applied to all of the group's channels in a loop
LLVM vectorises. The forward pass is parallel over output pixels.

The backward pass is parallel over images (or, with fewer images than threads, blocks of
groups of an image). Each task owns the input gradient of its image and groups and walks its
output pixels, groups and points in a fixed order (the forward's, which keeps the pixels it
reads and writes in cache: a third faster on InternImage-T's first stage than walking one group
at a time), so no two tasks write the same element, nothing needs atomics and gradients are
bit-identical from run to run, and for any split into group blocks. A task also owns the offset
and mask gradients of its groups; only when there are fewer (image, group) pairs than threads
are the channels split into runs, whose partial offset and mask gradients are then added in a
fixed order.

Both functions expect validated arguments (see :mod:`deformconv.ops.dcnv3`), float32 or float64,
batch >= 1, any memory layout. ``offset`` and ``mask`` are the same ``offset_mask`` tensor when
``sampling.packed``; the backward then returns its gradient twice.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from deformconv.ops._dcnv3_geometry import Sampling
from deformconv.ops._numba import FASTMATH, FASTMATH_ORDERED, parallel_launch

# Output pixels per parallel task of the forward pass.
_PIXEL_BLOCK = 32
# Channels below which a backward task's run is not split further (one or two SIMD vectors).
_MIN_RUN = 8


class _Geometry(NamedTuple):
    """The integers the kernels read, named (a NamedTuple reaches Numba as a typed tuple)."""

    batch: int
    height: int
    width: int
    out_h: int
    out_w: int
    group: int
    group_channels: int
    points: int
    offset_row: int
    offset_group: int
    mask_row: int
    mask_group: int
    mask_start: int


@njit(inline="always")
def _footing(y, x, height, width, one):
    """The bilinear corners of an inside position ``(y, x)`` (scalars only, so inlining keeps
    the kernels' array arguments provably unaliased).

    Returns ``(r0, r1, c0, c1, hy, ly, hx, lx, top, bottom, left, right)``: the corner rows and
    columns; the fractions (``hy = 1 - ly`` for the top row, ``hx`` for the left column); and
    1 or 0 for whether the top row, bottom row, left and right columns are inside the image. A
    row or column outside is moved onto its neighbour inside and its fraction set to zero, so
    every corner address is valid and the channel loops need no branch: the moved corner reads
    a pixel that its neighbour reads with a non-zero weight.
    """
    zero = one - one
    yf = np.floor(y)
    xf = np.floor(x)
    ly = y - yf
    lx = x - xf
    y0 = np.int64(yf)
    x0 = np.int64(xf)
    top = one if y0 >= 0 else zero
    bottom = one if y0 < height - 1 else zero
    left = one if x0 >= 0 else zero
    right = one if x0 < width - 1 else zero
    r0 = y0 if y0 >= 0 else y0 + 1
    r1 = y0 + 1 if y0 < height - 1 else y0
    c0 = x0 if x0 >= 0 else x0 + 1
    c1 = x0 + 1 if x0 < width - 1 else x0
    return (
        r0,
        r1,
        c0,
        c1,
        (one - ly) * top,
        ly * bottom,
        (one - lx) * left,
        lx * right,
        top,
        bottom,
        left,
        right,
    )


# No reductions here: FASTMATH_ORDERED keeps the bracketing of the corner sums, so each point adds
# once to the output row instead of chaining five dependent additions through it.
@njit(parallel=True, cache=True, fastmath=FASTMATH_ORDERED)
def _forward(x, offset, mask, geo, centre_y, centre_x, tap_x, tap_y, consts, out):
    """out (N * Ho * Wo * C,) from x (N * H * W * C,), all flat and contiguous.

    offset and mask are flat with the strides of ``geo``; centre_y (Ho,) / centre_x (Wo,): the
    window centre of each output row / column; tap_x / tap_y (P,): each point's position
    relative to it; consts: (offset_scale, 1, H, W). All in the dtype of x, so that float32
    stays float32 (Numba promotes arithmetic of float32 and integers to float64).
    """
    height, width, out_w = geo.height, geo.width, geo.out_w
    groups, gc, points = geo.group, geo.group_channels, geo.points
    channels = groups * gc
    # Unsigned channel indices: Numba then skips the negative-index wraparound, which would
    # stop LLVM from vectorising the channel loops.
    n_ch = np.uint64(gc)
    pixels = geo.out_h * out_w
    rows = geo.batch * pixels
    scale, one, height_f, width_f = consts[0], consts[1], consts[2], consts[3]
    zero = one - one
    n_blocks = (rows + _PIXEL_BLOCK - 1) // _PIXEL_BLOCK
    for blk in prange(n_blocks):
        for row in range(blk * _PIXEL_BLOCK, min((blk + 1) * _PIXEL_BLOCK, rows)):
            n = row // pixels
            q = row - n * pixels
            oy = q // out_w
            cy = centre_y[oy]
            cx = centre_x[q - oy * out_w]
            for g in range(groups):
                dst = np.uint64(row * channels + g * gc)
                for c in range(n_ch):
                    out[dst + c] = zero
                base = n * height * width * channels + g * gc
                ob = row * geo.offset_row + g * geo.offset_group
                mb = row * geo.mask_row + g * geo.mask_group + geo.mask_start
                for p in range(points):
                    y = cy + (tap_y[p] + offset[ob + 2 * p + 1]) * scale
                    x_ = cx + (tap_x[p] + offset[ob + 2 * p]) * scale
                    # Reads nothing outside (-1, H) x (-1, W); NaN compares false.
                    if not ((y > -one) & (y < height_f) & (x_ > -one) & (x_ < width_f)):
                        continue
                    r0, r1, c0, c1, hy, ly, hx, lx, _, _, _, _ = _footing(y, x_, height, width, one)
                    m = mask[mb + p]
                    w00 = m * hy * hx
                    w01 = m * hy * lx
                    w10 = m * ly * hx
                    w11 = m * ly * lx
                    s00 = np.uint64(base + (r0 * width + c0) * channels)
                    s01 = np.uint64(base + (r0 * width + c1) * channels)
                    s10 = np.uint64(base + (r1 * width + c0) * channels)
                    s11 = np.uint64(base + (r1 * width + c1) * channels)
                    for c in range(n_ch):
                        out[dst + c] += (w00 * x[s00 + c] + w01 * x[s01 + c]) + (
                            w10 * x[s10 + c] + w11 * x[s11 + c]
                        )


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backward(
    x, offset, mask, grad_out, geo, centre_y, centre_x, tap_x, tap_y, consts, group_block, run,
    offset_part, mask_part, grad_x, grad_offset, grad_mask,
):  # fmt: skip
    """Gradients of :func:`_forward`; grad_x (zeroed) is written by the task owning each element.

    A task is one image, ``group_block`` of its groups and ``run`` of their channels; it walks
    its pixels, groups and points in the forward's order (which keeps the pixels it reads and
    writes in cache). grad_out is flat like out. With ``R`` runs per group, grad_offset and
    grad_mask hold ``R`` partial copies, ``offset_part`` and ``mask_part`` elements apart (R = 1:
    the gradients themselves; for DCNv4 both are the one offset_mask gradient, written at
    disjoint positions and never read).
    """
    height, width, out_w = geo.height, geo.width, geo.out_w
    groups, gc, points = geo.group, geo.group_channels, geo.points
    channels = groups * gc
    pixels = geo.out_h * out_w
    runs = (gc + run - 1) // run
    scale, one, height_f, width_f = consts[0], consts[1], consts[2], consts[3]
    zero = one - one
    blocks = (groups + group_block - 1) // group_block
    for task in prange(geo.batch * blocks * runs):
        n = task // (blocks * runs)
        g0 = ((task // runs) % blocks) * group_block
        r = task % runs
        c0_run = r * run
        length = np.uint64(min(run, gc - c0_run))
        for q in range(pixels):
            row = n * pixels + q
            oy = q // out_w
            cy = centre_y[oy]
            cx = centre_x[q - oy * out_w]
            for g in range(g0, min(g0 + group_block, groups)):
                base = n * height * width * channels + g * gc + c0_run
                gsrc = np.uint64(row * channels + g * gc + c0_run)
                ob = row * geo.offset_row + g * geo.offset_group
                mb = row * geo.mask_row + g * geo.mask_group + geo.mask_start
                for p in range(points):
                    oi = r * offset_part + ob + 2 * p
                    mi = r * mask_part + mb + p
                    y = cy + (tap_y[p] + offset[ob + 2 * p + 1]) * scale
                    x_ = cx + (tap_x[p] + offset[ob + 2 * p]) * scale
                    # Positions in [-1, H) x [-1, W) have gradients (torchvision's rule: on the
                    # edge -1 the value is zero but not its slope); others, NaN included, none.
                    if not ((y >= -one) & (y < height_f) & (x_ >= -one) & (x_ < width_f)):
                        grad_offset[oi] = zero
                        grad_offset[oi + 1] = zero
                        grad_mask[mi] = zero
                        continue
                    r0, r1, c0, c1, hy, ly, hx, lx, top, bottom, left, right = _footing(
                        y, x_, height, width, one
                    )
                    m = mask[mb + p]
                    s00 = np.uint64(base + (r0 * width + c0) * channels)
                    s01 = np.uint64(base + (r0 * width + c1) * channels)
                    s10 = np.uint64(base + (r1 * width + c0) * channels)
                    s11 = np.uint64(base + (r1 * width + c1) * channels)
                    d00 = zero
                    d01 = zero
                    d10 = zero
                    d11 = zero
                    for c in range(length):
                        gv = grad_out[gsrc + c]
                        d00 += gv * x[s00 + c]
                        d01 += gv * x[s01 + c]
                        d10 += gv * x[s10 + c]
                        d11 += gv * x[s11 + c]
                    # One corner per loop: a loop that stores to one run vectorises. A corner
                    # outside the image has weight zero and adds nothing.
                    w = m * hy * hx
                    for c in range(length):
                        grad_x[s00 + c] += w * grad_out[gsrc + c]
                    w = m * hy * lx
                    for c in range(length):
                        grad_x[s01 + c] += w * grad_out[gsrc + c]
                    w = m * ly * hx
                    for c in range(length):
                        grad_x[s10 + c] += w * grad_out[gsrc + c]
                    w = m * ly * lx
                    for c in range(length):
                        grad_x[s11 + c] += w * grad_out[gsrc + c]
                    # The sums of moved corners read a neighbour's pixel: they are zero outside.
                    d00 *= top * left
                    d01 *= top * right
                    d10 *= bottom * left
                    d11 *= bottom * right
                    grad_offset[oi] = scale * m * (hy * (d01 - d00) + ly * (d11 - d10))
                    grad_offset[oi + 1] = scale * m * (hx * (d10 - d00) + lx * (d11 - d01))
                    grad_mask[mi] = hy * hx * d00 + hy * lx * d01 + ly * hx * d10 + ly * lx * d11


@functools.lru_cache(maxsize=64)
def _static(s: Sampling, batch: int, dtype: np.dtype) -> tuple:
    """``(geo, centre_y, centre_x, tap_x, tap_y, consts)``: what a call's kernels read that
    depends only on its shapes; cached (read-only) because a network calls each layer with the
    same shapes again and again."""
    geo = _Geometry(
        batch=batch,
        height=s.height,
        width=s.width,
        out_h=s.out_h,
        out_w=s.out_w,
        group=s.group,
        group_channels=s.group_channels,
        points=s.points,
        offset_row=s.offset_row,
        offset_group=s.offset_group,
        mask_row=s.mask_row,
        mask_group=s.mask_group,
        mask_start=s.mask_start,
    )
    centre_y = np.arange(s.out_h) * s.stride_h + s.origin_y
    centre_x = np.arange(s.out_w) * s.stride_w + s.origin_x
    consts = (s.offset_scale, 1, s.height, s.width)
    arrays = [np.asarray(a, dtype=dtype) for a in (centre_y, centre_x, *s.taps(), consts)]
    for a in arrays:
        a.flags.writeable = False
    return (geo, *arrays)


def _flat(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().view(-1).numpy()


def _prepare(input: Tensor, offset: Tensor, mask: Tensor, s: Sampling):
    x = _flat(input)
    off = _flat(offset)
    # DCNv4 reads its mask from the offset_mask array itself.
    m = off if s.packed else _flat(mask)
    return (x, off, m, *_static(s, input.shape[0], x.dtype))


def forward(input: Tensor, offset: Tensor, mask: Tensor, s: Sampling) -> Tensor:
    """DCNv3/DCNv4 core, output ``(N, Ho, Wo, G * D)``."""
    args = _prepare(input, offset, mask, s)
    out = input.new_empty((input.shape[0], s.out_h, s.out_w, s.channels))
    with parallel_launch():
        _forward(*args, out.view(-1).numpy())
    return out


def _split(s: Sampling, batch: int, threads: int) -> tuple[int, int]:
    """``(group_block, run)``: the groups and channels of one backward task. A task is a whole
    image when there are enough images for the threads; else a block of its groups; and only
    when there are fewer (image, group) pairs than threads are channels split into runs of at
    least ``_MIN_RUN`` (whose offset and mask gradients are then partial sums)."""
    gc = s.group_channels
    if batch >= threads:
        return s.group, gc
    if batch * s.group >= threads:
        return -(-s.group // -(-threads // batch)), gc
    if gc < 2 * _MIN_RUN:
        return 1, gc
    runs = min(-(-threads // (batch * s.group)), gc // _MIN_RUN)
    return 1, -(-gc // runs)


def backward(
    grad_out: Tensor, input: Tensor, offset: Tensor, mask: Tensor, s: Sampling
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients with respect to input, offset and mask (contiguous, their shapes)."""
    x, off, m, *statics = _prepare(input, offset, mask, s)
    with parallel_launch() as threads:
        group_block, run = _split(s, input.shape[0], threads)
        runs = -(-s.group_channels // run)
        grad_input = torch.zeros(input.shape, dtype=input.dtype)
        # DCNv4's padding columns are never written: they start (and stay) zero.
        alloc = torch.zeros if s.packed or runs > 1 else torch.empty
        grad_offset = alloc((runs, *offset.shape), dtype=offset.dtype)
        grad_mask = grad_offset if s.packed else alloc((runs, *mask.shape), dtype=mask.dtype)
        _backward(
            x, off, m, _flat(grad_out), *statics, group_block, run, offset.numel(), mask.numel(),
            grad_input.view(-1).numpy(), grad_offset.view(-1).numpy(), grad_mask.view(-1).numpy(),
        )  # fmt: skip
    grad_offset = _sum_runs(grad_offset)
    grad_mask = grad_offset if s.packed else _sum_runs(grad_mask)
    return grad_input, grad_offset, grad_mask


def _sum_runs(parts: Tensor) -> Tensor:
    """The sum of the runs' partial gradients, added in run order."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total
