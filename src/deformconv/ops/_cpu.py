"""Fast CPU kernel for deformable convolution: Numba on all cores, in one of two paths.

:func:`forward` and :func:`backward` are what the dispatcher calls. Both expect validated
arguments (see :func:`deformconv.ops.deform_conv.deform_conv2d`), float32 or float64, batch >= 1,
any memory layout; ``stride``, ``padding`` and ``dilation`` are ``(int, int)`` pairs. Each call
takes one of two paths, by the rule of :func:`fused_path`:

- the **fused** path (:mod:`deformconv.ops._cpu_fused`) samples each tile of output pixels into a
  small buffer of the thread and contracts it with the weight at once, in Numba; the columns
  never travel through memory;
- the **unfused** path (:mod:`deformconv.ops._cpu_sampling`) samples tiles of a few MiB of
  columns in Numba and contracts them with oneDNN's (float32) or the BLAS matrix multiply.

Both share the prologue of :mod:`deformconv.ops._cpu_layout` (the zero-padded channels-last
input), compute the same quantities in a different order, and agree to rounding. Both backward
passes are free of atomics and bit-identical from run to run for a given number of threads.
Scratch buffers are reused from call to call (:mod:`deformconv.ops._buffers`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deformconv.ops._buffers import cpu_buffers
from deformconv.ops._cpu_fused import fused_backward, fused_forward
from deformconv.ops._cpu_layout import (
    Layout,
    Prologue,
    channels_last_rows,
    chunk_columns,
    scratch,
    unpadded,
)
from deformconv.ops._cpu_sampling import resample_backward, sample_columns, scatter_input_grad
from deformconv.ops._numba import parallel_launch
from deformconv.ops._workspace import get_workspace_budget

Pair = tuple[int, int]

# The rule between the two paths (see fused_path and docs/performance.md, where it was
# measured): the fused contractions stream the weight of a weight group from cache for every
# block of 4 pixels, so the fused forward wins while that weight stays in the core's L2 cache
# beside a tile (1 MiB per core on the project's machine); the fused backward, whose unfused
# rival makes three passes over the columns, wins up to a somewhat larger weight (ResNet-50's
# 128-channel stage) and loses from the 256-channel stage on, where oneDNN's matrix multiplies
# outrun the fused multiply-add blocks.
FUSED_WEIGHT_BYTES = 512 * 2**10
FUSED_BACKWARD_WEIGHT_BYTES = 1 * 2**20
# Columns of one fused tile (per thread): they stay in L2 between sampling and contraction. A
# tile has at least 32 pixels, so the loops over a tile's pixels fill whole vectors.
FUSED_TILE_BYTES = 320 * 2**10
FUSED_TILE_PIXELS = (32, 256)
# Columns of one unfused tile: they should stay in the L2/L3 caches between the sampling pass
# that writes them and the matrix multiply that reads them.
TILE_BYTES = 4 * 2**20
# The most and fewest channels per task of the unfused input-gradient scatter. Fewer than 64
# channels per task made it slower, not faster: on shape a (64 channels, 2 threads), two tasks
# of 32 channels, each writing half of every pixel's channel vector, took the backward pass
# 40-42 ms against 37-39 ms for one task per image.
CHANNEL_BLOCK = 256
MIN_CHANNEL_BLOCK = 64
# Slots (each with its own weight-gradient sum) per thread in the fused backward pass: more
# than one lets a thread that finishes early take another slot.
SLOTS_PER_THREAD = 4


def _private_onednn_linear():
    """oneDNN's fused linear, ``torch.ops.mkldnn._linear_pointwise``, or None.

    It is a private operator (no stability promise): on the project's AMD machine it runs the
    float32 column contraction about 3x faster than the public ``F.linear`` (MKL). Its absence,
    or a failure at a call, falls back to ``F.linear`` for the rest of the process.
    """
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


_onednn_linear = _private_onednn_linear()


def _linear(cols: Tensor, weight_rows: Tensor, bias: Tensor | None) -> Tensor:
    """``cols (N, J) @ weight_rows (O, J).T + bias``."""
    global _onednn_linear
    if _onednn_linear is not None and cols.dtype == torch.float32:
        try:
            return _onednn_linear(cols, weight_rows, bias, "none", [], "")
        except (RuntimeError, TypeError, NotImplementedError):
            _onednn_linear = None
    return F.linear(cols, weight_rows, bias)


def fused_path(
    layout: Layout, out_channels: int, itemsize: int, backward: bool = False, threads: int = 1
) -> bool:
    """Whether a call of this layout takes the fused path: when the weight of one weight group
    fits :data:`FUSED_WEIGHT_BYTES` (forward) or :data:`FUSED_BACKWARD_WEIGHT_BYTES`
    (backward). The fused backward also keeps a weight-gradient sum per thread (at least), so
    it is taken only while ``threads`` of those fit a quarter of the workspace budget."""
    group_out = out_channels // layout.groups
    weight_bytes = group_out * layout.taps * layout.group_channels * itemsize
    if not backward:
        return weight_bytes <= FUSED_WEIGHT_BYTES
    sums = threads * weight_bytes * layout.groups
    return weight_bytes <= FUSED_BACKWARD_WEIGHT_BYTES and sums <= get_workspace_budget() // 4


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
    """Deformable convolution, output ``(B, O, Ho, Wo)``, by the path :func:`fused_path`
    picks."""
    return forward_path(None, input, offset, mask, weight, bias, stride, padding, dilation)


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
    """Gradients with respect to input, offset, mask (``None`` without one), weight and bias,
    by the path :func:`fused_path` picks (``backward=True``)."""
    return backward_path(
        None, grad_out, input, offset, mask, weight, bias, stride, padding, dilation
    )


def forward_path(fused: bool | None, *args: Tensor | Pair | None) -> Tensor:
    """:func:`forward` on the fused (True) or unfused (False) path, or on the one the rule
    picks (None); tests compare the two paths on the same inputs."""
    input, offset, mask, weight, bias, stride, padding, dilation = args
    with parallel_launch() as threads:
        pro = Prologue(input, offset, mask, weight, stride, padding, dilation)
        if fused is None:
            fused = fused_path(pro.layout, weight.shape[0], input.element_size())
        return _forward_fused(pro, bias, threads) if fused else _forward_unfused(pro, bias)


def backward_path(fused: bool | None, *args: Tensor | Pair | None) -> tuple:
    """:func:`backward` on the path given, as :func:`forward_path`."""
    grad_out, input, offset, mask, weight, bias, stride, padding, dilation = args
    with parallel_launch() as threads:
        pro = Prologue(input, offset, mask, weight, stride, padding, dilation)
        layout = pro.layout
        if fused is None:
            item = input.element_size()
            fused = fused_path(layout, weight.shape[0], item, backward=True, threads=threads)
        if fused:
            grads = _backward_fused(pro, grad_out, threads)
        else:
            grads = _backward_unfused(pro, grad_out, threads)
    grad_input, grad_offset, grad_mask, grad_weight_rows = grads
    grad_weight = (
        grad_weight_rows.view(weight.shape[0], layout.kernel_h, layout.kernel_w, -1)
        .permute(0, 3, 1, 2)
        .contiguous()
    )
    grad_bias = None if bias is None else grad_out.sum(dim=(0, 2, 3))
    return (
        grad_input,
        grad_offset.view(offset.shape),
        None if grad_mask is None else grad_mask.view(mask.shape),
        grad_weight,
        grad_bias,
    )


def _bias_rows(bias: Tensor | None, out_channels: int, dtype: np.dtype) -> np.ndarray:
    if bias is None:
        return np.zeros(out_channels, dtype=dtype)
    return bias.detach().contiguous().numpy()


def _fused_tile(layout_row_bytes: int) -> int:
    low, high = FUSED_TILE_PIXELS
    return max(low, min(high, FUSED_TILE_BYTES // layout_row_bytes) // low * low)


def _forward_fused(pro: Prologue, bias: Tensor | None, threads: int) -> Tensor:
    layout, dtype = pro.layout, pro.dtype
    out_channels = pro.weight_rows.shape[0]
    item = pro.padded.element_size()
    tile = _fused_tile(layout.row_size * item)
    taps = pro.offset.shape[1] // 2
    out = torch.empty((layout.batch, out_channels, layout.pixels), dtype=dtype)
    name = "deform_conv2d.fused."
    corner = scratch(name + "corner", (threads, taps, tile), torch.int64)
    w00, w01, w10, w11 = (scratch(name + f"w{i}", (threads, taps, tile), dtype) for i in range(4))
    cols = scratch(name + "cols", (threads, tile, layout.row_size), dtype)
    runs = pro.runs
    fused_forward(
        pro.padded_rows, pro.offset, pro.mask, pro.base_y, pro.base_x, pro.geometry,
        pro.padded_rows.dtype.type(1), runs.first, runs.length, runs.column, runs.group,
        pro.weight_rows.numpy(), _bias_rows(bias, out_channels, pro.padded_rows.dtype),
        layout.groups, tile, corner.numpy(), w00.numpy(), w01.numpy(), w10.numpy(), w11.numpy(),
        cols.numpy(), out.numpy(),
    )  # fmt: skip
    return out.view(layout.batch, out_channels, layout.out_h, layout.out_w)


def _grad_rows(grad_out: Tensor) -> Tensor:
    """The upstream gradient channels-last, ``(B, Ho * Wo, O)``, in a reused buffer."""
    return channels_last_rows(grad_out.detach(), "deform_conv2d.grad_out")


def _grad_input(pro: Prologue) -> Tensor:
    """The zeroed padded channels-last input gradient, in a reused buffer."""
    grad_xp = scratch("deform_conv2d.grad_input", tuple(pro.padded.shape), pro.dtype)
    grad_xp.zero_()
    return grad_xp


def _sum_in_order(parts: Tensor) -> Tensor:
    """``parts[0] + parts[1] + ...`` along the first dimension, into ``parts[0]``: added in a
    fixed order, so the sum is the same in every run."""
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


def _slot_tasks(tasks: int, slots: int) -> np.ndarray:
    """``(slots + 1,)`` boundaries splitting ``tasks`` into ``slots`` near-equal ranges."""
    return (np.arange(slots + 1, dtype=np.int64) * tasks) // slots


def _backward_fused(pro: Prologue, grad_out: Tensor, threads: int) -> tuple:
    layout, dtype = pro.layout, pro.dtype
    out_channels, group_width = pro.weight_rows.shape
    chunks = layout.chunks(threads)
    tasks = layout.batch * len(chunks.first)
    # As many slots as fit a quarter of the budget, but at least one per thread (fused_path).
    sum_bytes = pro.weight_rows.numel() * pro.padded.element_size()
    room = max(threads, min(SLOTS_PER_THREAD * threads, get_workspace_budget() // (4 * sum_bytes)))
    slots = min(tasks, room)
    index = chunk_columns(layout, chunks)
    group_out = out_channels // layout.groups
    per_group = pro.weight_rows.view(layout.groups, group_out, group_width)
    weight_chunked = torch.stack([per_group[g][:, index[g]] for g in range(layout.groups)])
    weight_chunked = weight_chunked.view(out_channels, group_width)

    grad_rows = _grad_rows(grad_out)
    grad_xp = _grad_input(pro)
    # Part 0 of the offset and mask gradients is the result itself, which the kernel writes in
    # full; further parts (chunks that share an offset group) start from zero.
    parts = int(chunks.part.max()) + 1
    taps = pro.offset.shape[1] // 2
    offset_parts = torch.empty((parts, layout.batch, 2 * taps, layout.pixels), dtype=dtype)
    offset_parts[1:].zero_()
    mask_shape = (parts, layout.batch, taps, layout.pixels) if pro.modulated else (1, 1, 1, 1)
    mask_parts = torch.empty(mask_shape, dtype=dtype)
    mask_parts[1:].zero_()
    grad_weight_slots = torch.zeros((slots, out_channels, group_width), dtype=dtype)

    tile = _fused_tile(layout.taps * int(chunks.length.max()) * pro.padded.element_size())
    name = "deform_conv2d.fused_backward."
    per_pair = (threads, layout.taps * int(chunks.groups.max()), tile)
    corner = scratch(name + "corner", per_pair, torch.int64)
    plan = [scratch(name + f"plan{i}", per_pair, dtype).numpy() for i in range(8)]
    columns = (threads, tile, layout.taps * int(chunks.length.max()))
    grad_cols = scratch(name + "grad_cols", columns, dtype)
    cols = scratch(name + "cols", columns, dtype)
    fused_backward(
        pro.padded_rows, pro.offset, pro.mask, pro.base_y, pro.base_x, pro.geometry,
        pro.padded_rows.dtype.type(1), grad_rows.numpy(), weight_chunked.numpy(), chunks.first,
        chunks.length, chunks.group, chunks.groups, chunks.weight_group, chunks.part,
        chunks.column, _slot_tasks(tasks, slots), tile, pro.modulated, corner.numpy(), *plan,
        grad_cols.numpy(), cols.numpy(), grad_xp.view(layout.batch, -1).numpy(),
        offset_parts.numpy(), mask_parts.numpy(), grad_weight_slots.numpy(),
    )  # fmt: skip
    grad_offset = _sum_in_order(offset_parts)
    grad_mask = _sum_in_order(mask_parts) if pro.modulated else None
    chunked = _sum_in_order(grad_weight_slots).view(layout.groups, group_out, group_width)
    grad_weight_rows = torch.empty_like(chunked)
    for g in range(layout.groups):
        grad_weight_rows[g][:, index[g]] = chunked[g]
    return unpadded(grad_xp), grad_offset, grad_mask, grad_weight_rows.view(out_channels, -1)


def _unfused_tiles(pro: Prologue) -> tuple[list[tuple[int, int]], int]:
    """The unfused path's tiles (:meth:`~deformconv.ops._cpu_layout.Layout.tiles`) and the
    rows of the first, the largest."""
    tiles = pro.layout.tiles(pro.padded.element_size(), min(TILE_BYTES, get_workspace_budget()))
    return tiles, tiles[0][1] - tiles[0][0]


def _forward_unfused(pro: Prologue, bias: Tensor | None) -> Tensor:
    layout = pro.layout
    out_channels = pro.weight_rows.shape[0]
    b = None if bias is None else bias.detach().contiguous()
    tiles, rows = _unfused_tiles(pro)
    out = torch.empty((layout.batch, out_channels, layout.pixels), dtype=pro.dtype)
    buffer = cpu_buffers.get("deform_conv2d.cols", rows * layout.row_size, pro.dtype)
    runs = pro.runs
    for n0, n1 in tiles:
        cols = buffer[: (n1 - n0) * layout.row_size].view(n1 - n0, layout.row_size)
        sample_columns(
            pro.padded_rows, pro.offset, pro.mask, pro.base_y, pro.base_x, pro.geometry,
            pro.padded_rows.dtype.type(1), runs.first, runs.length, runs.column, runs.group, n0,
            cols.numpy(),
        )  # fmt: skip
        res = _contract(cols, pro.weight_rows, b, layout.groups)
        b0, p0 = divmod(n0, layout.pixels)
        if n1 - n0 >= layout.pixels:
            nb = (n1 - n0) // layout.pixels
            out[b0 : b0 + nb].copy_(res.view(nb, layout.pixels, out_channels).transpose(1, 2))
        else:
            out[b0, :, p0 : p0 + n1 - n0].copy_(res.t())
    return out.view(layout.batch, out_channels, layout.out_h, layout.out_w)


def _scatter_chunk(layout: Layout, tile_rows: int, threads: int) -> int:
    """Channels per task of the unfused scatter: between :data:`MIN_CHANNEL_BLOCK` and
    :data:`CHANNEL_BLOCK`, and otherwise few enough that a tile has a task for every thread
    (the scatter parallelises over images and runs of channels)."""
    images = max(1, tile_rows // layout.pixels)
    runs = layout.runs()
    splits = -(-threads // (images * len(runs.first)))
    longest = int(runs.length.max())
    return max(MIN_CHANNEL_BLOCK, min(CHANNEL_BLOCK, -(-longest // splits)))


def _backward_unfused(pro: Prologue, grad_out: Tensor, threads: int) -> tuple:
    layout, dtype = pro.layout, pro.dtype
    out_channels = pro.weight_rows.shape[0]
    tiles, rows = _unfused_tiles(pro)
    grad_rows = _grad_rows(grad_out).view(-1, out_channels)
    chunks = layout.runs(_scatter_chunk(layout, rows, threads))
    grad_xp = _grad_input(pro)
    grad_xpf = grad_xp.view(layout.batch, -1).numpy()
    taps = pro.offset.shape[1] // 2
    grad_offset = torch.zeros((layout.batch, 2 * taps, layout.pixels), dtype=dtype)
    grad_mask = (
        torch.zeros((layout.batch, taps, layout.pixels), dtype=dtype) if pro.modulated else None
    )
    grad_mask_np = (
        grad_mask.numpy() if grad_mask is not None else np.zeros((1, 1, 1), pro.mask.dtype)
    )
    onednn = layout.groups == 1 and _onednn_linear is not None and dtype == torch.float32
    grad_w = None if onednn else torch.zeros(pro.weight_rows.shape, dtype=dtype)
    buffer = cpu_buffers.get("deform_conv2d.cols", rows * layout.row_size, dtype)
    plan_corner = cpu_buffers.get("deform_conv2d.plan_corner", rows * taps, torch.int64)
    plan_weights = [
        cpu_buffers.get(f"deform_conv2d.plan_w{i}", rows * taps, dtype) for i in range(4)
    ]
    runs = pro.runs
    # oneDNN's product ran the column gradient 2.1-2.3x faster than MKL's on this AMD CPU, for
    # these sizes, and the weight gradient 1.2-1.7x faster (transposed copy of the columns
    # included) than MKL's product on the transposed views: 1.66 against 2.52 ms for a tile of
    # 455 pixels x 256 channels, 3.26 against 5.37 ms for 227 pixels x 512 channels, 2 threads.
    weight_t = pro.weight_rows.t().contiguous() if onednn else None
    grad_buffer = None
    if not onednn:
        grad_buffer = cpu_buffers.get("deform_conv2d.grad_cols", rows * layout.row_size, dtype)
    for n0, n1 in tiles:
        n = n1 - n0
        cols = buffer[: n * layout.row_size].view(n, layout.row_size)
        corner = plan_corner[: n * taps].view(n, taps).numpy()
        weights = [w[: n * taps].view(n, taps).numpy() for w in plan_weights]
        g_rows = grad_rows[n0:n1]
        if onednn:
            grad_cols = _linear(g_rows, weight_t, None)
        else:
            grad_cols = grad_buffer[: n * layout.row_size].view(n, layout.row_size)
            _cols_grad(g_rows, pro.weight_rows, layout.groups, grad_cols)
        resample_backward(
            pro.padded_rows, pro.offset, pro.mask, pro.base_y, pro.base_x, pro.geometry,
            pro.padded_rows.dtype.type(1), runs.first, runs.length, runs.column, runs.group, n0,
            grad_cols.numpy(), pro.modulated, cols.numpy(), grad_offset.numpy(), grad_mask_np,
            corner, *weights,
        )  # fmt: skip
        scatter_input_grad(
            grad_cols.numpy(), corner, *weights, pro.geometry, chunks.first, chunks.length,
            chunks.column, chunks.group, n0, grad_xpf,
        )  # fmt: skip
        # The weight gradient of this tile and the column gradient of the next are neighbours,
        # so the loop alternates between Numba kernels and matrix multiplies twice per tile.
        if onednn:
            grad_w = _weight_grad_onednn(grad_w, g_rows, cols, grad_cols)
        else:
            _weight_grad_add(grad_w, g_rows, cols, layout.groups)
    return unpadded(grad_xp), grad_offset, grad_mask, grad_w


def _weight_grad_onednn(
    grad_w: Tensor | None, grad_rows: Tensor, cols: Tensor, spent: Tensor
) -> Tensor:
    """``grad_w (O, K*C) += grad_rows^T (O, N) @ cols (N, K*C)`` by oneDNN's product, which
    reads both operands row by row: the columns are copied transposed into ``spent``, the
    column gradient of the tile (same size, no longer needed). The first tile's product is the
    sum itself (``grad_w`` None), so no weight-sized buffer is zeroed and added to."""
    cols_t = spent.view(-1)[: cols.numel()].view(cols.shape[1], cols.shape[0])
    cols_t.copy_(cols.t())
    part = _linear(grad_rows.t().contiguous(), cols_t, None)
    if grad_w is None:
        return part
    return grad_w.add_(part)


def _contract(cols: Tensor, weight_rows: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """``(N, K*C) x (O, K*C/groups) -> (N, O)`` per weight group, plus bias."""
    n = cols.shape[0]
    out_channels = weight_rows.shape[0]
    if groups == 1:
        return _linear(cols, weight_rows, bias)
    og = out_channels // groups
    c = cols.view(n, groups, -1).transpose(0, 1)
    w = weight_rows.view(groups, og, -1).transpose(1, 2)
    out = torch.bmm(c, w).transpose(0, 1).reshape(n, out_channels)
    if bias is not None:
        out += bias
    return out


def _cols_grad(grad_rows: Tensor, weight_rows: Tensor, groups: int, out: Tensor) -> None:
    """``out (N, K*C) = grad_rows (N, O) @ weight_rows (O, K*C/groups)`` per weight group."""
    if groups == 1:
        torch.mm(grad_rows, weight_rows, out=out)
        return
    n = grad_rows.shape[0]
    g = grad_rows.view(n, groups, -1).transpose(0, 1)
    w = weight_rows.view(groups, -1, weight_rows.shape[1])
    out.view(n, groups, -1).copy_(torch.bmm(g, w).transpose(0, 1))


def _weight_grad_add(grad_w: Tensor, grad_rows: Tensor, cols: Tensor, groups: int) -> None:
    """``grad_w (O, K*C/groups) += grad_rows^T (O, N) @ cols (N, K*C)`` per weight group."""
    if groups == 1:
        grad_w.addmm_(grad_rows.t(), cols)
        return
    n = grad_rows.shape[0]
    g = grad_rows.view(n, groups, -1).permute(1, 2, 0)
    c = cols.view(n, groups, -1).transpose(0, 1)
    grad_w.view(groups, -1, grad_w.shape[1]).baddbmm_(g, c)
