"""Bilinear sampling on the CPU: the footing of a sampling position, and the column kernels of
the unfused path (whose matrix multiplies run in oneDNN/BLAS).

The unfused path samples a tile of output pixels into columns (``(N, K * C)``, see
:mod:`deformconv.ops._cpu_layout`), then leaves the contraction with the weight to a BLAS
matrix multiply; it is the faster path where the weight is too large to stay in cache beside a
tile (wide layers). Its backward pass has three kernels per tile: :func:`resample_backward`
recomputes the columns (for the weight gradient) and adds the offset and mask gradients,
:func:`scatter_input_grad` adds the column gradients into the input gradient, each parallel task
owning a slice of channels of an image, so no two tasks write the same element and every sum
runs in a fixed order.

The parallel kernels index their array arguments directly and create no views of them inside
``prange`` loops: Numba then proves that the arguments do not alias and marks them ``noalias``,
which LLVM needs to vectorise the channel loops without runtime checks. Rows are output pixels
flattened over (image, pixel); ``n0`` is the first row of a tile.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from deformconv.ops._numba import FASTMATH

# Pixels per parallel task of the per-pixel passes.
PIXEL_BLOCK = 64


@njit(inline="always")
def footing(h, w, geo, one):
    """Bilinear footing of the sampling position ``(h, w)`` (scalars only, so inlining keeps the
    kernels' arguments provably unaliased; no branch, so loops over pixels vectorise).

    Returns ``(corner, reads, lh, lw)``: the flat padded pixel of the top-left corner, or -1 when
    the position lies outside ``[-1, H) x [-1, W)`` (NaN and infinity included); 1 when it lies
    in ``(-1, H) x (-1, W)``, the only positions that read the input (on the edge ``h == -1`` or
    ``w == -1`` a tap reads zero yet has an offset gradient, as in torchvision), else 0; and the
    fractional row and column (zero outside). ``reads`` is an integer, not a bool: Numba's alias
    analysis counts a bool taken from a tuple as a possible alias of an array, which would cost
    the calling kernel its ``noalias`` arguments.
    """
    zero = one - one
    # float32 limits (exact for any image size), so float32 positions compare without widening.
    height = np.float32(geo.height)
    width = np.float32(geo.width)
    valid = (h >= -one) & (h < height) & (w >= -one) & (w < width)
    hs = h if valid else zero
    ws = w if valid else zero
    row = np.floor(hs)
    col = np.floor(ws)
    corner = (np.int64(row) + 1) * geo.padded_width + np.int64(col) + 1
    reads = np.int64(valid & (h > -one) & (w > -one))
    return corner if valid else -1, reads, hs - row, ws - col


@njit(inline="always")
def kernel_position(tap, geo):
    """``(row, column)`` in the kernel of tap ``tap`` (offset group * K + kernel tap)."""
    k = tap % geo.taps
    i = k // geo.kernel_w
    return i, k - i * geo.kernel_w


@njit(inline="always")
def tap_footing(offset, base_y, base_x, geo, one, b, p, tap, i, j):
    """:func:`footing` of tap ``tap`` at kernel position ``(i, j)`` (see
    :func:`kernel_position`, computed once outside loops over pixels) of output pixel ``p`` of
    image ``b``: its regular position plus its offset."""
    h = base_y[i, p] + offset[b, 2 * tap, p]
    w = base_x[j, p] + offset[b, 2 * tap + 1, p]
    return footing(h, w, geo, one)


@njit(inline="always")
def corner_weights(m, lh, lw, one):
    """Modulated bilinear weights ``(top_left, top_right, bottom_left, bottom_right)``."""
    hh = one - lh
    hw = one - lw
    return m * hh * hw, m * hh * lw, m * lh * hw, m * lh * lw


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def sample_columns(
    x, offset, mask, base_y, base_x, geo, one, run_first, run_length, run_column, run_group, n0,
    cols,
):  # fmt: skip
    """Bilinearly sampled, modulated columns of rows ``n0 .. n0 + N``.

    x: (B, (H + 2) * (W + 2) * C) padded channels-last input; offset: (B, 2 * G * K, P); mask:
    (B, G * K, P), or (1, 1, P) ones; base_y: (kh, P) and base_x: (kw, P), positions before
    offsets; one: 1 in the dtype of x; run_*: the channel runs (:class:`~deformconv.ops._cpu_layout.Runs`); cols:
    (N, K * C), column ``run_column[q] + k * group_channels + c`` holding channel
    ``run_first[q] + c`` of tap ``k``.
    """
    n_ch = np.uint64(geo.channels)
    row_step = np.uint64(geo.padded_width * geo.channels)
    per_mask_image = mask.shape[0] > 1
    per_mask_tap = mask.shape[1] > 1
    n_rows = cols.shape[0]
    n_blocks = (n_rows + PIXEL_BLOCK - 1) // PIXEL_BLOCK
    for blk in prange(n_blocks):
        for row in range(blk * PIXEL_BLOCK, min((blk + 1) * PIXEL_BLOCK, n_rows)):
            b = (n0 + row) // geo.pixels
            p = n0 + row - b * geo.pixels
            for q in range(run_first.shape[0]):
                first = np.uint64(run_first[q])
                length = np.uint64(run_length[q])
                for k in range(geo.taps):
                    tap = run_group[q] * geo.taps + k
                    i, j = kernel_position(tap, geo)
                    corner, reads, lh, lw = tap_footing(
                        offset, base_y, base_x, geo, one, b, p, tap, i, j
                    )
                    dst = np.uint64(run_column[q] + k * geo.group_channels)
                    if reads > 0:
                        m = mask[b if per_mask_image else 0, tap if per_mask_tap else 0, p]
                        w00, w01, w10, w11 = corner_weights(m, lh, lw, one)
                        s00 = np.uint64(corner) * n_ch + first
                        for c in range(length):
                            cols[row, dst + c] = (
                                w00 * x[b, s00 + c]
                                + w01 * x[b, s00 + n_ch + c]
                                + w10 * x[b, s00 + row_step + c]
                                + w11 * x[b, s00 + row_step + n_ch + c]
                            )
                    else:
                        for c in range(length):
                            cols[row, dst + c] = 0


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def resample_backward(
    x, offset, mask, base_y, base_x, geo, one, run_first, run_length, run_column, run_group, n0,
    grad_cols, modulated, cols, grad_offset, grad_mask, plan_corner, plan_w00, plan_w01,
    plan_w10, plan_w11,
):  # fmt: skip
    """Resample the columns of a tile, add its offset and mask gradients, plan the scatter.

    Arguments as in :func:`sample_columns`, plus grad_cols (N, K * C), the gradient of the
    columns. Writes cols; adds to grad_offset (B, 2 * G * K, P) and, when ``modulated``,
    grad_mask (B, G * K, P), each run of channels its share (the gradients are linear in the
    per-run sums, and the runs add up in a fixed order); writes for :func:`scatter_input_grad`
    plan_corner (N, G * K), the top-left corner of each tap that reads the input or -1, and
    plan_w00 .. plan_w11 (N, G * K), its modulated bilinear weights.
    """
    zero = one - one
    n_ch = np.uint64(geo.channels)
    row_step = np.uint64(geo.padded_width * geo.channels)
    per_mask_image = mask.shape[0] > 1
    per_mask_tap = mask.shape[1] > 1
    n_rows = cols.shape[0]
    n_blocks = (n_rows + PIXEL_BLOCK - 1) // PIXEL_BLOCK
    for blk in prange(n_blocks):
        for row in range(blk * PIXEL_BLOCK, min((blk + 1) * PIXEL_BLOCK, n_rows)):
            b = (n0 + row) // geo.pixels
            p = n0 + row - b * geo.pixels
            for q in range(run_first.shape[0]):
                first = np.uint64(run_first[q])
                length = np.uint64(run_length[q])
                for k in range(geo.taps):
                    tap = run_group[q] * geo.taps + k
                    i, j = kernel_position(tap, geo)
                    corner, reads, lh, lw = tap_footing(
                        offset, base_y, base_x, geo, one, b, p, tap, i, j
                    )
                    dst = np.uint64(run_column[q] + k * geo.group_channels)
                    m = mask[b if per_mask_image else 0, tap if per_mask_tap else 0, p]
                    w00, w01, w10, w11 = corner_weights(m, lh, lw, one)
                    plan_corner[row, tap] = corner if reads > 0 else -1
                    plan_w00[row, tap] = w00
                    plan_w01[row, tap] = w01
                    plan_w10[row, tap] = w10
                    plan_w11[row, tap] = w11
                    if corner < 0:
                        for c in range(length):
                            cols[row, dst + c] = 0
                        continue
                    # d00 .. d11: the column gradient dotted with each corner's channels.
                    d00 = zero
                    d01 = zero
                    d10 = zero
                    d11 = zero
                    s00 = np.uint64(corner) * n_ch + first
                    for c in range(length):
                        v00 = x[b, s00 + c]
                        v01 = x[b, s00 + n_ch + c]
                        v10 = x[b, s00 + row_step + c]
                        v11 = x[b, s00 + row_step + n_ch + c]
                        gc = grad_cols[row, dst + c]
                        d00 += gc * v00
                        d01 += gc * v01
                        d10 += gc * v10
                        d11 += gc * v11
                        value = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
                        cols[row, dst + c] = value if reads > 0 else zero
                    hh = one - lh
                    hw = one - lw
                    grad_offset[b, 2 * tap, p] += m * (lw * (d11 - d01) + hw * (d10 - d00))
                    grad_offset[b, 2 * tap + 1, p] += m * (lh * (d11 - d10) + hh * (d01 - d00))
                    if modulated & (reads > 0):
                        grad_mask[b, tap, p] += (
                            hh * hw * d00 + hh * lw * d01 + lh * hw * d10 + lh * lw * d11
                        )


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def scatter_input_grad(
    grad_cols, plan_corner, plan_w00, plan_w01, plan_w10, plan_w11, geo, chunk_first,
    chunk_length, chunk_column, chunk_group, n0, grad_x,
):  # fmt: skip
    """Add the column gradients of a tile into the padded channels-last input gradient.

    plan_* come from :func:`resample_backward`; grad_x: (B, (H + 2) * (W + 2) * C); chunk_*:
    runs of channels (:meth:`~deformconv.ops._cpu_layout.Layout.runs` with a maximum length).
    Each task is one (image, chunk) and owns those channels of that image, so tasks never write
    the same element and each element's sum runs in a fixed order.
    """
    n_ch = np.uint64(geo.channels)
    row_step = np.uint64(geo.padded_width * geo.channels)
    n_rows = grad_cols.shape[0]
    b_first = n0 // geo.pixels
    n_images = (n0 + n_rows - 1) // geo.pixels - b_first + 1
    n_chunks = chunk_first.shape[0]
    for task in prange(n_images * n_chunks):
        b = b_first + task // n_chunks
        q = task % n_chunks
        first = np.uint64(chunk_first[q])
        length = np.uint64(chunk_length[q])
        for row in range(max(b * geo.pixels - n0, 0), min((b + 1) * geo.pixels - n0, n_rows)):
            for k in range(geo.taps):
                tap = chunk_group[q] * geo.taps + k
                corner = plan_corner[row, tap]
                if corner < 0:
                    continue
                w00 = plan_w00[row, tap]
                w01 = plan_w01[row, tap]
                w10 = plan_w10[row, tap]
                w11 = plan_w11[row, tap]
                src = np.uint64(chunk_column[q] + k * geo.group_channels)
                s00 = np.uint64(corner) * n_ch + first
                for c in range(length):
                    grad_x[b, s00 + c] += w00 * grad_cols[row, src + c]
                for c in range(length):
                    grad_x[b, s00 + n_ch + c] += w01 * grad_cols[row, src + c]
                for c in range(length):
                    grad_x[b, s00 + row_step + c] += w10 * grad_cols[row, src + c]
                for c in range(length):
                    grad_x[b, s00 + row_step + n_ch + c] += w11 * grad_cols[row, src + c]
