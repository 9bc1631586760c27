"""The fused CPU path: sampling and matrix multiply in one pass over cache-sized tiles.

For narrow layers (a weight small enough to stay in cache), the sampled columns of a tile of
output pixels go into a small buffer of the thread, where the contraction with the weight reads
them straight away: the columns never travel through memory, which the unfused path (a BLAS
matrix multiply over tiles of a few MiB) cannot avoid. The contraction is written so that LLVM
vectorises it well: each output value is a dot product over contiguous columns, computed for
blocks of 4 pixels x 4 output channels whose 16 sums stay in registers (on the project's machine
this runs at 85-95% of the speed of oneDNN's matrix multiply for these sizes).

Each tile is handled in phases, each a loop over pixels or channels that vectorises:

1. *plan*: the footing (corner, fractions, weights) of every (tap, pixel) of the tile, in loops
   over pixels (the offsets and the mask are contiguous along pixels);
2. *sample*: every (pixel, tap) blends its four corners, in loops over channels;
3. *contract*: the 4 x 4 dot-product blocks.

The backward pass runs the same tiles per task (image, chunk of channels), where a chunk is a
range of channels of one weight group: whole offset groups, merged up to 64 channels while tasks
remain for every thread, or part of one offset group when there are fewer runs than threads
(:meth:`~deformconv.ops._cpu_layout.Layout.chunks`). Per tile: the column gradients (grad_out times the weight, as blocks of
multiply-adds over contiguous columns), then one pass over (pixel, tap) that resamples the
columns, dots the column gradient with each corner (for the offset and mask gradients) and adds
it into the input gradient, then the offset and mask gradients in loops over pixels, then the
tile's share of the weight gradient. A task owns its channels of its image in the input
gradient; the offset and mask gradients of the chunk's part of its offset group go to a slice of
their own (parts are added in a fixed order afterwards); the weight gradient is summed per *slot*
(a fixed range of tasks), and the slots are added in a fixed order. So no two tasks write the
same element, nothing needs atomics, and gradients are bit-identical from run to run (for a
given number of threads, which fixes the slots).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from deformconv.ops._cpu_sampling import corner_weights, kernel_position, tap_footing
from deformconv.ops._numba import FASTMATH


@njit(cache=True, fastmath=FASTMATH)
def _contract_forward(cols, t, n, col0, width, weight, o_lo, o_hi, bias, one, out, b, p0):
    """``out[b, o, p0 + r] = bias[o] + sum_j cols[t, r, col0 + j] * weight[o, j]`` for pixels
    ``r < n`` and output channels ``o_lo <= o < o_hi``, in blocks of 4 x 4 dot products."""
    zero = one - one
    # Unsigned indices: Numba adds a wrap-around test to every signed index that may be negative,
    # which would turn the contiguous loads into gathers.
    start = np.uint64(col0)
    columns = np.uint64(width)
    n4 = n - n % 4
    o4 = o_hi - (o_hi - o_lo) % 4
    for o in range(o_lo, o4, 4):
        for r in range(0, n4, 4):
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
            s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
            for j in range(columns):
                a0 = cols[t, r, start + j]
                a1 = cols[t, r + 1, start + j]
                a2 = cols[t, r + 2, start + j]
                a3 = cols[t, r + 3, start + j]
                v0 = weight[o, j]
                v1 = weight[o + 1, j]
                v2 = weight[o + 2, j]
                v3 = weight[o + 3, j]
                s00 += a0 * v0
                s01 += a0 * v1
                s02 += a0 * v2
                s03 += a0 * v3
                s10 += a1 * v0
                s11 += a1 * v1
                s12 += a1 * v2
                s13 += a1 * v3
                s20 += a2 * v0
                s21 += a2 * v1
                s22 += a2 * v2
                s23 += a2 * v3
                s30 += a3 * v0
                s31 += a3 * v1
                s32 += a3 * v2
                s33 += a3 * v3
            out[b, o, p0 + r] = s00 + bias[o]
            out[b, o, p0 + r + 1] = s10 + bias[o]
            out[b, o, p0 + r + 2] = s20 + bias[o]
            out[b, o, p0 + r + 3] = s30 + bias[o]
            out[b, o + 1, p0 + r] = s01 + bias[o + 1]
            out[b, o + 1, p0 + r + 1] = s11 + bias[o + 1]
            out[b, o + 1, p0 + r + 2] = s21 + bias[o + 1]
            out[b, o + 1, p0 + r + 3] = s31 + bias[o + 1]
            out[b, o + 2, p0 + r] = s02 + bias[o + 2]
            out[b, o + 2, p0 + r + 1] = s12 + bias[o + 2]
            out[b, o + 2, p0 + r + 2] = s22 + bias[o + 2]
            out[b, o + 2, p0 + r + 3] = s32 + bias[o + 2]
            out[b, o + 3, p0 + r] = s03 + bias[o + 3]
            out[b, o + 3, p0 + r + 1] = s13 + bias[o + 3]
            out[b, o + 3, p0 + r + 2] = s23 + bias[o + 3]
            out[b, o + 3, p0 + r + 3] = s33 + bias[o + 3]
    # The pixels and output channels left over by the 4 x 4 blocks, one dot product each.
    for o in range(o_lo, o_hi):
        for r in range(n4 if o < o4 else 0, n):
            s = zero
            for j in range(columns):
                s += cols[t, r, start + j] * weight[o, j]
            out[b, o, p0 + r] = s + bias[o]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def fused_forward(
    x, offset, mask, base_y, base_x, geo, one, run_first, run_length, run_column, run_group,
    weight, bias, groups, tile, corner, w00, w01, w10, w11, cols, out,
):  # fmt: skip
    """Deformable convolution of all images, tile by tile.

    x, offset, mask, base_y, base_x, geo, one and run_* as in
    :func:`~deformconv.ops._cpu_sampling.sample_columns`; weight: (O, K * C / groups) in column
    order; bias: (O,) (zeros without one); tile: pixels per tile; corner, w00 .. w11:
    (T, G * K, tile) and cols: (T, tile, K * C), scratch per thread; out: (B, O, P).

    The plan and the sampling are written out here rather than in helpers: Numba marks the
    arguments of a parallel kernel ``noalias`` only when no array is passed on or viewed inside
    the loop, and the sampling loops need that to vectorise well (a third faster on shape c).
    """
    tiles_per_image = (geo.pixels + tile - 1) // tile
    n_ch = np.uint64(geo.channels)
    row_step = np.uint64(geo.padded_width * geo.channels)
    per_mask_image = mask.shape[0] > 1
    per_mask_tap = mask.shape[1] > 1
    group_width = weight.shape[1]
    group_out = weight.shape[0] // groups
    for task in prange(x.shape[0] * tiles_per_image):
        t = numba.get_thread_id()
        b = task // tiles_per_image
        p0 = (task - b * tiles_per_image) * tile
        count = min(tile, geo.pixels - p0)
        n = np.uint64(count)
        # Plan: the footing of every (offset group, tap) of the tile's pixels.
        mb = b if per_mask_image else 0
        for tap in range(offset.shape[1] // 2):
            i, j = kernel_position(tap, geo)
            mt = tap if per_mask_tap else 0
            for r in range(n):
                p = np.uint64(p0) + r
                c, reads, lh, lw = tap_footing(offset, base_y, base_x, geo, one, b, p, tap, i, j)
                a00, a01, a10, a11 = corner_weights(mask[mb, mt, p], lh, lw, one)
                corner[t, tap, r] = c if reads > 0 else -1
                w00[t, tap, r] = a00
                w01[t, tap, r] = a01
                w10[t, tap, r] = a10
                w11[t, tap, r] = a11
        # Sample: each (pixel, tap) blends its four corners, channel run by channel run.
        for r in range(n):
            for q in range(run_first.shape[0]):
                first = np.uint64(run_first[q])
                length = np.uint64(run_length[q])
                for k in range(geo.taps):
                    tap = run_group[q] * geo.taps + k
                    dst = np.uint64(run_column[q] + k * geo.group_channels)
                    c = corner[t, tap, r]
                    if c < 0:
                        for ch in range(length):
                            cols[t, r, dst + ch] = 0
                        continue
                    a00 = w00[t, tap, r]
                    a01 = w01[t, tap, r]
                    a10 = w10[t, tap, r]
                    a11 = w11[t, tap, r]
                    s00 = np.uint64(c) * n_ch + first
                    s10 = s00 + row_step
                    for ch in range(length):
                        cols[t, r, dst + ch] = (
                            a00 * x[b, s00 + ch]
                            + a01 * x[b, s00 + n_ch + ch]
                            + a10 * x[b, s10 + ch]
                            + a11 * x[b, s10 + n_ch + ch]
                        )
        for g in range(groups):
            _contract_forward(
                cols, t, count, g * group_width, group_width, weight, g * group_out,
                (g + 1) * group_out, bias, one, out, b, p0,
            )  # fmt: skip


@njit(inline="always")
def _grad_block(grad_rows, b, p, o):
    """The upstream gradients of pixels ``p, p + 1`` and output channels ``o .. o + 3``."""
    return (
        grad_rows[b, p, o],
        grad_rows[b, p, o + 1],
        grad_rows[b, p, o + 2],
        grad_rows[b, p, o + 3],
        grad_rows[b, p + 1, o],
        grad_rows[b, p + 1, o + 1],
        grad_rows[b, p + 1, o + 2],
        grad_rows[b, p + 1, o + 3],
    )


@njit(cache=True, fastmath=FASTMATH)
def _grad_columns(grad_rows, weight, b, p0, n, o_lo, o_hi, col0, width, t, grad_cols):
    """``grad_cols[t, r, j] = sum_o grad_rows[b, p0 + r, o] * weight[o, col0 + j]`` for pixels
    ``r < n``, ``o_lo <= o < o_hi`` and ``j < width``: blocks of 4 pixels x 4 output channels,
    each a multiply-add over contiguous columns."""
    start = np.uint64(col0)
    columns = np.uint64(width)
    n4 = n - n % 4
    o4 = o_hi - (o_hi - o_lo) % 4
    for r in range(n):
        for j in range(columns):
            grad_cols[t, r, j] = 0
    for r in range(0, n4, 4):
        p = p0 + r
        for o in range(o_lo, o4, 4):
            g00, g01, g02, g03, g10, g11, g12, g13 = _grad_block(grad_rows, b, p, o)
            g20, g21, g22, g23, g30, g31, g32, g33 = _grad_block(grad_rows, b, p + 2, o)
            for j in range(columns):
                v0 = weight[o, start + j]
                v1 = weight[o + 1, start + j]
                v2 = weight[o + 2, start + j]
                v3 = weight[o + 3, start + j]
                grad_cols[t, r, j] += g00 * v0 + g01 * v1 + g02 * v2 + g03 * v3
                grad_cols[t, r + 1, j] += g10 * v0 + g11 * v1 + g12 * v2 + g13 * v3
                grad_cols[t, r + 2, j] += g20 * v0 + g21 * v1 + g22 * v2 + g23 * v3
                grad_cols[t, r + 3, j] += g30 * v0 + g31 * v1 + g32 * v2 + g33 * v3
    # The pixels and output channels left over by the 4 x 4 blocks.
    for r in range(n):
        for o in range(o4 if r < n4 else o_lo, o_hi):
            g = grad_rows[b, p0 + r, o]
            for j in range(columns):
                grad_cols[t, r, j] += g * weight[o, start + j]


@njit(cache=True, fastmath=FASTMATH)
def _weight_grad(grad_rows, cols, b, p0, n, o_lo, o_hi, col0, width, t, s, grad_weight):
    """``grad_weight[s, o, col0 + j] += sum_r grad_rows[b, p0 + r, o] * cols[t, r, j]`` for
    pixels ``r < n``, ``o_lo <= o < o_hi`` and ``j < width``, in blocks of 4 x 4, the pixels
    added in order."""
    start = np.uint64(col0)
    columns = np.uint64(width)
    n4 = n - n % 4
    o4 = o_hi - (o_hi - o_lo) % 4
    for o in range(o_lo, o4, 4):
        for r in range(0, n4, 4):
            p = p0 + r
            g00, g01, g02, g03, g10, g11, g12, g13 = _grad_block(grad_rows, b, p, o)
            g20, g21, g22, g23, g30, g31, g32, g33 = _grad_block(grad_rows, b, p + 2, o)
            for j in range(columns):
                c0 = cols[t, r, j]
                c1 = cols[t, r + 1, j]
                c2 = cols[t, r + 2, j]
                c3 = cols[t, r + 3, j]
                grad_weight[s, o, start + j] += g00 * c0 + g10 * c1 + g20 * c2 + g30 * c3
                grad_weight[s, o + 1, start + j] += g01 * c0 + g11 * c1 + g21 * c2 + g31 * c3
                grad_weight[s, o + 2, start + j] += g02 * c0 + g12 * c1 + g22 * c2 + g32 * c3
                grad_weight[s, o + 3, start + j] += g03 * c0 + g13 * c1 + g23 * c2 + g33 * c3
        for r in range(n4, n):
            for oo in range(o, o + 4):
                g = grad_rows[b, p0 + r, oo]
                for j in range(columns):
                    grad_weight[s, oo, start + j] += g * cols[t, r, j]
    for o in range(o4, o_hi):
        for r in range(n):
            g = grad_rows[b, p0 + r, o]
            for j in range(columns):
                grad_weight[s, o, start + j] += g * cols[t, r, j]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def fused_backward(
    x, offset, mask, base_y, base_x, geo, one, grad_rows, weight, chunk_first, chunk_length,
    chunk_group, chunk_groups, chunk_weight_group, chunk_part, chunk_column, slot_tasks, tile,
    modulated, corner, gate, frac_h, frac_w, modulation, dot00, dot01, dot10, dot11, grad_cols,
    cols, grad_x, grad_offset, grad_mask, grad_weight,
):  # fmt: skip
    """Gradients of all images, task by task (an image and a chunk of channels), tile by tile.

    x, offset, mask, base_y, base_x, geo and one as in :func:`fused_forward`; grad_rows:
    (B, P, O) upstream gradient, channels last; weight: (O, K * C / groups) in chunk-major
    column order; chunk_*: the chunks (:class:`~deformconv.ops._cpu_layout.Chunks`);
    slot_tasks: (S + 1,) task boundaries of the slots, task ``b * chunks + q``; scratch per
    thread: corner, gate, frac_h, frac_w, modulation and dot00 .. dot11 (T, groups * K, tile)
    for the (offset group, tap) pairs of a chunk, grad_cols and cols (T, tile, K * chunk length).

    Writes grad_x (B, (H + 2) * (W + 2) * C) (zeroed before), grad_offset (parts, B, 2 * G * K,
    P) and, when ``modulated``, grad_mask (parts, B, G * K, P), each task its chunk's part;
    adds into grad_weight (S, O, K * C / groups), in chunk-major order, each slot its own.
    """
    zero = one - one
    n_ch = np.uint64(geo.channels)
    row_step = np.uint64(geo.padded_width * geo.channels)
    per_mask_image = mask.shape[0] > 1
    per_mask_tap = mask.shape[1] > 1
    group_out = weight.shape[0] * geo.group_channels // geo.channels
    per_group = geo.channels // (offset.shape[1] // (2 * geo.taps))
    n_chunks = chunk_first.shape[0]
    for s in prange(slot_tasks.shape[0] - 1):
        t = numba.get_thread_id()
        for task in range(slot_tasks[s], slot_tasks[s + 1]):
            b = task // n_chunks
            q = task - b * n_chunks
            first = chunk_first[q]
            length = np.uint64(chunk_length[q])
            width = geo.taps * chunk_length[q]
            o_lo = chunk_weight_group[q] * group_out
            mb = b if per_mask_image else 0
            part = chunk_part[q]
            pairs = chunk_groups[q] * geo.taps  # (offset group, tap) pairs of the chunk
            for p0 in range(0, geo.pixels, tile):
                count = min(tile, geo.pixels - p0)
                n = np.uint64(count)
                _grad_columns(
                    grad_rows, weight, b, p0, count, o_lo, o_lo + group_out, chunk_column[q],
                    width, t, grad_cols,
                )  # fmt: skip
                # Plan: the footing of the chunk's (offset group, tap) pairs at the pixels.
                for e in range(pairs):
                    tap = chunk_group[q] * geo.taps + e
                    i, j = kernel_position(tap, geo)
                    mt = tap if per_mask_tap else 0
                    for r in range(n):
                        p = np.uint64(p0) + r
                        c, reads, lh, lw = tap_footing(
                            offset, base_y, base_x, geo, one, b, p, tap, i, j
                        )
                        corner[t, e, r] = c
                        gate[t, e, r] = one if reads > 0 else zero
                        frac_h[t, e, r] = lh
                        frac_w[t, e, r] = lw
                        modulation[t, e, r] = mask[mb, mt, p]
                # Resample the columns and dot the column gradient with each corner; then add
                # the column gradient into the input gradient, corner by corner.
                for r in range(n):
                    for e in range(pairs):
                        k = e % geo.taps
                        g = chunk_group[q] + e // geo.taps
                        lo = max(first, g * per_group)  # the group's channels in the chunk
                        run = np.uint64(min(first + chunk_length[q], (g + 1) * per_group) - lo)
                        src = np.uint64(k) * length + np.uint64(lo - first)
                        c = corner[t, e, r]
                        if c < 0:
                            for ch in range(run):
                                cols[t, r, src + ch] = 0
                            dot00[t, e, r] = zero
                            dot01[t, e, r] = zero
                            dot10[t, e, r] = zero
                            dot11[t, e, r] = zero
                            continue
                        m = modulation[t, e, r] * gate[t, e, r]
                        a00, a01, a10, a11 = corner_weights(
                            m, frac_h[t, e, r], frac_w[t, e, r], one
                        )
                        s00 = np.uint64(c) * n_ch + np.uint64(lo)
                        s10 = s00 + row_step
                        d00 = zero
                        d01 = zero
                        d10 = zero
                        d11 = zero
                        for ch in range(run):
                            v00 = x[b, s00 + ch]
                            v01 = x[b, s00 + n_ch + ch]
                            v10 = x[b, s10 + ch]
                            v11 = x[b, s10 + n_ch + ch]
                            gc = grad_cols[t, r, src + ch]
                            d00 += gc * v00
                            d01 += gc * v01
                            d10 += gc * v10
                            d11 += gc * v11
                            value = a00 * v00 + a01 * v01 + a10 * v10 + a11 * v11
                            cols[t, r, src + ch] = value if m != zero else zero
                        dot00[t, e, r] = d00
                        dot01[t, e, r] = d01
                        dot10[t, e, r] = d10
                        dot11[t, e, r] = d11
                        if m == zero:
                            continue
                        for ch in range(run):
                            grad_x[b, s00 + ch] += a00 * grad_cols[t, r, src + ch]
                        for ch in range(run):
                            grad_x[b, s00 + n_ch + ch] += a01 * grad_cols[t, r, src + ch]
                        for ch in range(run):
                            grad_x[b, s10 + ch] += a10 * grad_cols[t, r, src + ch]
                        for ch in range(run):
                            grad_x[b, s10 + n_ch + ch] += a11 * grad_cols[t, r, src + ch]
                # Offset and mask gradients of the tile, in loops over pixels (a tap outside
                # has zero dots and fractions, hence zero gradients).
                for e in range(pairs):
                    tap = chunk_group[q] * geo.taps + e
                    for r in range(n):
                        p = np.uint64(p0) + r
                        lh = frac_h[t, e, r]
                        lw = frac_w[t, e, r]
                        hh = one - lh
                        hw = one - lw
                        d00 = dot00[t, e, r]
                        d01 = dot01[t, e, r]
                        d10 = dot10[t, e, r]
                        d11 = dot11[t, e, r]
                        m = modulation[t, e, r]
                        grad_offset[part, b, 2 * tap, p] = m * (lw * (d11 - d01) + hw * (d10 - d00))
                        grad_offset[part, b, 2 * tap + 1, p] = m * (
                            lh * (d11 - d10) + hh * (d01 - d00)
                        )
                        if modulated:
                            grad_mask[part, b, tap, p] = gate[t, e, r] * (
                                hh * hw * d00 + hh * lw * d01 + lh * hw * d10 + lh * lw * d11
                            )
                _weight_grad(
                    grad_rows, cols, b, p0, count, o_lo, o_lo + group_out, chunk_column[q],
                    width, t, s, grad_weight,
                )  # fmt: skip
