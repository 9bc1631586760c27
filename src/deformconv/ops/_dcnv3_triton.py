"""Triton kernel for DCNv3/DCNv4 on CUDA devices: the host side.

The kernels (:mod:`deformconv.ops._dcnv3_triton_kernels`) give each program a block of output
pixels of one (image, group); it computes each point's bilinear footing once per block of
channels. The host code follows the launch rules of :mod:`deformconv.ops._launch`, as the
deformable-convolution kernels do: one-axis grids split over images to stay within CUDA's
limits, the int64 variant when a tensor's extent can pass int32, allocations and launches under
the input's device, float16/bfloat16 loaded and stored in their own dtype and computed in
float32 (``NATIVE_LOW_PRECISION``).

Backward. The input gradient is accumulated with atomic additions by default (its last bits may
vary between runs); under ``torch.use_deterministic_algorithms(True)`` a kernel writes each
corner's contributions and destinations and ``Tensor.scatter_add_``, deterministic on CUDA in
that mode, adds them up (slower, and chunked by the workspace budget). Offset and mask gradients
never use atomics.

The kernels also run on the CPU under ``TRITON_INTERPRET=1``, which is how the tests check them
on machines without a GPU. ``offset`` and ``mask`` are the same ``offset_mask`` tensor when
``sampling.packed``; the backward then returns its gradient twice.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from deformconv.ops import _launch
from deformconv.ops._dcnv3_geometry import Sampling
from deformconv.ops._dcnv3_triton_kernels import (
    backward_kernel,
    forward_kernel,
    scatter_plan_kernel,
)
from deformconv.ops._launch import cdiv, on_tensor_device
from deformconv.ops._triton import _SORT_BYTES_PER_ELEMENT, KERNEL_FAULTS, _acc_dtype, _tl_acc
from deformconv.ops._workspace import batch_chunks

__all__ = ["KERNEL_FAULTS", "NATIVE_LOW_PRECISION", "backward", "forward"]

NATIVE_LOW_PRECISION = True

_BLOCK_Q = 32
_MAX_BLOCK_D = 32
# Bytes per contribution of the deterministic path: the value, its int64 destination and the
# sort buffers of PyTorch's deterministic scatter_add_.
_SCATTER_BYTES = 4 + 8 + _SORT_BYTES_PER_ELEMENT


def _sizes(s: Sampling) -> tuple[int, ...]:
    """The geometry arguments every kernel takes, in their order (``H`` to ``m_start``)."""
    return (
        s.height, s.width, s.out_w, s.pixels, s.group, s.group_channels, s.points, s.centre,
        s.kernel_h, s.stride_h, s.stride_w, s.origin_y, s.origin_x, s.dilation_h, s.dilation_w,
        s.half_h, s.half_w, s.offset_row, s.offset_group, s.mask_row, s.mask_group, s.mask_start,
    )  # fmt: skip


def _blocks(s: Sampling) -> tuple[int, int]:
    """``(BLOCK_D, pixel blocks per (image, group))``."""
    return min(triton.next_power_of_2(s.group_channels), _MAX_BLOCK_D), cdiv(s.pixels, _BLOCK_Q)


def _launches(n: int, s: Sampling) -> list[tuple[int, int, tuple[int]]]:
    """``(start, stop, grid)`` of the launches covering ``n`` images."""
    return _launch.grids(n, s.group * _blocks(s)[1])


def _rows(t: Tensor) -> Tensor:
    """``t`` as contiguous ``(N * Ho * Wo, width)`` rows (the strides of :class:`Sampling`)."""
    return t.contiguous().view(-1, t.shape[-1])


def _scale(input: Tensor, s: Sampling) -> Tensor:
    # A tensor, not a float argument: Triton would pass a float as float32.
    return torch.tensor([s.offset_scale], dtype=_acc_dtype(input.dtype), device=input.device)


@on_tensor_device
def forward(input: Tensor, offset: Tensor, mask: Tensor, s: Sampling) -> Tensor:
    """DCNv3/DCNv4 core, output ``(N, Ho, Wo, G * D)`` in the input's dtype."""
    n = input.shape[0]
    off = _rows(offset)
    msk = off if s.packed else _rows(mask)
    out = input.new_empty((n, s.out_h, s.out_w, s.channels))
    block_d, n_qb = _blocks(s)
    scale = _scale(input, s)
    for a, b, grid in _launches(n, s):
        xs = input[a:b]
        offs = off[a * s.pixels : b * s.pixels]
        ms = msk[a * s.pixels : b * s.pixels]
        outs = out[a:b]
        _launch.launch(
            forward_kernel, grid, xs, offs, ms, scale, outs, *_sizes(s), *xs.stride(), n_qb,
            BLOCK_Q=_BLOCK_Q, BLOCK_D=block_d, INDEX_64=_launch.needs_int64(xs, offs, ms, outs),
            ACC=_tl_acc(input.dtype),
        )  # fmt: skip
    return out


def _grad_buffers(offset: Tensor, mask: Tensor, s: Sampling) -> tuple[Tensor, Tensor]:
    if s.packed:
        # DCNv4's padding columns are never written: they stay zero.
        grad = torch.zeros(offset.shape, dtype=offset.dtype, device=offset.device)
        return grad, grad
    return (
        torch.empty(offset.shape, dtype=offset.dtype, device=offset.device),
        torch.empty(mask.shape, dtype=mask.dtype, device=mask.device),
    )


def _deterministic_input_grad(
    off: Tensor, msk: Tensor, scale: Tensor, gout: Tensor, s: Sampling, acc_dtype: torch.dtype
) -> Tensor:
    """The input gradient of ``gout``'s images without atomics, in ``acc_dtype``: per bilinear
    corner a kernel writes the contributions and their destinations, and a deterministic
    ``scatter_add_`` sums them into a zero-bordered ``(n, H + 2, W + 2, C)`` buffer."""
    n = gout.shape[0]
    padded = torch.zeros(
        (n, s.height + 2, s.width + 2, s.channels), dtype=acc_dtype, device=gout.device
    )
    block_d, n_qb = _blocks(s)
    per_image = s.pixels * s.group * s.points * s.group_channels
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        for a, b, grid in _launches(n, s):
            rows = slice(a * s.pixels, b * s.pixels)
            gs, dest = gout[a:b], padded[a:b]
            contrib = torch.empty((b - a) * per_image, dtype=acc_dtype, device=gout.device)
            target = torch.empty((b - a) * per_image, dtype=torch.int64, device=gout.device)
            _launch.launch(
                scatter_plan_kernel, grid, off[rows], msk[rows], scale, gs, contrib, target, dy,
                dx, *_sizes(s), n_qb, BLOCK_Q=_BLOCK_Q, BLOCK_D=block_d,
                INDEX_64=_launch.needs_int64(off[rows], msk[rows], gs, contrib, dest),
                ACC=_tl_acc(gout.dtype),
            )  # fmt: skip
            dest.view(-1).scatter_add_(0, target, contrib)
            del contrib, target
    return padded[:, 1:-1, 1:-1]


@on_tensor_device
def backward(
    grad_out: Tensor, input: Tensor, offset: Tensor, mask: Tensor, s: Sampling
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients with respect to input, offset and mask (contiguous, their shapes and dtypes)."""
    n = input.shape[0]
    acc_dtype, acc_tl = _acc_dtype(input.dtype), _tl_acc(input.dtype)
    off = _rows(offset)
    msk = off if s.packed else _rows(mask)
    gout = grad_out.contiguous()
    grad_offset, grad_mask = _grad_buffers(offset, mask, s)
    goff = grad_offset.view(-1, offset.shape[-1])
    gmsk = goff if s.packed else grad_mask.view(-1, mask.shape[-1])
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    scale = _scale(input, s)
    block_d, n_qb = _blocks(s)
    if deterministic:
        per_image = s.pixels * s.channels * s.points * _SCATTER_BYTES
    else:
        per_image = s.height * s.width * s.channels * acc_dtype.itemsize
    for start, stop in batch_chunks(n, per_image):
        chunk_rows = slice(start * s.pixels, stop * s.pixels)
        xs = input[start:stop]
        if deterministic:
            acc = None
        elif acc_dtype == input.dtype:
            acc = grad_input[start:stop].zero_()
        else:
            acc = torch.zeros(xs.shape, dtype=acc_dtype, device=input.device)
        for a, b, grid in _launches(stop - start, s):
            rows = slice(chunk_rows.start + a * s.pixels, chunk_rows.start + b * s.pixels)
            xa, ga = xs[a:b], gout[start + a : start + b]
            gxa = ga if acc is None else acc[a:b]
            _launch.launch(
                backward_kernel, grid, xa, off[rows], msk[rows], scale, ga, gxa, goff[rows],
                gmsk[rows], *_sizes(s), *xa.stride(), n_qb, INPUT_GRAD=acc is not None,
                BLOCK_Q=_BLOCK_Q, BLOCK_D=block_d,
                INDEX_64=_launch.needs_int64(xa, off[rows], msk[rows], ga, gxa, goff[rows]),
                ACC=acc_tl,
            )  # fmt: skip
        if deterministic:
            grad_input[start:stop] = _deterministic_input_grad(
                off[chunk_rows], msk[chunk_rows], scale, gout[start:stop], s, acc_dtype
            )
        elif acc_dtype != input.dtype:
            grad_input[start:stop] = acc
    return grad_input, grad_offset, grad_mask
