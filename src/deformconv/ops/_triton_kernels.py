"""The Triton kernels of deformable convolution (the host code that launches them is in
:mod:`deformconv.ops._triton`).

Every kernel runs on a one-axis grid whose program id enumerates (image, offset group, tap,
channel block, pixel block), pixel blocks fastest; CUDA allows ``2**31 - 1`` programs on that
axis against 65,535 on the others (see :mod:`deformconv.ops._launch`). Every kernel takes:

- ``INDEX_64``: widen the program id, and so every index derived from it, to int64 (chosen on the
  host when a tensor's extent can pass int32);
- ``ACC``: the compute dtype, float32 for float16/bfloat16/float32 tensors and float64 for
  float64: values are loaded in the tensors' own dtype, computed in ``ACC`` and stored back in the
  destination's dtype.

Bilinear sampling follows torchvision's ``deform_conv2d`` (``torchvision/csrc/ops/cuda/
deform_conv2d_kernel.cu``): a tap outside ``[-1, H) x [-1, W)`` or at a NaN position reads zero
and has no offset gradient; on the edge row or column -1 it reads zero but has a gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _program(n_pb, n_cb, K, G, INDEX_64: tl.constexpr):
    """This program's image, offset group, tap, channel block and pixel block."""
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    pb = pid % n_pb
    rest = pid // n_pb
    cb = rest % n_cb
    rest = rest // n_cb
    k = rest % K
    rest = rest // K
    return rest // G, rest % G, k, cb, pb


@triton.jit
def _corners(
    off_ptr,
    mask_ptr,
    n,
    g,
    k,
    pb,
    G,
    K,
    kw,
    H,
    W,
    P,
    Wo,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    HAS_MASK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    INDEX_64: tl.constexpr,
    ACC: tl.constexpr,
):
    """The block's pixels, their top-left bilinear corner and fractions, and modulation."""
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    oy = p // Wo
    ox = p % Wo
    i = k // kw
    j = k % kw
    obase = off_ptr + ((n * G + g) * K + k) * 2 * P
    dy = tl.load(obase + p, mask=pm, other=0.0).to(ACC)
    dx = tl.load(obase + P + p, mask=pm, other=0.0).to(ACC)
    py = (oy * sh - ph + i * dh).to(ACC) + dy
    px = (ox * sw - pw + j * dw).to(ACC) + dx
    inside = (py >= -1) & (py < H) & (px >= -1) & (px < W)
    py = tl.where(inside, py, -1.0)
    px = tl.where(inside, px, -1.0)
    y0f = tl.floor(py)
    x0f = tl.floor(px)
    ly = py - y0f
    lx = px - x0f
    if INDEX_64:
        y0 = y0f.to(tl.int64)
        x0 = x0f.to(tl.int64)
    else:
        y0 = y0f.to(tl.int32)
        x0 = x0f.to(tl.int32)
    if HAS_MASK:
        m = tl.load(mask_ptr + ((n * G + g) * K + k) * P + p, mask=pm, other=0.0).to(ACC)
    else:
        m = tl.full(ly.shape, 1.0, ACC)
    return p, pm, y0, x0, ly, lx, m, inside


@triton.jit
def _ptrs(x_ptr, ch, cm, pm, y, x, H, W, sxc, sxh, sxw):
    """Pointers to one corner for a (channels, pixels) tile, and where they are in the image."""
    ok = pm & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    return x_ptr + ch[:, None] * sxc + (y * sxh + x * sxw)[None, :], cm[:, None] & ok[None, :]


@triton.jit
def _tile(x_ptr, ch, cm, pm, y, x, H, W, sxc, sxh, sxw, ACC: tl.constexpr):
    ptrs, ok = _ptrs(x_ptr, ch, cm, pm, y, x, H, W, sxc, sxh, sxw)
    return tl.load(ptrs, mask=ok, other=0.0).to(ACC)


@triton.jit
def _corner_backward(
    xbase,
    gbase,
    gc,
    ch,
    cm,
    pm,
    y,
    x,
    w,
    H,
    W,
    sxc,
    sxh,
    sxw,
    INPUT_GRAD: tl.constexpr,
    ACC: tl.constexpr,
):
    """One corner's channel sum of column gradient times value (its bilinear weight's
    gradient); with ``INPUT_GRAD``, also its share of the input gradient, added atomically to
    the contiguous ``ACC`` buffer at ``gbase``."""
    ptrs, ok = _ptrs(xbase, ch, cm, pm, y, x, H, W, sxc, sxh, sxw)
    v = tl.load(ptrs, mask=ok, other=0.0).to(ACC)
    if INPUT_GRAD:
        gptrs, _ = _ptrs(gbase, ch, cm, pm, y, x, H, W, H * W, W, 1)
        tl.atomic_add(gptrs, gc * w[None, :], mask=ok)
    return tl.sum(gc * v, axis=0)


@triton.jit
def im2col_kernel(
    x_ptr,
    off_ptr,
    mask_ptr,
    cols_ptr,
    C,
    H,
    W,
    Wo,
    P,
    Cg,
    G,
    K,
    kw,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    sxn,
    sxc,
    sxh,
    sxw,
    n_pb,
    n_cb,
    HAS_MASK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INDEX_64: tl.constexpr,
    ACC: tl.constexpr,
):
    """Sampled, modulated columns ``cols[n, c * K + k, p]`` for one block of channels and
    pixels; the bilinear weights are computed once and applied to every channel of the block."""
    n, g, k, cb, pb = _program(n_pb, n_cb, K, G, INDEX_64)
    p, pm, y0, x0, ly, lx, m, _inside = _corners(
        off_ptr, mask_ptr, n, g, k, pb, G, K, kw, H, W, P, Wo, sh, sw, ph, pw, dh, dw,
        HAS_MASK, BLOCK_P, INDEX_64, ACC,
    )  # fmt: skip
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < Cg
    ch = g * Cg + c
    base = x_ptr + n * sxn
    v00 = _tile(base, ch, cm, pm, y0, x0, H, W, sxc, sxh, sxw, ACC)
    v01 = _tile(base, ch, cm, pm, y0, x0 + 1, H, W, sxc, sxh, sxw, ACC)
    v10 = _tile(base, ch, cm, pm, y0 + 1, x0, H, W, sxc, sxh, sxw, ACC)
    v11 = _tile(base, ch, cm, pm, y0 + 1, x0 + 1, H, W, sxc, sxh, sxw, ACC)
    hy = 1 - ly
    hx = 1 - lx
    val = (
        (hy * hx * m)[None, :] * v00
        + (hy * lx * m)[None, :] * v01
        + (ly * hx * m)[None, :] * v10
        + (ly * lx * m)[None, :] * v11
    )
    rows = (n * C + ch) * K + k
    tl.store(
        cols_ptr + rows[:, None] * P + p[None, :],
        val.to(cols_ptr.dtype.element_ty),
        mask=cm[:, None] & pm[None, :],
    )


@triton.jit
def col2im_kernel(
    x_ptr,
    off_ptr,
    mask_ptr,
    gcols_ptr,
    gx_ptr,
    goff_ptr,
    gmask_ptr,
    C,
    H,
    W,
    Wo,
    P,
    Cg,
    G,
    K,
    kw,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    sxn,
    sxc,
    sxh,
    sxw,
    n_pb,
    HAS_MASK: tl.constexpr,
    INPUT_GRAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INDEX_64: tl.constexpr,
    ACC: tl.constexpr,
):
    """Offset and mask gradients of one block of pixels (all channels of its group, summed in a
    fixed order: no atomics); with ``INPUT_GRAD``, also the input gradient, by atomic additions
    into the contiguous ``ACC`` buffer ``gx_ptr`` of shape ``(n, C, H, W)``."""
    n, g, k, _cb, pb = _program(n_pb, 1, K, G, INDEX_64)
    p, pm, y0, x0, ly, lx, m, inside = _corners(
        off_ptr, mask_ptr, n, g, k, pb, G, K, kw, H, W, P, Wo, sh, sw, ph, pw, dh, dw,
        HAS_MASK, BLOCK_P, INDEX_64, ACC,
    )  # fmt: skip
    hy = 1 - ly
    hx = 1 - lx
    s00 = tl.zeros([BLOCK_P], dtype=ACC)
    s01 = tl.zeros([BLOCK_P], dtype=ACC)
    s10 = tl.zeros([BLOCK_P], dtype=ACC)
    s11 = tl.zeros([BLOCK_P], dtype=ACC)
    xbase = x_ptr + n * sxn
    gbase = gx_ptr + n * C * H * W
    for c0 in range(0, Cg, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < Cg
        ch = g * Cg + c
        rows = (n * C + ch) * K + k
        gc = tl.load(
            gcols_ptr + rows[:, None] * P + p[None, :], mask=cm[:, None] & pm[None, :], other=0.0
        ).to(ACC)
        s00 += _corner_backward(
            xbase, gbase, gc, ch, cm, pm, y0, x0, hy * hx * m, H, W, sxc, sxh, sxw,
            INPUT_GRAD, ACC,
        )  # fmt: skip
        s01 += _corner_backward(
            xbase, gbase, gc, ch, cm, pm, y0, x0 + 1, hy * lx * m, H, W, sxc, sxh, sxw,
            INPUT_GRAD, ACC,
        )  # fmt: skip
        s10 += _corner_backward(
            xbase, gbase, gc, ch, cm, pm, y0 + 1, x0, ly * hx * m, H, W, sxc, sxh, sxw,
            INPUT_GRAD, ACC,
        )  # fmt: skip
        s11 += _corner_backward(
            xbase, gbase, gc, ch, cm, pm, y0 + 1, x0 + 1, ly * lx * m, H, W, sxc, sxh, sxw,
            INPUT_GRAD, ACC,
        )  # fmt: skip
    grad_y = tl.where(inside, m * (hx * (s10 - s00) + lx * (s11 - s01)), 0.0)
    grad_x = tl.where(inside, m * (hy * (s01 - s00) + ly * (s11 - s10)), 0.0)
    obase = goff_ptr + ((n * G + g) * K + k) * 2 * P
    tl.store(obase + p, grad_y.to(goff_ptr.dtype.element_ty), mask=pm)
    tl.store(obase + P + p, grad_x.to(goff_ptr.dtype.element_ty), mask=pm)
    if HAS_MASK:
        gm = hy * hx * s00 + hy * lx * s01 + ly * hx * s10 + ly * lx * s11
        tl.store(
            gmask_ptr + ((n * G + g) * K + k) * P + p, gm.to(gmask_ptr.dtype.element_ty), mask=pm
        )


@triton.jit
def scatter_plan_kernel(
    off_ptr,
    mask_ptr,
    gcols_ptr,
    contrib_ptr,
    target_ptr,
    corner_y,
    corner_x,
    C,
    H,
    W,
    Wo,
    P,
    Cg,
    G,
    K,
    kw,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    n_pb,
    n_cb,
    HAS_MASK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INDEX_64: tl.constexpr,
    ACC: tl.constexpr,
):
    """For the deterministic backward: one bilinear corner's (``corner_y``, ``corner_x`` in
    {0, 1}) contribution to the input gradient of every column element, and where it goes: a
    flat index into the zero-padded ``(n, C, H + 2, W + 2)`` gradient (corners outside the image
    land in the padding). Laid out like the columns, for one ``scatter_add_``."""
    n, g, k, cb, pb = _program(n_pb, n_cb, K, G, INDEX_64)
    p, pm, y0, x0, ly, lx, m, _inside = _corners(
        off_ptr, mask_ptr, n, g, k, pb, G, K, kw, H, W, P, Wo, sh, sw, ph, pw, dh, dw,
        HAS_MASK, BLOCK_P, INDEX_64, ACC,
    )  # fmt: skip
    wy = corner_y * ly + (1 - corner_y) * (1 - ly)
    wx = corner_x * lx + (1 - corner_x) * (1 - lx)
    w = wy * wx * m
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < Cg
    ch = g * Cg + c
    rows = (n * C + ch) * K + k
    at = rows[:, None] * P + p[None, :]
    ok = cm[:, None] & pm[None, :]
    gc = tl.load(gcols_ptr + at, mask=ok, other=0.0).to(ACC)
    tl.store(contrib_ptr + at, (gc * w[None, :]).to(contrib_ptr.dtype.element_ty), mask=ok)
    plane = (H + 2) * (W + 2)
    spot = (y0 + corner_y + 1) * (W + 2) + (x0 + corner_x + 1)
    target = (n * C + ch)[:, None] * plane + spot[None, :]
    tl.store(target_ptr + at, target.to(tl.int64), mask=ok)
