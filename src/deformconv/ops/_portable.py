"""Portable deformable-convolution kernel in plain PyTorch operations.

It runs on any device PyTorch supports and is the reference the fast kernels are tested against.
Bilinear sampling is written with ``gather`` on a zero-padded copy of the input, in pixel
coordinates (no normalisation to [-1, 1], so it rounds exactly as torchvision does), and the
contraction is one batched matrix multiply per chunk of images. The backward pass recomputes the
columns of one chunk at a time under autograd, so its memory is bounded like the forward's.

Both functions expect validated arguments (see :func:`deformconv.ops.deform_conv.deform_conv2d`),
float32 or float64, batch >= 1, any memory layout; ``stride``, ``padding`` and ``dilation`` are
``(int, int)`` pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deformconv.ops._workspace import batch_chunks

Pair = tuple[int, int]

# Peak bytes a chunk holds per column element: forward keeps the columns, one gathered corner and
# one product; backward under autograd keeps about twice that.
_FORWARD_COPIES = 3
_BACKWARD_COPIES = 8


class _Plan:
    """Where and with what weights every (image, offset group, tap, pixel) samples the input.

    ``index[c]`` are flat indices into the input padded by one zero pixel on every side, and
    ``bilinear[c]`` the bilinear weights of corner ``c`` (top-left, top-right, bottom-left,
    bottom-right), each of shape ``(n, groups, 1, taps * pixels)``.
    """

    def __init__(
        self,
        offset: Tensor,
        height: int,
        width: int,
        kernel: Pair,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
    ) -> None:
        n = offset.shape[0]
        kh, kw = kernel
        taps = kh * kw
        out_h, out_w = offset.shape[-2:]
        pixels = out_h * out_w
        groups = offset.shape[1] // (2 * taps)
        dev, dt = offset.device, offset.dtype

        tap_y = (torch.arange(kh, device=dev, dtype=dt) * dilation[0]).repeat_interleave(kw)
        tap_x = (torch.arange(kw, device=dev, dtype=dt) * dilation[1]).repeat(kh)
        row = torch.arange(out_h, device=dev, dtype=dt) * stride[0] - padding[0]
        col = torch.arange(out_w, device=dev, dtype=dt) * stride[1] - padding[1]
        base_y = (tap_y.view(taps, 1, 1) + row.view(1, out_h, 1)).expand(taps, out_h, out_w)
        base_x = (tap_x.view(taps, 1, 1) + col.view(1, 1, out_w)).expand(taps, out_h, out_w)

        off = offset.reshape(n, groups, taps, 2, pixels)
        py = base_y.reshape(taps, pixels) + off[:, :, :, 0]
        px = base_x.reshape(taps, pixels) + off[:, :, :, 1]
        # A tap outside [-1, H) x [-1, W), or at a non-finite position, reads zero and has no
        # offset gradient, as in torchvision; comparisons with NaN are false, so NaN lands here.
        # On the edge row or column -1 it reads zero but, as in torchvision, has an offset
        # gradient towards the image.
        inside = (py >= -1) & (py < height) & (px >= -1) & (px < width)
        py = torch.where(inside, py, -1.0)
        px = torch.where(inside, px, -1.0)
        y0 = py.floor()
        x0 = px.floor()
        ly = py - y0
        lx = px - x0
        hy = 1 - ly
        hx = 1 - lx
        # Row -1 and row H of the padded input are zeros, and so are columns -1 and W.
        padded_w = width + 2
        top = (y0.long() + 1) * padded_w + (x0.long() + 1)
        shape = (n, groups, 1, taps * pixels)
        self.index = tuple(
            i.reshape(shape) for i in (top, top + 1, top + padded_w, top + padded_w + 1)
        )
        self.bilinear = tuple(w.reshape(shape) for w in (hy * hx, hy * lx, ly * hx, ly * lx))
        self.ly, self.lx = ly.reshape(shape), lx.reshape(shape)
        self.inside = inside.reshape(shape)
        self.groups = groups
        self.taps = taps
        self.pixels = pixels


def _padded(x: Tensor, groups: int) -> Tensor:
    n, channels, height, width = x.shape
    return F.pad(x, (1, 1, 1, 1)).reshape(n, groups, channels // groups, (height + 2) * (width + 2))


def _columns(x: Tensor, plan: _Plan, mask: Tensor | None) -> Tensor:
    """Bilinearly sampled, modulated columns of shape ``(n, C * kh * kw, Ho * Wo)``."""
    n, channels = x.shape[:2]
    xp = _padded(x, plan.groups)
    size = (*xp.shape[:3], plan.taps * plan.pixels)
    modulation = None if mask is None else mask.reshape(n, plan.groups, 1, -1)
    cols = None
    for index, weight in zip(plan.index, plan.bilinear, strict=True):
        w = weight if modulation is None else weight * modulation
        term = torch.gather(xp, 3, index.expand(size)) * w
        cols = term if cols is None else cols.add_(term)
    assert cols is not None
    return cols.reshape(n, channels * plan.taps, plan.pixels)


def _contract(cols: Tensor, weight: Tensor) -> Tensor:
    """``(n, C*K, P) x (O, C/g, kh, kw) -> (n, O, P)`` for ``g`` weight groups."""
    n, ck, pixels = cols.shape
    out_channels = weight.shape[0]
    wgroups = ck // (weight.shape[1] * weight.shape[2] * weight.shape[3])
    w = weight.reshape(wgroups, out_channels // wgroups, -1)
    out = torch.matmul(w, cols.reshape(n, wgroups, ck // wgroups, pixels))
    return out.reshape(n, out_channels, pixels)


def _bytes_per_image(input: Tensor, weight: Tensor, offset: Tensor) -> int:
    taps = weight.shape[2] * weight.shape[3]
    pixels = offset.shape[2] * offset.shape[3]
    return input.shape[1] * taps * pixels * input.element_size()


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
    """Deformable convolution, output ``(B, O, Ho, Wo)``."""
    batch = input.shape[0]
    kernel = (weight.shape[2], weight.shape[3])
    out_h, out_w = offset.shape[-2:]
    out = input.new_empty((batch, weight.shape[0], out_h * out_w))
    chunks = batch_chunks(batch, _FORWARD_COPIES * _bytes_per_image(input, weight, offset))
    for start, stop in chunks:
        plan = _Plan(offset[start:stop], *input.shape[2:], kernel, stride, padding, dilation)
        m = None if mask is None else mask[start:stop]
        cols = _columns(input[start:stop], plan, m)
        out[start:stop] = _contract(cols, weight)
    if bias is not None:
        out += bias.view(1, -1, 1)
    return out.view(batch, weight.shape[0], out_h, out_w)


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
    """Gradients with respect to input, offset, mask (``None`` without one), weight and bias."""
    batch = input.shape[0]
    kernel = (weight.shape[2], weight.shape[3])
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
    grad_offset = torch.empty_like(offset, memory_format=torch.contiguous_format)
    grad_mask = (
        None if mask is None else torch.empty_like(mask, memory_format=torch.contiguous_format)
    )
    grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    chunks = batch_chunks(batch, _BACKWARD_COPIES * _bytes_per_image(input, weight, offset))
    for start, stop in chunks:
        x = input[start:stop]
        m = None if mask is None else mask[start:stop]
        plan = _Plan(offset[start:stop], *input.shape[2:], kernel, stride, padding, dilation)
        g = grad_out[start:stop].reshape(stop - start, weight.shape[0], -1)
        grad_weight += _weight_grad(_columns(x, plan, m), g, weight)
        grad_cols = _cols_grad(g, weight, (stop - start, x.shape[1] * plan.taps, plan.pixels))
        gi, go, gm = _sampling_grad(x, plan, m, grad_cols)
        grad_input[start:stop] = gi
        grad_offset[start:stop] = go.view(grad_offset[start:stop].shape)
        if grad_mask is not None:
            assert gm is not None
            grad_mask[start:stop] = gm.view(grad_mask[start:stop].shape)
    grad_bias = None if bias is None else grad_out.sum(dim=(0, 2, 3))
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias


def _weight_grad(cols: Tensor, grad: Tensor, weight: Tensor) -> Tensor:
    """``sum_n grad[n] @ cols[n]^T`` per weight group, shaped like ``weight``."""
    n, ck, pixels = cols.shape
    out_channels = weight.shape[0]
    wgroups = ck // (weight.shape[1] * weight.shape[2] * weight.shape[3])
    g = grad.reshape(n, wgroups, out_channels // wgroups, pixels).transpose(0, 1)
    c = cols.reshape(n, wgroups, ck // wgroups, pixels).transpose(0, 1)
    gw = torch.matmul(
        g.transpose(1, 2).reshape(wgroups, out_channels // wgroups, n * pixels),
        c.transpose(1, 2).reshape(wgroups, ck // wgroups, n * pixels).transpose(1, 2),
    )
    return gw.reshape(weight.shape)


def _cols_grad(grad: Tensor, weight: Tensor, shape: torch.Size) -> Tensor:
    """``weight^T @ grad`` per weight group: the gradient of the columns."""
    n, ck, pixels = shape
    out_channels = weight.shape[0]
    wgroups = ck // (weight.shape[1] * weight.shape[2] * weight.shape[3])
    w = weight.reshape(wgroups, out_channels // wgroups, ck // wgroups)
    g = grad.reshape(n, wgroups, out_channels // wgroups, pixels)
    return torch.matmul(w.transpose(1, 2), g).reshape(n, ck, pixels)


def _sampling_grad(
    x: Tensor, plan: _Plan, mask: Tensor | None, grad_cols: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of the columns with respect to the input, the offsets and the mask."""
    n, channels, height, width = x.shape
    xp = _padded(x, plan.groups)
    size = (*xp.shape[:3], plan.taps * plan.pixels)
    gc = grad_cols.reshape(size)
    modulation = None if mask is None else mask.reshape(n, plan.groups, 1, -1)
    grad_xp = torch.zeros_like(xp)
    # s[c]: the gradient with respect to corner c's (modulated) weight, summed over channels.
    s = []
    for index, weight in zip(plan.index, plan.bilinear, strict=True):
        w = weight if modulation is None else weight * modulation
        grad_xp.scatter_add_(3, index.expand(size), gc * w)
        s.append((torch.gather(xp, 3, index.expand(size)) * gc).sum(dim=2, keepdim=True))
    s00, s01, s10, s11 = s
    ly, lx = plan.ly, plan.lx
    grad_y = (1 - lx) * (s10 - s00) + lx * (s11 - s01)
    grad_x = (1 - ly) * (s01 - s00) + ly * (s11 - s10)
    if modulation is not None:
        grad_y = grad_y * modulation
        grad_x = grad_x * modulation
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    grad_y = torch.where(plan.inside, grad_y, zero)
    grad_x = torch.where(plan.inside, grad_x, zero)
    grad_offset = torch.stack(
        (
            grad_y.reshape(n, plan.groups, plan.taps, plan.pixels),
            grad_x.reshape(n, plan.groups, plan.taps, plan.pixels),
        ),
        dim=3,
    ).reshape(n, 2 * plan.groups * plan.taps, plan.pixels)
    grad_mask = None
    if mask is not None:
        grad_mask = sum(b * sc for b, sc in zip(plan.bilinear, s, strict=True))
        grad_mask = grad_mask.reshape(n, plan.groups * plan.taps, plan.pixels)
    grad_input = grad_xp.reshape(n, channels, height + 2, width + 2)[:, :, 1:-1, 1:-1]
    return grad_input, grad_offset, grad_mask
