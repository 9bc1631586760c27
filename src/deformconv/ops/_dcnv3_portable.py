"""Portable DCNv3/DCNv4 kernel in plain PyTorch operations.

It runs on any device PyTorch supports and is the reference the fast kernels are tested against.
Each sampling point is handled in turn: its four bilinear corners are gathered from the
channels-last input (an extra zero pixel at the end stands in for every corner outside the
image), weighted and added into the output. Only one point's samples exist at a time, and the
batch is walked in chunks that fit the workspace budget, so memory is bounded for any batch size
and kernel. The backward pass uses the same plan: input gradients by ``scatter_add_``, offset and
mask gradients from per-corner channel sums.

Both functions expect validated arguments (see :mod:`deformconv.ops.dcnv3`), float32 or float64,
batch >= 1, any memory layout. ``offset`` and ``mask`` are the same ``offset_mask`` tensor when
``sampling.packed``; the backward then returns its gradient twice.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from deformconv.ops._dcnv3_geometry import Sampling
from deformconv.ops._workspace import batch_chunks

# Peak bytes per output element of a chunk: forward keeps the output, a gathered corner and a
# product; backward also keeps the gradient of the input and the corner sums.
_FORWARD_COPIES = 4
_BACKWARD_COPIES = 8


def _views(offset: Tensor, mask: Tensor, s: Sampling) -> tuple[Tensor, Tensor]:
    """Offsets as ``(N, Q, G, P, 2)`` and mask as ``(N, Q, G, P)`` views of either layout."""
    n = offset.shape[0]
    p = s.points
    if s.packed:
        rows = offset.reshape(n, s.pixels, s.offset_width)[..., : s.group * 3 * p]
        groups = rows.unflatten(-1, (s.group, 3 * p))
        return groups[..., : 2 * p].unflatten(-1, (p, 2)), groups[..., 2 * p :]
    return offset.reshape(n, s.pixels, s.group, p, 2), mask.reshape(n, s.pixels, s.group, p)


class _Point:
    """The bilinear footing of one sampling point for every (image, pixel, group) of a chunk.

    ``index[k]`` are flat pixel indices into the input with its extra zero pixel ``H * W``
    (where corner ``k`` is outside the image), ``weight[k]`` the bilinear weights of corner
    ``k`` (top-left, top-right, bottom-left, bottom-right), ``ly``/``lx`` the fractional parts
    and ``inside`` whether the position is in ``[-1, H) x [-1, W)``, the only positions with an
    offset gradient (torchvision's rule; NaN and infinity are outside). Shapes ``(n, Q, G)``.
    """

    def __init__(self, offset: Tensor, s: Sampling, tap_x: float, tap_y: float) -> None:
        opts = dict(dtype=offset.dtype, device=offset.device)
        oy = (torch.arange(s.out_h, **opts) * s.stride_h + s.origin_y).repeat_interleave(s.out_w)
        ox = (torch.arange(s.out_w, **opts) * s.stride_w + s.origin_x).repeat(s.out_h)
        y = oy.view(1, -1, 1) + (tap_y + offset[..., 1]) * s.offset_scale
        x = ox.view(1, -1, 1) + (tap_x + offset[..., 0]) * s.offset_scale
        self.inside = (y >= -1) & (y < s.height) & (x >= -1) & (x < s.width)
        # Outside positions move to (-2, -2), whose four corners are all outside.
        y = torch.where(self.inside, y, -2.0)
        x = torch.where(self.inside, x, -2.0)
        y0 = y.floor()
        x0 = x.floor()
        self.ly = y - y0
        self.lx = x - x0
        hy = 1 - self.ly
        hx = 1 - self.lx
        y0 = y0.long()
        x0 = x0.long()
        outside = s.height * s.width
        index, weight = [], []
        for dy, wy in ((0, hy), (1, self.ly)):
            for dx, wx in ((0, hx), (1, self.lx)):
                yy, xx = y0 + dy, x0 + dx
                ok = (yy >= 0) & (yy < s.height) & (xx >= 0) & (xx < s.width)
                index.append(torch.where(ok, yy * s.width + xx, outside))
                weight.append(wy * wx)
        self.index = index
        self.weight = weight


def _points(offset: Tensor, s: Sampling) -> Iterator[tuple[int, _Point]]:
    tap_x, tap_y = s.taps()
    for p in range(s.points):
        yield p, _Point(offset[..., p, :], s, float(tap_x[p]), float(tap_y[p]))


def _planes(x: Tensor, s: Sampling) -> Tensor:
    """``(n, H * W + 1, G, D)``: the input's pixels and one zero pixel."""
    n = x.shape[0]
    flat = x.reshape(n, s.height * s.width, s.group, s.group_channels)
    return torch.cat((flat, flat.new_zeros(n, 1, s.group, s.group_channels)), dim=1)


def _gather(planes: Tensor, index: Tensor) -> Tensor:
    n, q, g = index.shape
    return torch.gather(planes, 1, index.unsqueeze(-1).expand(n, q, g, planes.shape[-1]))


def _chunks(input: Tensor, s: Sampling, copies: int) -> list[tuple[int, int]]:
    per_image = copies * s.pixels * s.channels * input.element_size()
    return batch_chunks(input.shape[0], per_image)


def forward(input: Tensor, offset: Tensor, mask: Tensor, s: Sampling) -> Tensor:
    """DCNv3/DCNv4 core, output ``(N, Ho, Wo, G * D)``."""
    n = input.shape[0]
    out = input.new_empty((n, s.pixels, s.group, s.group_channels))
    offsets, masks = _views(offset, mask, s)
    for start, stop in _chunks(input, s, _FORWARD_COPIES):
        planes = _planes(input[start:stop], s)
        m = masks[start:stop]
        acc = None
        for p, point in _points(offsets[start:stop], s):
            for index, weight in zip(point.index, point.weight, strict=True):
                term = _gather(planes, index) * (weight * m[..., p]).unsqueeze(-1)
                acc = term if acc is None else acc.add_(term)
        assert acc is not None
        out[start:stop] = acc
    return out.view(n, s.out_h, s.out_w, s.channels)


def backward(
    grad_out: Tensor, input: Tensor, offset: Tensor, mask: Tensor, s: Sampling
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients with respect to input, offset and mask (contiguous, their shapes)."""
    n = input.shape[0]
    grad_input = input.new_empty((n, s.height * s.width, s.group, s.group_channels))
    if s.packed:
        grad_offset = offset.new_zeros(offset.shape)
        grad_mask = grad_offset
    else:
        grad_offset = offset.new_empty(offset.shape)
        grad_mask = mask.new_empty(mask.shape)
    offsets, masks = _views(offset, mask, s)
    g_offsets, g_masks = _views(grad_offset, grad_mask, s)
    grads = grad_out.reshape(n, s.pixels, s.group, s.group_channels)
    for start, stop in _chunks(input, s, _BACKWARD_COPIES):
        planes = _planes(input[start:stop], s)
        g = grads[start:stop]
        m = masks[start:stop]
        grad_planes = torch.zeros_like(planes)
        for p, point in _points(offsets[start:stop], s):
            mp = m[..., p]
            # sums[k]: the gradient of the sample with respect to corner k's value weight.
            sums = []
            for index, weight in zip(point.index, point.weight, strict=True):
                idx = index.unsqueeze(-1).expand_as(g)
                grad_planes.scatter_add_(1, idx, g * (weight * mp).unsqueeze(-1))
                sums.append((_gather(planes, index) * g).sum(-1))
            s00, s01, s10, s11 = sums
            ly, lx = point.ly, point.lx
            grad_x = mp * ((1 - ly) * (s01 - s00) + ly * (s11 - s10)) * s.offset_scale
            grad_y = mp * ((1 - lx) * (s10 - s00) + lx * (s11 - s01)) * s.offset_scale
            zero = torch.zeros((), dtype=grad_x.dtype, device=grad_x.device)
            g_offsets[start:stop, :, :, p, 0] = torch.where(point.inside, grad_x, zero)
            g_offsets[start:stop, :, :, p, 1] = torch.where(point.inside, grad_y, zero)
            g_masks[start:stop, :, :, p] = sum(
                w * sk for w, sk in zip(point.weight, sums, strict=True)
            )
        grad_input[start:stop] = grad_planes[:, :-1]
    return grad_input.view(input.shape), grad_offset, grad_mask
