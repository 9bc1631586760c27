"""Triton kernels for deformable convolution on CUDA devices: the host side.

Sampling runs in Triton (:mod:`deformconv.ops._triton_kernels`): each program computes the
bilinear coordinates and weights of one block of pixels for one (image, offset group, tap) once
and applies them to a block of channels. The contraction stays with cuBLAS (``torch.matmul``),
through the same helpers as the portable kernel. The host code makes what Triton's CPU
interpreter cannot check hold by construction (see :mod:`deformconv.ops._launch`):

- every launch has a one-axis grid, split over images so that it stays within CUDA's limits;
- a launch whose tensors can be addressed past int32 runs the kernels' int64 variant;
- allocations and launches run under ``torch.cuda.device(input.device)``;
- float16 and bfloat16 tensors are loaded and stored in their own dtype and computed in float32
  (``NATIVE_LOW_PRECISION``): columns and their gradient stay in the input's dtype, the input
  and weight gradients of a chunk are accumulated in float32 and stored back in the input's dtype.

Backward. By default the input gradient is accumulated with atomic additions (as in
torchvision's CUDA kernel, its last bits may vary between runs). Under
``torch.use_deterministic_algorithms(True)`` it takes a path without atomics: a kernel writes
each bilinear corner's contributions and their destinations, and ``Tensor.scatter_add_``, which
PyTorch makes deterministic on CUDA in that mode, adds them up; it is slower and uses more
workspace (smaller chunks). Offset, mask and weight gradients never use atomics.

The kernels also run on the CPU under ``TRITON_INTERPRET=1``, which is how the tests check them on
machines without a GPU.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from deformconv.ops import _launch
from deformconv.ops._launch import GridLimitError, KernelLaunchError, cdiv, on_tensor_device
from deformconv.ops._portable import Pair, _cols_grad, _contract, _weight_grad
from deformconv.ops._triton_kernels import col2im_kernel, im2col_kernel, scatter_plan_kernel
from deformconv.ops._workspace import batch_chunks

# The operator passes float16/bfloat16 tensors straight to this module (no float32 copies).
NATIVE_LOW_PRECISION = True


def _triton_errors() -> tuple[type[BaseException], ...]:
    """Triton's compile and launch errors (their module moved between Triton versions)."""
    found: list[type[BaseException]] = []
    for module, name in (
        ("triton.errors", "TritonError"),
        ("triton.compiler.errors", "CompilationError"),
        ("triton.runtime.errors", "OutOfResources"),
        ("triton.runtime.autotuner", "OutOfResources"),
    ):
        try:
            cls = getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, Exception) and cls not in found:
            found.append(cls)
    return tuple(found)


# Errors that mean "this kernel cannot run this call" whenever they happen (a specialisation
# that does not compile for this GPU, say): the dispatcher then falls back to the portable
# kernel, with a warning, even after earlier calls succeeded.
KERNEL_FAULTS: tuple[type[BaseException], ...] = (
    KernelLaunchError,
    GridLimitError,
    *_triton_errors(),
)

_BLOCK_P = 64
_MAX_BLOCK_C = 16
# Bytes per contribution that PyTorch's deterministic scatter_add_ on CUDA (a sort-based
# index_put_) allocates besides its inputs: sorted keys, their permutation and sort buffers.
_SORT_BYTES_PER_ELEMENT = 32


class _Geometry(NamedTuple):
    """The sizes every kernel takes, in their argument order."""

    C: int  # input channels
    H: int
    W: int
    Wo: int  # output width
    P: int  # output pixels
    Cg: int  # channels per offset group
    G: int  # offset groups
    K: int  # kernel taps
    kw: int  # kernel width


def _geometry(input: Tensor, offset: Tensor, weight: Tensor) -> _Geometry:
    channels, height, width = input.shape[1:]
    kh, kw = weight.shape[2:]
    taps = kh * kw
    groups = offset.shape[1] // (2 * taps)
    out_w = offset.shape[3]
    pixels = offset.shape[2] * out_w
    return _Geometry(channels, height, width, out_w, pixels, channels // groups, groups, taps, kw)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype) -> Any:
    return tl.float64 if dtype == torch.float64 else tl.float32


class _Blocks(NamedTuple):
    """Channel block size, and pixel and channel blocks per (image, offset group, tap)."""

    block_c: int
    n_pb: int  # pixel blocks
    n_cb: int  # channel blocks

    @classmethod
    def of(cls, geo: _Geometry) -> _Blocks:
        block_c = min(triton.next_power_of_2(geo.Cg), _MAX_BLOCK_C)
        return cls(block_c, cdiv(geo.P, _BLOCK_P), cdiv(geo.Cg, block_c))

    def per_image(self, geo: _Geometry, channel_blocks: bool) -> int:
        return geo.G * geo.K * self.n_pb * (self.n_cb if channel_blocks else 1)


def _im2col(
    x: Tensor, offset: Tensor, mask: Tensor | None, geo: _Geometry, params: tuple[int, ...]
) -> Tensor:
    """Columns ``(n, C * K, P)`` in ``x``'s dtype."""
    n = x.shape[0]
    cols = torch.empty((n, geo.C * geo.K, geo.P), device=x.device, dtype=x.dtype)
    blocks = _Blocks.of(geo)
    for a, b, grid in _launch.grids(n, blocks.per_image(geo, channel_blocks=True)):
        xs, offs, cs = x[a:b], offset[a:b], cols[a:b]
        ms = offs if mask is None else mask[a:b]
        _launch.launch(
            im2col_kernel, grid, xs, offs, ms, cs, *geo, *params, *xs.stride(),
            blocks.n_pb, blocks.n_cb,
            HAS_MASK=mask is not None, BLOCK_P=_BLOCK_P, BLOCK_C=blocks.block_c,
            INDEX_64=_launch.needs_int64(xs, offs, ms, cs), ACC=_tl_acc(x.dtype),
        )  # fmt: skip
    return cols


@on_tensor_device
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
    """Deformable convolution, output ``(B, O, Ho, Wo)`` in the input's dtype (the portable
    kernel's contract, plus float16 and bfloat16)."""
    batch = input.shape[0]
    offset = offset.contiguous()
    mask = None if mask is None else mask.contiguous()
    geo = _geometry(input, offset, weight)
    params = (*stride, *padding, *dilation)
    out = input.new_empty((batch, weight.shape[0], geo.P))
    cols_bytes = geo.C * geo.K * geo.P * input.element_size()
    for start, stop in batch_chunks(batch, cols_bytes):
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


def _backward_bytes_per_image(geo: _Geometry, dtype: torch.dtype, deterministic: bool) -> int:
    """Workspace of one image in the backward: columns and their gradient, the input-gradient
    accumulator and, on the deterministic path, one corner's contributions and destinations."""
    item = dtype.itemsize
    acc = _acc_dtype(dtype).itemsize
    cols = geo.C * geo.K * geo.P
    if deterministic:
        scatter = cols * (acc + 8 + _SORT_BYTES_PER_ELEMENT)
        return 2 * cols * item + geo.C * (geo.H + 2) * (geo.W + 2) * acc + scatter
    separate_acc = acc != item
    return 2 * cols * item + (geo.C * geo.H * geo.W * acc if separate_acc else 0)


def _offset_mask_grads(
    x: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    grad_cols: Tensor,
    grad_acc: Tensor | None,
    grad_offset: Tensor,
    grad_mask: Tensor | None,
    geo: _Geometry,
    params: tuple[int, ...],
) -> None:
    """Offset and mask gradients of a chunk; with ``grad_acc`` (contiguous ``(n, C, H, W)`` in the
    compute dtype), also the input gradient, added atomically into it."""
    blocks = _Blocks.of(geo)
    for a, b, grid in _launch.grids(x.shape[0], blocks.per_image(geo, channel_blocks=False)):
        xs, offs, gcs, goffs = x[a:b], offset[a:b], grad_cols[a:b], grad_offset[a:b]
        ms = offs if mask is None else mask[a:b]
        gms = goffs if grad_mask is None else grad_mask[a:b]
        gxs = gcs if grad_acc is None else grad_acc[a:b]
        _launch.launch(
            col2im_kernel, grid, xs, offs, ms, gcs, gxs, goffs, gms, *geo, *params, *xs.stride(),
            blocks.n_pb,
            HAS_MASK=mask is not None, INPUT_GRAD=grad_acc is not None, BLOCK_P=_BLOCK_P,
            BLOCK_C=blocks.block_c, INDEX_64=_launch.needs_int64(xs, offs, ms, gcs, gxs, goffs),
            ACC=_tl_acc(x.dtype),
        )  # fmt: skip


def _deterministic_input_grad(
    offset: Tensor, mask: Tensor | None, grad_cols: Tensor, geo: _Geometry, params: tuple[int, ...]
) -> Tensor:
    """The input gradient of a chunk without atomics, in the compute dtype: per bilinear corner,
    a kernel writes each column element's contribution and destination, and a deterministic
    ``scatter_add_`` sums them into a zero-padded ``(n, C, H + 2, W + 2)`` buffer."""
    n = offset.shape[0]
    acc_dtype = _acc_dtype(grad_cols.dtype)
    padded = torch.zeros((n, geo.C, geo.H + 2, geo.W + 2), device=grad_cols.device, dtype=acc_dtype)
    blocks = _Blocks.of(geo)
    per_image = blocks.per_image(geo, channel_blocks=True)
    for corner_y, corner_x in ((0, 0), (0, 1), (1, 0), (1, 1)):
        for a, b, grid in _launch.grids(n, per_image):
            offs, gcs, dest = offset[a:b], grad_cols[a:b], padded[a:b]
            ms = offs if mask is None else mask[a:b]
            contrib = torch.empty(gcs.shape, device=gcs.device, dtype=acc_dtype)
            target = torch.empty(gcs.shape, device=gcs.device, dtype=torch.int64)
            _launch.launch(
                scatter_plan_kernel, grid, offs, ms, gcs, contrib, target, corner_y, corner_x,
                *geo, *params, blocks.n_pb, blocks.n_cb,
                HAS_MASK=mask is not None, BLOCK_P=_BLOCK_P, BLOCK_C=blocks.block_c,
                INDEX_64=_launch.needs_int64(offs, ms, gcs, dest), ACC=_tl_acc(gcs.dtype),
            )  # fmt: skip
            # Destinations are flat indices into this launch's images of the padded buffer.
            dest.view(-1).scatter_add_(0, target.view(-1), contrib.view(-1))
            del contrib, target
    return padded[:, :, 1:-1, 1:-1]


@on_tensor_device
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
    """Gradients for input, offset, mask, weight and bias, in the tensors' dtype (the portable
    kernel's contract, plus float16 and bfloat16)."""
    batch = input.shape[0]
    dtype = input.dtype
    acc_dtype = _acc_dtype(dtype)
    offset = offset.contiguous()
    mask = None if mask is None else mask.contiguous()
    geo = _geometry(input, offset, weight)
    params = (*stride, *padding, *dilation)
    deterministic = torch.are_deterministic_algorithms_enabled()
    grad_input = torch.empty(input.shape, device=input.device, dtype=dtype)
    grad_offset = torch.empty_like(offset)
    grad_mask = None if mask is None else torch.empty_like(mask)
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=acc_dtype)
    per_image = _backward_bytes_per_image(geo, dtype, deterministic)
    for start, stop in batch_chunks(batch, per_image):
        n = stop - start
        x = input[start:stop]
        off = offset[start:stop]
        m = None if mask is None else mask[start:stop]
        g = grad_out[start:stop].reshape(n, weight.shape[0], -1)
        cols = _im2col(x, off, m, geo, params)
        grad_weight += _weight_grad(cols, g, weight)
        grad_cols = _cols_grad(g, weight, cols.shape).contiguous()
        del cols
        gm = None if grad_mask is None else grad_mask[start:stop]
        if deterministic:
            _offset_mask_grads(x, off, m, grad_cols, None, grad_offset[start:stop], gm, geo, params)
            grad_input[start:stop] = _deterministic_input_grad(off, m, grad_cols, geo, params)
        else:
            if acc_dtype == dtype:
                acc = grad_input[start:stop].zero_()
            else:
                acc = torch.zeros((n, *input.shape[1:]), device=input.device, dtype=acc_dtype)
            _offset_mask_grads(x, off, m, grad_cols, acc, grad_offset[start:stop], gm, geo, params)
            if acc_dtype != dtype:
                grad_input[start:stop] = acc
    grad_bias = None if bias is None else grad_out.sum(dim=(0, 2, 3))
    return grad_input, grad_offset, grad_mask, grad_weight.to(weight.dtype), grad_bias
