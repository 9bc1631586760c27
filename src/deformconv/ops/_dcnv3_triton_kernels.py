"""The Triton kernels of DCNv3/DCNv4 (the host code that launches them is in
:mod:`deformconv.ops._dcnv3_triton`).

Every kernel runs on a one-axis grid whose program id enumerates (image, group, pixel block),
pixel blocks fastest (CUDA allows ``2**31 - 1`` programs on that axis; see
:mod:`deformconv.ops._launch`). A program owns ``BLOCK_Q`` output pixels of one group and walks
the group's points and channels (``BLOCK_D`` at a time) itself, so the bilinear coordinates and
weights of a (pixel, point) are computed once per channel block and the channel sums of the
backward are added in a fixed order. Every kernel takes ``INDEX_64`` (int64 program ids and
indices, chosen on the host from the tensors' extents) and ``ACC`` (the compute dtype: float32
for float16/bfloat16/float32, float64 for float64).

Where the points sit is :mod:`deformconv.ops._dcnv3_geometry`'s rule: point ``p`` is kernel
column ``i`` and row ``j`` of the x-outer enumeration ``k = p + (p >= centre)``, ``i = k //
kernel_h``, ``j = k % kernel_h``; bilinear sampling reads zeros outside the image, and positions
outside ``[-1, H) x [-1, W)`` (or NaN) have no gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _program(n_qb, G, INDEX_64: tl.constexpr):
    """This program's image, group and pixel block."""
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    qb = pid % n_qb
    rest = pid // n_qb
    return rest // G, rest % G, qb


@triton.jit
def _point(
    off_ptr, mask_ptr, scale, rows, qm, g, p, centre, kh, cy, cx, dh, dw, half_h, half_w, H, W,
    off_row, off_group, m_row, m_group, m_start, INDEX_64: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Position, footing and mask of point ``p`` for the block's pixels (``rows``: their flat
    (image, pixel) indices): ``(y0, x0, ly, lx, m, inside)``, ``inside`` in ``[-1, H) x [-1,
    W)``; outside positions are moved to -2, whose corners all read zero."""
    k = p + (p >= centre).to(tl.int32)
    tap_x = ((k // kh) * dw - half_w).to(ACC)
    tap_y = ((k % kh) * dh - half_h).to(ACC)
    ob = off_ptr + rows * off_row + g * off_group + 2 * p
    dx = tl.load(ob, mask=qm, other=0.0).to(ACC)
    dy = tl.load(ob + 1, mask=qm, other=0.0).to(ACC)
    m = tl.load(mask_ptr + rows * m_row + g * m_group + m_start + p, mask=qm, other=0.0).to(ACC)
    y = cy + (tap_y + dy) * scale
    x = cx + (tap_x + dx) * scale
    inside = (y >= -1) & (y < H) & (x >= -1) & (x < W)
    y = tl.where(inside, y, -2.0)
    x = tl.where(inside, x, -2.0)
    yf = tl.floor(y)
    xf = tl.floor(x)
    if INDEX_64:
        y0 = yf.to(tl.int64)
        x0 = xf.to(tl.int64)
    else:
        y0 = yf.to(tl.int32)
        x0 = xf.to(tl.int32)
    return y0, x0, y - yf, x - xf, m, inside


@triton.jit
def _corner(x_img, y, x, H, W, qm, ch, cm, sxh, sxw, sxc):
    """Pointers of one bilinear corner for a (pixels, channels) tile, and which are in the image."""
    ok = qm & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    ptrs = x_img + (y * sxh + x * sxw)[:, None] + ch[None, :] * sxc
    return ptrs, ok[:, None] & cm[None, :]


@triton.jit
def _centres(qb, Q, Wo, sh, sw, origin_y, origin_x, BLOCK_Q: tl.constexpr, ACC: tl.constexpr):
    q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qm = q < Q
    cy = ((q // Wo) * sh + origin_y).to(ACC)
    cx = ((q % Wo) * sw + origin_x).to(ACC)
    return q, qm, cy, cx


@triton.jit
def forward_kernel(
    x_ptr, off_ptr, mask_ptr, scale_ptr, out_ptr,
    H, W, Wo, Q, G, D, P, centre, kh, sh, sw, origin_y, origin_x, dh, dw, half_h, half_w,
    off_row, off_group, m_row, m_group, m_start, sxn, sxh, sxw, sxc, n_qb,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """``out[n, q, g * D + c] = sum_p mask * bilinear(x[n, :, :, g * D + c], position)`` for one
    block of pixels, into the contiguous ``(N, Ho * Wo, G * D)`` output."""
    n, g, qb = _program(n_qb, G, INDEX_64)
    q, qm, cy, cx = _centres(qb, Q, Wo, sh, sw, origin_y, origin_x, BLOCK_Q, ACC)
    rows = n * Q + q
    scale = tl.load(scale_ptr).to(ACC)
    x_img = x_ptr + n * sxn
    for c0 in range(0, D, BLOCK_D):
        c = c0 + tl.arange(0, BLOCK_D)
        cm = c < D
        ch = g * D + c
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
        for p in range(0, P):
            y0, x0, ly, lx, m, _ = _point(
                off_ptr, mask_ptr, scale, rows, qm, g, p, centre, kh, cy, cx, dh, dw, half_h,
                half_w, H, W, off_row, off_group, m_row, m_group, m_start, INDEX_64, ACC,
            )  # fmt: skip
            hy = 1 - ly
            hx = 1 - lx
            for dy in tl.static_range(2):
                for dx in tl.static_range(2):
                    wy = ly if dy == 1 else hy
                    wx = lx if dx == 1 else hx
                    ptrs, ok = _corner(x_img, y0 + dy, x0 + dx, H, W, qm, ch, cm, sxh, sxw, sxc)
                    v = tl.load(ptrs, mask=ok, other=0.0).to(ACC)
                    acc += (m * wy * wx)[:, None] * v
        dst = out_ptr + rows[:, None] * (G * D) + ch[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=qm[:, None] & cm[None, :])


@triton.jit
def backward_kernel(
    x_ptr, off_ptr, mask_ptr, scale_ptr, gout_ptr, gx_ptr, goff_ptr, gmask_ptr,
    H, W, Wo, Q, G, D, P, centre, kh, sh, sw, origin_y, origin_x, dh, dw, half_h, half_w,
    off_row, off_group, m_row, m_group, m_start, sxn, sxh, sxw, sxc, n_qb,
    INPUT_GRAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
    INDEX_64: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Offset and mask gradients of one block of pixels (every channel of the group summed in a
    fixed order, no atomics), written with the offset/mask strides; with ``INPUT_GRAD`` also the
    input gradient, added atomically into the contiguous ``ACC`` buffer ``gx_ptr`` (N, H, W, C).
    grad_out is contiguous ``(N, Ho * Wo, G * D)``."""
    n, g, qb = _program(n_qb, G, INDEX_64)
    q, qm, cy, cx = _centres(qb, Q, Wo, sh, sw, origin_y, origin_x, BLOCK_Q, ACC)
    rows = n * Q + q
    scale = tl.load(scale_ptr).to(ACC)
    x_img = x_ptr + n * sxn
    gx_img = gx_ptr + n * H * W * G * D
    for p in range(0, P):
        y0, x0, ly, lx, m, inside = _point(
            off_ptr, mask_ptr, scale, rows, qm, g, p, centre, kh, cy, cx, dh, dw, half_h,
            half_w, H, W, off_row, off_group, m_row, m_group, m_start, INDEX_64, ACC,
        )  # fmt: skip
        hy = 1 - ly
        hx = 1 - lx
        s00 = tl.zeros([BLOCK_Q], dtype=ACC)
        s01 = tl.zeros([BLOCK_Q], dtype=ACC)
        s10 = tl.zeros([BLOCK_Q], dtype=ACC)
        s11 = tl.zeros([BLOCK_Q], dtype=ACC)
        for c0 in range(0, D, BLOCK_D):
            c = c0 + tl.arange(0, BLOCK_D)
            cm = c < D
            ch = g * D + c
            go = tl.load(
                gout_ptr + rows[:, None] * (G * D) + ch[None, :],
                mask=qm[:, None] & cm[None, :],
                other=0.0,
            ).to(ACC)
            for dy in tl.static_range(2):
                for dx in tl.static_range(2):
                    wy = ly if dy == 1 else hy
                    wx = lx if dx == 1 else hx
                    ptrs, ok = _corner(x_img, y0 + dy, x0 + dx, H, W, qm, ch, cm, sxh, sxw, sxc)
                    v = tl.load(ptrs, mask=ok, other=0.0).to(ACC)
                    s = tl.sum(go * v, axis=1)
                    if INPUT_GRAD:
                        gptrs, _ = _corner(
                            gx_img, y0 + dy, x0 + dx, H, W, qm, ch, cm, W * G * D, G * D, 1
                        )
                        tl.atomic_add(gptrs, go * (m * wy * wx)[:, None], mask=ok)
                    if dy == 0 and dx == 0:
                        s00 += s
                    elif dy == 0:
                        s01 += s
                    elif dx == 0:
                        s10 += s
                    else:
                        s11 += s
        grad_x = tl.where(inside, scale * m * (hy * (s01 - s00) + ly * (s11 - s10)), 0.0)
        grad_y = tl.where(inside, scale * m * (hx * (s10 - s00) + lx * (s11 - s01)), 0.0)
        grad_m = hy * hx * s00 + hy * lx * s01 + ly * hx * s10 + ly * lx * s11
        ob = goff_ptr + rows * off_row + g * off_group + 2 * p
        tl.store(ob, grad_x.to(goff_ptr.dtype.element_ty), mask=qm)
        tl.store(ob + 1, grad_y.to(goff_ptr.dtype.element_ty), mask=qm)
        mb = gmask_ptr + rows * m_row + g * m_group + m_start + p
        tl.store(mb, grad_m.to(gmask_ptr.dtype.element_ty), mask=qm)


@triton.jit
def scatter_plan_kernel(
    off_ptr, mask_ptr, scale_ptr, gout_ptr, contrib_ptr, target_ptr, dy, dx,
    H, W, Wo, Q, G, D, P, centre, kh, sh, sw, origin_y, origin_x, dh, dw, half_h, half_w,
    off_row, off_group, m_row, m_group, m_start, n_qb,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, INDEX_64: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """For the deterministic backward: the contribution of bilinear corner (``dy``, ``dx``) of
    every (pixel, point, channel) to the input gradient, and its destination, a flat index into
    the launch's ``(n, H + 2, W + 2, C)`` zero-bordered gradient (corners outside the image land
    in the border). Laid out ``(n, Q, G, P, D)`` for one ``scatter_add_``."""
    n, g, qb = _program(n_qb, G, INDEX_64)
    q, qm, cy, cx = _centres(qb, Q, Wo, sh, sw, origin_y, origin_x, BLOCK_Q, ACC)
    rows = n * Q + q
    scale = tl.load(scale_ptr).to(ACC)
    for p in range(0, P):
        y0, x0, ly, lx, m, _ = _point(
            off_ptr, mask_ptr, scale, rows, qm, g, p, centre, kh, cy, cx, dh, dw, half_h,
            half_w, H, W, off_row, off_group, m_row, m_group, m_start, INDEX_64, ACC,
        )  # fmt: skip
        wy = dy * ly + (1 - dy) * (1 - ly)
        wx = dx * lx + (1 - dx) * (1 - lx)
        w = m * wy * wx
        # Positions moved to -2 have corners at -2 and -1: clamp those into the border too.
        yy = tl.maximum(y0 + dy, -1) + 1
        xx = tl.maximum(x0 + dx, -1) + 1
        spot = (n * (H + 2) + yy) * (W + 2) + xx
        for c0 in range(0, D, BLOCK_D):
            c = c0 + tl.arange(0, BLOCK_D)
            cm = c < D
            ch = g * D + c
            ok = qm[:, None] & cm[None, :]
            go = tl.load(gout_ptr + rows[:, None] * (G * D) + ch[None, :], mask=ok, other=0.0)
            at = ((rows * G + g) * P + p)[:, None] * D + c[None, :]
            contrib = go.to(ACC) * w[:, None]
            tl.store(contrib_ptr + at, contrib.to(contrib_ptr.dtype.element_ty), mask=ok)
            target = spot[:, None] * (G * D) + ch[None, :]
            tl.store(target_ptr + at, target.to(tl.int64), mask=ok)
