"""Triton kernels for deformable convolution on CUDA devices.

Sampling runs in Triton: one program per (block of output pixels, image, offset group, tap,
block of channels) computes the bilinear coordinates and weights once and applies them to its
channels. The contraction stays with cuBLAS (``torch.matmul``), through the same helpers as the
portable kernel. The backward's input gradient is accumulated with atomic additions, so, as with
torchvision's CUDA kernel, its last bits may vary between runs; offset, mask and weight gradients
are deterministic.

The kernels also run on the CPU under ``TRITON_INTERPRET=1``, which is how the tests check them on
machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from deformconv.ops._portable import Pair, _bytes_per_image, _cols_grad, _contract, _weight_grad
from deformconv.ops._workspace import batch_chunks

_BLOCK_P = 64


@triton.jit
def _corners(
    off_ptr,
    mask_ptr,
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
):
    """This program's image, offset group, tap and block of pixels (from program ids 0 and 1),
    and the bilinear corner coordinates and (modulated) weights of those pixels."""
    pid_ngk = tl.program_id(1)
    k = pid_ngk % K
    g = (pid_ngk // K) % G
    n = (pid_ngk // (K * G)).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    oy = p // Wo
    ox = p % Wo
    i = k // kw
    j = k % kw
    obase = off_ptr + ((n * G + g) * K + k) * 2 * P
    dy = tl.load(obase + p, mask=pm, other=0.0)
    dx = tl.load(obase + P + p, mask=pm, other=0.0)
    py = (oy * sh - ph + i * dh).to(dy.dtype) + dy
    px = (ox * sw - pw + j * dw).to(dx.dtype) + dx
    # Outside [-1, H) x [-1, W), or NaN: the tap reads zero and gets no offset gradient (on the
    # edge -1 it reads zero but has a gradient, as in torchvision).
    inside = (py >= -1) & (py < H) & (px >= -1) & (px < W)
    py = tl.where(inside, py, -1.0)
    px = tl.where(inside, px, -1.0)
    y0f = tl.floor(py)
    x0f = tl.floor(px)
    ly = py - y0f
    lx = px - x0f
    y0 = y0f.to(tl.int32)
    x0 = x0f.to(tl.int32)
    if HAS_MASK:
        m = tl.load(mask_ptr + ((n * G + g) * K + k) * P + p, mask=pm, other=0.0)
    else:
        m = tl.full(ly.shape, 1.0, ly.dtype)
    return n, g, k, p, pm, y0, x0, ly, lx, m, inside


@triton.jit
def _ptrs(x_ptr, ch, cm, pm, y, x, H, W, sxc, sxh, sxw):
    """Pointers to one corner for a (channels, pixels) tile, and where they are in the image."""
    ok = pm & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    return x_ptr + ch[:, None] * sxc + (y * sxh + x * sxw)[None, :], cm[:, None] & ok[None, :]


@triton.jit
def _tile(x_ptr, ch, cm, pm, y, x, H, W, sxc, sxh, sxw):
    ptrs, ok = _ptrs(x_ptr, ch, cm, pm, y, x, H, W, sxc, sxh, sxw)
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def _corner_backward(xbase, gbase, gc, ch, cm, pm, y, x, w, H, W, sxc, sxh, sxw):
    """Scatter one corner's share of the column gradient into the (contiguous) input gradient and
    return the channel sum of gradient times value, that corner's weight gradient."""
    ptrs, ok = _ptrs(xbase, ch, cm, pm, y, x, H, W, sxc, sxh, sxw)
    v = tl.load(ptrs, mask=ok, other=0.0)
    gptrs, _ = _ptrs(gbase, ch, cm, pm, y, x, H, W, H * W, W, 1)
    tl.atomic_add(gptrs, gc * w[None, :], mask=ok)
    return tl.sum(gc * v, axis=0)


@triton.jit
def _im2col_kernel(
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
    HAS_MASK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n, g, k, p, pm, y0, x0, ly, lx, m, _inside = _corners(
        off_ptr, mask_ptr, G, K, kw, H, W, P, Wo, sh, sw, ph, pw, dh, dw, HAS_MASK, BLOCK_P
    )
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < Cg
    ch = g * Cg + c
    base = x_ptr + n * sxn
    v00 = _tile(base, ch, cm, pm, y0, x0, H, W, sxc, sxh, sxw)
    v01 = _tile(base, ch, cm, pm, y0, x0 + 1, H, W, sxc, sxh, sxw)
    v10 = _tile(base, ch, cm, pm, y0 + 1, x0, H, W, sxc, sxh, sxw)
    v11 = _tile(base, ch, cm, pm, y0 + 1, x0 + 1, H, W, sxc, sxh, sxw)
    hy = 1 - ly
    hx = 1 - lx
    val = (
        (hy * hx * m)[None, :] * v00
        + (hy * lx * m)[None, :] * v01
        + (ly * hx * m)[None, :] * v10
        + (ly * lx * m)[None, :] * v11
    )
    rows = (n * C + ch) * K + k
    tl.store(cols_ptr + rows[:, None] * P + p[None, :], val, mask=cm[:, None] & pm[None, :])


@triton.jit
def _col2im_kernel(
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
    HAS_MASK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n, g, k, p, pm, y0, x0, ly, lx, m, inside = _corners(
        off_ptr, mask_ptr, G, K, kw, H, W, P, Wo, sh, sw, ph, pw, dh, dw, HAS_MASK, BLOCK_P
    )
    hy = 1 - ly
    hx = 1 - lx
    s00 = tl.zeros([BLOCK_P], dtype=ly.dtype)
    s01 = tl.zeros([BLOCK_P], dtype=ly.dtype)
    s10 = tl.zeros([BLOCK_P], dtype=ly.dtype)
    s11 = tl.zeros([BLOCK_P], dtype=ly.dtype)
    xbase = x_ptr + n * sxn
    # The input gradient is contiguous (N, C, H, W).
    gbase = gx_ptr + n * C * H * W
    for c0 in range(0, Cg, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < Cg
        ch = g * Cg + c
        rows = (n * C + ch) * K + k
        gc = tl.load(
            gcols_ptr + rows[:, None] * P + p[None, :], mask=cm[:, None] & pm[None, :], other=0.0
        )
        s00 += _corner_backward(
            xbase, gbase, gc, ch, cm, pm, y0, x0, hy * hx * m, H, W, sxc, sxh, sxw
        )
        s01 += _corner_backward(
            xbase, gbase, gc, ch, cm, pm, y0, x0 + 1, hy * lx * m, H, W, sxc, sxh, sxw
        )
        s10 += _corner_backward(
            xbase, gbase, gc, ch, cm, pm, y0 + 1, x0, ly * hx * m, H, W, sxc, sxh, sxw
        )
        s11 += _corner_backward(
            xbase, gbase, gc, ch, cm, pm, y0 + 1, x0 + 1, ly * lx * m, H, W, sxc, sxh, sxw
        )
    grad_y = tl.where(inside, m * (hx * (s10 - s00) + lx * (s11 - s01)), 0.0)
    grad_x = tl.where(inside, m * (hy * (s01 - s00) + ly * (s11 - s10)), 0.0)
    obase = goff_ptr + ((n * G + g) * K + k) * 2 * P
    tl.store(obase + p, grad_y, mask=pm)
    tl.store(obase + P + p, grad_x, mask=pm)
    if HAS_MASK:
        gm = hy * hx * s00 + hy * lx * s01 + ly * hx * s10 + ly * lx * s11
        tl.store(gmask_ptr + ((n * G + g) * K + k) * P + p, gm, mask=pm)


def _geometry(input: Tensor, offset: Tensor, weight: Tensor) -> dict[str, int]:
    channels, height, width = input.shape[1:]
    kh, kw = weight.shape[2:]
    taps = kh * kw
    groups = offset.shape[1] // (2 * taps)
    out_w = offset.shape[3]
    return {
        "C": channels,
        "H": height,
        "W": width,
        "Wo": out_w,
        "P": offset.shape[2] * out_w,
        "Cg": channels // groups,
        "G": groups,
        "K": taps,
        "kw": kw,
    }


def _block_c(cpg: int) -> int:
    return min(triton.next_power_of_2(cpg), 16)


def _im2col(
    x: Tensor, offset: Tensor, mask: Tensor | None, geo: dict[str, int], params: tuple[int, ...]
) -> Tensor:
    n = x.shape[0]
    cols = torch.empty((n, geo["C"] * geo["K"], geo["P"]), device=x.device, dtype=x.dtype)
    block_c = _block_c(geo["Cg"])
    grid = (
        triton.cdiv(geo["P"], _BLOCK_P),
        n * geo["G"] * geo["K"],
        triton.cdiv(geo["Cg"], block_c),
    )
    _im2col_kernel[grid](
        x,
        offset,
        offset if mask is None else mask,
        cols,
        geo["C"],
        geo["H"],
        geo["W"],
        geo["Wo"],
        geo["P"],
        geo["Cg"],
        geo["G"],
        geo["K"],
        geo["kw"],
        *params,
        *x.stride(),
        HAS_MASK=mask is not None,
        BLOCK_P=_BLOCK_P,
        BLOCK_C=block_c,
    )
    return cols


def forward(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> Tensor:
    """Deformable convolution, output ``(B, O, Ho, Wo)`` (the portable kernel's contract)."""
    batch = input.shape[0]
    offset = offset.contiguous()
    mask = None if mask is None else mask.contiguous()
    geo = _geometry(input, offset, weight)
    params = (*stride, *padding, *dilation)
    out = input.new_empty((batch, weight.shape[0], geo["P"]))
    for start, stop in batch_chunks(batch, _bytes_per_image(input, weight, offset)):
        cols = _im2col(
            input[start:stop],
            offset[start:stop],
            None if mask is None else mask[start:stop],
            geo,
            params,
        )
        out[start:stop] = _contract(cols, weight)
    if bias is not None:
        out += bias.view(1, -1, 1)
    return out.view(batch, weight.shape[0], *offset.shape[2:])


def backward(
    grad_out: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """Gradients for input, offset, mask, weight and bias (the portable kernel's contract)."""
    batch = input.shape[0]
    offset = offset.contiguous()
    mask = None if mask is None else mask.contiguous()
    geo = _geometry(input, offset, weight)
    params = (*stride, *padding, *dilation)
    grad_input = torch.zeros(input.shape, device=input.device, dtype=input.dtype)
    grad_offset = torch.empty_like(offset)
    grad_mask = None if mask is None else torch.empty_like(mask)
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=weight.dtype)
    # Columns and their gradient are alive together.
    block_c = _block_c(geo["Cg"])
    for start, stop in batch_chunks(batch, 2 * _bytes_per_image(input, weight, offset)):
        n = stop - start
        x = input[start:stop]
        off = offset[start:stop]
        m = None if mask is None else mask[start:stop]
        g = grad_out[start:stop].reshape(n, weight.shape[0], -1)
        cols = _im2col(x, off, m, geo, params)
        grad_weight += _weight_grad(cols, g, weight)
        grad_cols = _cols_grad(g, weight, cols.shape).contiguous()
        del cols
        grid = (triton.cdiv(geo["P"], _BLOCK_P), n * geo["G"] * geo["K"])
        _col2im_kernel[grid](
            x,
            off,
            off if m is None else m,
            grad_cols,
            grad_input[start:stop],
            grad_offset[start:stop],
            grad_offset if grad_mask is None else grad_mask[start:stop],
            geo["C"],
            geo["H"],
            geo["W"],
            geo["Wo"],
            geo["P"],
            geo["Cg"],
            geo["G"],
            geo["K"],
            geo["kw"],
            *params,
            *x.stride(),
            HAS_MASK=m is not None,
            BLOCK_P=_BLOCK_P,
            BLOCK_C=block_c,
        )
    grad_bias = None if bias is None else grad_out.sum(dim=(0, 2, 3))
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias
