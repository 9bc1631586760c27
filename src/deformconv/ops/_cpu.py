"""Fast CPU kernel for deformable convolution: Numba sampling on all cores, oneDNN/BLAS contraction.

The input is copied once into a zero-padded channels-last array, so each bilinear corner of a tap
is a contiguous run of channels and the four corners of any position inside ``(-1, H) x (-1, W)``
are valid indices (the zero border stands in for torchvision's "outside reads zero"). Coordinates
and bilinear weights are computed once per (image, offset group, tap, pixel) and reused for every
channel of the group in a loop LLVM vectorises.

Work proceeds in tiles of output pixels small enough for the sampled columns to stay in cache
between the sampling pass that writes them and the matrix multiply that reads them; the tile is
also bounded by :func:`deformconv.ops._workspace.get_workspace_budget`, so memory does not grow
with the batch. The backward pass of a tile is: column gradients by one matrix multiply, then a
fused pass that resamples the columns and computes the offset and mask gradients (each pixel's
work is independent), then a scatter of the column gradients into the input gradient in which
every parallel task owns a slice of channels, then the weight gradient by matrix multiply. No two
tasks write the same element and every sum runs in a fixed order, so gradients are bit-identical
from run to run. Buffers that do not leave the call are reused from call to call, because a fresh
buffer of a few MiB costs a page fault per 4 KiB.

Both functions expect validated arguments (see :func:`deformconv.ops.deform_conv.deform_conv2d`),
float32 or float64, batch >= 1, any memory layout; ``stride``, ``padding`` and ``dilation`` are
``(int, int)`` pairs.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from deformconv.ops._workspace import get_workspace_budget

Pair = tuple[int, int]

# Reassociation lets LLVM vectorise the channel reductions of the offset gradient; "nnan"/"ninf"
# stay off because non-finite sampling positions are detected by comparisons.
_FASTMATH = {"contract", "reassoc"}
# Columns of one tile should stay in the L2/L3 caches between sampling and the matrix multiply.
_TILE_BYTES = 4 * 2**20
# Pixels per parallel task of the per-pixel passes; the most and fewest channels per scatter task.
# Fewer than 64 channels per task made the scatter slower, not faster: on shape a (64 channels,
# 2 threads), two tasks of 32 channels, each writing half of every pixel's channel vector, took
# the backward pass 40-42 ms against 37-39 ms for one task per image.
_PIXEL_BLOCK = 64
_CHANNEL_BLOCK = 256
_MIN_CHANNEL_BLOCK = 64

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@njit(inline="always")
def _position(h, w, height, width, padded_w, one):
    """Bilinear footing of the sampling position (h, w) (scalars only, so inlining keeps the
    kernels' arguments provably unaliased).

    Returns ``(corner, inside, lh, lw)``: the flat padded pixel of the top-left corner, or -1
    when the position lies outside ``[-1, H) x [-1, W)`` (NaN and infinity included); whether it
    lies in ``(-1, H) x (-1, W)``, the only positions that read the input (on the edge
    ``h == -1`` or ``w == -1`` a tap reads zero yet has an offset gradient, as in torchvision);
    and the fractional row and column.
    """
    if (h >= -1) & (h < height) & (w >= -1) & (w < width):
        hl = np.floor(h)
        wl = np.floor(w)
        corner = (np.int64(hl) + 1) * padded_w + np.int64(wl) + 1
        return corner, (h > -1) & (w > -1), h - hl, w - wl
    return -1, False, one - one, one - one


@njit(inline="always")
def _bilinear(m, lh, lw, one):
    """``(hh, hw, w00, w01, w10, w11)``: the complements ``1 - lh`` and ``1 - lw`` and the
    modulated bilinear weights of the top-left, top-right, bottom-left and bottom-right corners."""
    hh = one - lh
    hw = one - lw
    return hh, hw, m * hh * hw, m * hh * lw, m * lh * hw, m * lh * lw


@njit(inline="always")
def _corner_starts(corner, c0, n_ch, row_step):
    """Flat offsets of channel ``c0`` at the four corners whose top-left is padded pixel
    ``corner``, in the order of :func:`_bilinear`."""
    s00 = np.uint64(corner) * n_ch + c0
    return s00, s00 + n_ch, s00 + row_step, s00 + row_step + n_ch


# The parallel kernels index their array arguments directly and keep clear of local arrays:
# Numba then proves that the arguments do not alias and marks them ``noalias``, which LLVM needs
# to vectorise the channel loops without runtime checks. Rows are output pixels flattened over
# (image, pixel), ``n0`` the first row of the tile; geo is :meth:`_Layout.geometry`.


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _sample_columns(xpf, offset, mask, base_y, base_x, runs, geo, one, n0, cols):
    """Bilinearly sampled, modulated columns of rows ``n0 .. n0 + N``.

    xpf: (B, (H + 2) * (W + 2) * C) zero-padded channels-last input; offset: (B, 2 * G * K, P);
    mask: (B, G * K, P), or (1, 1, P) ones; base_y: (kh, P) and base_x: (kw, P), positions before
    offsets; runs: see :meth:`_Layout.runs`; cols: (N, K * C), column ``runs[q, 2] + k * geo[4]
    + c`` holding channel ``runs[q, 0] + c`` of tap ``k``.
    """
    height, width, kh, kw, tap_stride, pixels = geo[0], geo[1], geo[2], geo[3], geo[4], geo[6]
    padded_w = width + 2
    n_ch = np.uint64(geo[5])
    row_step = np.uint64(padded_w * geo[5])
    per_mask_image = mask.shape[0] > 1
    per_mask_tap = mask.shape[1] > 1
    n_rows = cols.shape[0]
    n_blocks = (n_rows + _PIXEL_BLOCK - 1) // _PIXEL_BLOCK
    for blk in prange(n_blocks):
        for row in range(blk * _PIXEL_BLOCK, min((blk + 1) * _PIXEL_BLOCK, n_rows)):
            b = (n0 + row) // pixels
            p = n0 + row - b * pixels
            mb = b if per_mask_image else 0
            for q in range(runs.shape[0]):
                c0 = np.uint64(runs[q, 0])
                length = np.uint64(runs[q, 1])
                tap = runs[q, 3] * kh * kw
                for i in range(kh):
                    for j in range(kw):
                        h = base_y[i, p] + offset[b, 2 * tap, p]
                        w = base_x[j, p] + offset[b, 2 * tap + 1, p]
                        corner, ok, lh, lw = _position(h, w, height, width, padded_w, one)
                        dst = np.uint64(runs[q, 2] + (i * kw + j) * tap_stride)
                        if ok:
                            m = mask[mb, tap if per_mask_tap else 0, p]
                            _, _, w00, w01, w10, w11 = _bilinear(m, lh, lw, one)
                            s00, s01, s10, s11 = _corner_starts(corner, c0, n_ch, row_step)
                            for c in range(length):
                                cols[row, dst + c] = (
                                    w00 * xpf[b, s00 + c]
                                    + w01 * xpf[b, s01 + c]
                                    + w10 * xpf[b, s10 + c]
                                    + w11 * xpf[b, s11 + c]
                                )
                        else:
                            for c in range(length):
                                cols[row, dst + c] = 0
                        tap += 1


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _sample_backward(
    xpf, offset, mask, base_y, base_x, runs, geo, one, n0, cols, gcols, modulated,
    grad_offset, grad_mask, corners, weights,
):  # fmt: skip
    """Resample the columns of a tile, add its offset and mask gradients and plan the scatter.

    Arguments as in :func:`_sample_columns`, plus gcols (N, K * C), the gradient of the columns.
    Writes cols; adds to grad_offset (B, 2 * G * K, P) and, when ``modulated``, grad_mask
    (B, G * K, P), each run of channels its share (the gradients are linear in the per-run sums,
    and the runs add up in a fixed order); writes for :func:`_scatter_input_grad` corners
    (N, G * K), the top-left corner of each tap that reads the input or -1, and weights
    (N, G * K, 4), its modulated bilinear weights.
    """
    height, width, kh, kw, tap_stride, pixels = geo[0], geo[1], geo[2], geo[3], geo[4], geo[6]
    padded_w = width + 2
    n_ch = np.uint64(geo[5])
    row_step = np.uint64(padded_w * geo[5])
    per_mask_image = mask.shape[0] > 1
    per_mask_tap = mask.shape[1] > 1
    n_rows = cols.shape[0]
    n_blocks = (n_rows + _PIXEL_BLOCK - 1) // _PIXEL_BLOCK
    for blk in prange(n_blocks):
        for row in range(blk * _PIXEL_BLOCK, min((blk + 1) * _PIXEL_BLOCK, n_rows)):
            b = (n0 + row) // pixels
            p = n0 + row - b * pixels
            mb = b if per_mask_image else 0
            for q in range(runs.shape[0]):
                c0 = np.uint64(runs[q, 0])
                length = np.uint64(runs[q, 1])
                tap = runs[q, 3] * kh * kw
                for i in range(kh):
                    for j in range(kw):
                        h = base_y[i, p] + offset[b, 2 * tap, p]
                        w = base_x[j, p] + offset[b, 2 * tap + 1, p]
                        corner, ok, lh, lw = _position(h, w, height, width, padded_w, one)
                        dst = np.uint64(runs[q, 2] + (i * kw + j) * tap_stride)
                        m = mask[mb, tap if per_mask_tap else 0, p]
                        hh, hw, w00, w01, w10, w11 = _bilinear(m, lh, lw, one)
                        corners[row, tap] = corner if ok else -1
                        weights[row, tap, 0] = w00
                        weights[row, tap, 1] = w01
                        weights[row, tap, 2] = w10
                        weights[row, tap, 3] = w11
                        if corner < 0:
                            for c in range(length):
                                cols[row, dst + c] = 0
                            tap += 1
                            continue
                        d00 = one - one
                        d01 = one - one
                        d10 = one - one
                        d11 = one - one
                        s00, s01, s10, s11 = _corner_starts(corner, c0, n_ch, row_step)
                        if ok:
                            for c in range(length):
                                v00 = xpf[b, s00 + c]
                                v01 = xpf[b, s01 + c]
                                v10 = xpf[b, s10 + c]
                                v11 = xpf[b, s11 + c]
                                gc = gcols[row, dst + c]
                                d00 += gc * v00
                                d01 += gc * v01
                                d10 += gc * v10
                                d11 += gc * v11
                                cols[row, dst + c] = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
                        else:
                            for c in range(length):
                                gc = gcols[row, dst + c]
                                d00 += gc * xpf[b, s00 + c]
                                d01 += gc * xpf[b, s01 + c]
                                d10 += gc * xpf[b, s10 + c]
                                d11 += gc * xpf[b, s11 + c]
                                cols[row, dst + c] = 0
                        grad_offset[b, 2 * tap, p] += m * (lw * (d11 - d01) + hw * (d10 - d00))
                        grad_offset[b, 2 * tap + 1, p] += m * (lh * (d11 - d10) + hh * (d01 - d00))
                        if modulated and ok:
                            grad_mask[b, tap, p] += (
                                hh * hw * d00 + hh * lw * d01 + lh * hw * d10 + lh * lw * d11
                            )
                        tap += 1


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _scatter_input_grad(gcols, corners, weights, chunks, geo, n0, grad_xpf):
    """Add the column gradients of a tile into the padded channels-last input gradient.

    corners and weights come from :func:`_sample_backward`; grad_xpf: (B, (H + 2) * (W + 2) * C). Each task is one (image, channel chunk) and owns those
    channels of that image, so tasks never write the same element and each element's sum runs
    in a fixed order. chunks: (T, 4) rows of (first channel, length, column of tap 0, offset
    group).
    """
    taps, tap_stride, pixels = geo[2] * geo[3], geo[4], geo[6]
    n_ch = np.uint64(geo[5])
    row_step = np.uint64((geo[1] + 2) * geo[5])
    n_rows = gcols.shape[0]
    b_first = n0 // pixels
    n_images = (n0 + n_rows - 1) // pixels - b_first + 1
    n_chunks = chunks.shape[0]
    for task in prange(n_images * n_chunks):
        b = b_first + task // n_chunks
        q = task % n_chunks
        c0 = np.uint64(chunks[q, 0])
        length = np.uint64(chunks[q, 1])
        g = chunks[q, 3]
        for row in range(max(b * pixels - n0, 0), min((b + 1) * pixels - n0, n_rows)):
            for k in range(taps):
                tap = g * taps + k
                corner = corners[row, tap]
                if corner < 0:
                    continue
                w00 = weights[row, tap, 0]
                w01 = weights[row, tap, 1]
                w10 = weights[row, tap, 2]
                w11 = weights[row, tap, 3]
                dst = np.uint64(chunks[q, 2] + k * tap_stride)
                s00, s01, s10, s11 = _corner_starts(corner, c0, n_ch, row_step)
                for c in range(length):
                    grad_xpf[b, s00 + c] += w00 * gcols[row, dst + c]
                for c in range(length):
                    grad_xpf[b, s01 + c] += w01 * gcols[row, dst + c]
                for c in range(length):
                    grad_xpf[b, s10 + c] += w10 * gcols[row, dst + c]
                for c in range(length):
                    grad_xpf[b, s11 + c] += w11 * gcols[row, dst + c]


@dataclass(frozen=True)
class _Layout:
    """Shapes of one call and the channel runs that map input channels to column positions.

    Columns of a pixel are ordered (weight group, tap, channel within the group), so each weight
    group's block is a contiguous (K * C / groups) row segment and each run of channels that
    shares an offset group and a weight group is contiguous in both the input and the columns.
    """

    batch: int
    channels: int
    height: int
    width: int
    out_h: int
    out_w: int
    kh: int
    kw: int
    groups: int
    offset_groups: int

    @property
    def taps(self) -> int:
        return self.kh * self.kw

    @property
    def pixels(self) -> int:
        return self.out_h * self.out_w

    @property
    def row_size(self) -> int:
        return self.channels * self.taps

    def runs(self, max_length: int | None = None) -> np.ndarray:
        """(R, 4) int64 rows (first channel, length, column of tap 0, offset group), by group."""
        per_og = self.channels // self.offset_groups
        cg = self.channels // self.groups
        rows = []
        for g in range(self.offset_groups):
            c = g * per_og
            while c < (g + 1) * per_og:
                grp = c // cg
                stop = min((g + 1) * per_og, (grp + 1) * cg)
                if max_length is not None:
                    stop = min(stop, c + max_length)
                rows.append((c, stop - c, grp * self.taps * cg + c - grp * cg, g))
                c = stop
        return np.array(rows, dtype=np.int64)

    def geometry(self) -> np.ndarray:
        """(H, W, kh, kw, C / groups, C, Ho * Wo) as the kernels read them."""
        return np.array(
            [
                self.height,
                self.width,
                self.kh,
                self.kw,
                self.channels // self.groups,
                self.channels,
                self.pixels,
            ],
            dtype=np.int64,
        )

    def tiles(self, itemsize: int, tile_bytes: int) -> list[tuple[int, int]]:
        """Row ranges ``[n0, n1)`` over the flattened (image, pixel) index, each with at most
        ``tile_bytes`` of columns (but at least one row).

        A tile is either whole images or part of one image, so its output maps onto a plain
        slice of the NCHW result.
        """
        row_bytes = self.row_size * itemsize
        rows = max(1, tile_bytes // row_bytes)
        total = self.batch * self.pixels
        if rows >= self.pixels:
            step = (rows // self.pixels) * self.pixels
            return [(n, min(n + step, total)) for n in range(0, total, step)]
        n_parts = -(-self.pixels // rows)
        step = -(-self.pixels // n_parts)
        return [
            (b * self.pixels + p, b * self.pixels + min(p + step, self.pixels))
            for b in range(self.batch)
            for p in range(0, self.pixels, step)
        ]


class _Call:
    """Everything the kernels read that does not depend on the tile."""

    def __init__(
        self,
        input: Tensor,
        offset: Tensor,
        mask: Tensor | None,
        weight: Tensor,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
    ) -> None:
        batch, channels, height, width = input.shape
        out_channels, cpg, kh, kw = weight.shape
        self.lay = lay = _Layout(
            batch=batch,
            channels=channels,
            height=height,
            width=width,
            out_h=offset.shape[2],
            out_w=offset.shape[3],
            kh=kh,
            kw=kw,
            groups=channels // cpg,
            offset_groups=offset.shape[1] // (2 * kh * kw),
        )
        self.dtype = input.dtype
        self.xp = _padded_channels_last(input.detach(), "input")
        self.xpf = self.xp.view(batch, -1).numpy()
        self.offset = _rows(offset, batch, -1, lay.pixels)
        self.modulated = mask is not None
        self.mask = (
            _rows(mask, batch, -1, lay.pixels)
            if mask is not None
            else np.ones((1, 1, lay.pixels), dtype=self.xpf.dtype)
        )
        self.base_y, self.base_x, self.runs, self.geo = _static(
            lay, stride, padding, dilation, self.xpf.dtype
        )
        self.one = np.ones(1, dtype=self.xpf.dtype)[0]
        # Weight rows in column order: (O, kh, kw, C / groups) flattened per output channel.
        self.w_rows = weight.detach().permute(0, 2, 3, 1).reshape(out_channels, -1)
        self.tiles = _tiles(lay, input.element_size(), min(_TILE_BYTES, get_workspace_budget()))
        self.tile_rows = self.tiles[0][1] - self.tiles[0][0]
        # The leading arguments of the column kernels.
        self.args = (
            self.xpf,
            self.offset,
            self.mask,
            self.base_y,
            self.base_x,
            self.runs,
            self.geo,
            self.one,
        )


@functools.lru_cache(maxsize=64)
def _static(lay: _Layout, stride: Pair, padding: Pair, dilation: Pair, dtype: np.dtype) -> tuple:
    """What a call's kernels read that depends only on its shapes: (base_y, base_x, runs, geo).

    base_y: (kh, Ho * Wo) and base_x: (kw, Ho * Wo), the sampling positions before offsets.
    Cached (read-only) because a network calls each layer with the same shapes again and again.
    """
    oy, ox = np.divmod(np.arange(lay.pixels), lay.out_w)
    base_y = np.arange(lay.kh)[:, None] * dilation[0] + oy * stride[0] - padding[0]
    base_x = np.arange(lay.kw)[:, None] * dilation[1] + ox * stride[1] - padding[1]
    runs = lay.runs()
    geo = lay.geometry()
    for array in (base_y, base_x, runs, geo):
        array.flags.writeable = False
    return base_y.astype(dtype), base_x.astype(dtype), runs, geo


@functools.lru_cache(maxsize=64)
def _tiles(lay: _Layout, itemsize: int, tile_bytes: int) -> list[tuple[int, int]]:
    return lay.tiles(itemsize, tile_bytes)


def _padded_channels_last(x: Tensor, name: str) -> Tensor:
    """``(B, C, H, W) -> (B, H + 2, W + 2, C)`` with a zero border, in workspace ``name``."""
    b, c, h, w = x.shape
    xp = _workspace.get(name, b * (h + 2) * (w + 2) * c, x.dtype).view(b, h + 2, w + 2, c)
    xp[:, 0].zero_()
    xp[:, -1].zero_()
    xp[:, 1:-1, 0].zero_()
    xp[:, 1:-1, -1].zero_()
    xp[:, 1:-1, 1:-1].copy_(x.permute(0, 2, 3, 1))
    return xp


def _rows(t: Tensor, *shape: int) -> np.ndarray:
    return t.detach().contiguous().view(*shape).numpy()


class _Workspace(threading.local):
    """Buffers reused across calls of one thread, as fresh large buffers cost page faults.

    Buffers stay cached while their total is within the workspace budget; a request beyond it
    gets fresh memory that is released after the call.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> Tensor:
        key = (name, dtype)
        buf = self.buffers.pop(key, None)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
        cached = sum(b.numel() * b.element_size() for b in self.buffers.values())
        if cached + buf.numel() * buf.element_size() <= get_workspace_budget():
            self.buffers[key] = buf
        return buf[:numel]


_workspace = _Workspace()


def _scatter_chunk(lay: _Layout, tile_rows: int) -> int:
    """Channels per scatter task: between ``_MIN_CHANNEL_BLOCK`` and ``_CHANNEL_BLOCK``, and
    otherwise few enough that a tile has a task for every thread (the scatter parallelises over
    images and runs of channels)."""
    images = max(1, tile_rows // lay.pixels)
    runs = lay.runs()
    splits = -(-numba.get_num_threads() // (images * len(runs)))
    longest = int(runs[:, 1].max())
    return max(_MIN_CHANNEL_BLOCK, min(_CHANNEL_BLOCK, -(-longest // splits)))


def _set_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _contract(cols: Tensor, w_rows: Tensor, bias: Tensor | None, groups: int) -> Tensor:
    """``(N, K*C) x (O, K*C/groups) -> (N, O)`` per weight group, plus bias."""
    n = cols.shape[0]
    out_channels = w_rows.shape[0]
    if groups == 1:
        if _ONEDNN and cols.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(cols, w_rows, bias, "none", [], "")
        if bias is None:
            return torch.mm(cols, w_rows.t())
        return torch.addmm(bias, cols, w_rows.t())
    og = out_channels // groups
    c = cols.view(n, groups, -1).transpose(0, 1)
    w = w_rows.view(groups, og, -1).transpose(1, 2)
    out = torch.bmm(c, w).transpose(0, 1).reshape(n, out_channels)
    if bias is not None:
        out += bias
    return out


def _cols_grad(grad_rows: Tensor, w_rows: Tensor, groups: int, out: Tensor) -> None:
    """``out (N, K*C) = grad_rows (N, O) @ w_rows (O, K*C/groups)`` per weight group."""
    if groups == 1:
        torch.mm(grad_rows, w_rows, out=out)
        return
    n = grad_rows.shape[0]
    g = grad_rows.view(n, groups, -1).transpose(0, 1)
    w = w_rows.view(groups, -1, w_rows.shape[1])
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
    _set_threads()
    call = _Call(input, offset, mask, weight, stride, padding, dilation)
    lay = call.lay
    w_rows = call.w_rows.contiguous()
    b = None if bias is None else bias.detach().contiguous()
    out_channels = weight.shape[0]
    out = input.new_empty((lay.batch, out_channels, lay.pixels))
    ws = _workspace.get("cols", call.tile_rows * lay.row_size, call.dtype)
    for n0, n1 in call.tiles:
        cols = ws[: (n1 - n0) * lay.row_size].view(n1 - n0, lay.row_size)
        _sample_columns(*call.args, n0, cols.numpy())
        res = _contract(cols, w_rows, b, lay.groups)
        b0, p0 = divmod(n0, lay.pixels)
        if n1 - n0 >= lay.pixels:
            nb = (n1 - n0) // lay.pixels
            out[b0 : b0 + nb].copy_(res.view(nb, lay.pixels, out_channels).transpose(1, 2))
        else:
            out[b0, :, p0 : p0 + n1 - n0].copy_(res.t())
    return out.view(lay.batch, out_channels, lay.out_h, lay.out_w)


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
    _set_threads()
    call = _Call(input, offset, mask, weight, stride, padding, dilation)
    lay = call.lay
    out_channels = weight.shape[0]
    w_rows = call.w_rows.contiguous()
    grad_rows = _workspace.get("grad_out", grad_out.numel(), call.dtype).view(
        lay.batch, lay.out_h, lay.out_w, out_channels
    )
    grad_rows.copy_(grad_out.detach().permute(0, 2, 3, 1))
    grad_rows = grad_rows.view(-1, out_channels)
    chunks = lay.runs(_scatter_chunk(lay, call.tile_rows))

    grad_xp = _workspace.get("grad_input", call.xp.numel(), call.dtype).view(call.xp.shape)
    grad_xp.zero_()
    grad_xpf = grad_xp.view(lay.batch, -1).numpy()
    grad_offset = offset.new_zeros((lay.batch, offset.shape[1], lay.pixels))
    grad_mask = mask.new_zeros((lay.batch, mask.shape[1], lay.pixels)) if mask is not None else None
    gmask_np = grad_mask.numpy() if grad_mask is not None else np.zeros((1, 1, 1), call.xpf.dtype)
    grad_w = weight.new_zeros((out_channels, call.w_rows.shape[1]))
    rows, gtaps = call.tile_rows, offset.shape[1] // 2
    ws = _workspace.get("cols", rows * lay.row_size, call.dtype)
    ws_grad = _workspace.get("grad_cols", rows * lay.row_size, call.dtype)
    ws_corners = _workspace.get("corners", rows * gtaps, torch.int64)
    ws_weights = _workspace.get("weights", rows * gtaps * 4, call.dtype)
    for n0, n1 in call.tiles:
        n = n1 - n0
        cols = ws[: n * lay.row_size].view(n, lay.row_size)
        gcols = ws_grad[: n * lay.row_size].view(n, lay.row_size)
        corners = ws_corners[: n * gtaps].view(n, gtaps).numpy()
        weights = ws_weights[: n * gtaps * 4].view(n, gtaps, 4).numpy()
        g_rows = grad_rows[n0:n1]
        _cols_grad(g_rows, w_rows, lay.groups, gcols)
        _sample_backward(
            *call.args, n0, cols.numpy(), gcols.numpy(), call.modulated, grad_offset.numpy(),
            gmask_np, corners, weights,
        )  # fmt: skip
        _scatter_input_grad(gcols.numpy(), corners, weights, chunks, call.geo, n0, grad_xpf)
        # The weight gradient of this tile and the column gradient of the next are neighbours,
        # so the loop alternates between Numba kernels and matrix multiplies twice per tile.
        _weight_grad_add(grad_w, g_rows, cols, lay.groups)

    # A fresh tensor: grad_xp is a workspace the next call overwrites.
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
    grad_input.copy_(grad_xp[:, 1:-1, 1:-1].permute(0, 3, 1, 2))
    grad_weight = grad_w.view(out_channels, lay.kh, lay.kw, -1).permute(0, 3, 1, 2).contiguous()
    grad_bias = None if bias is None else grad_out.sum(dim=(0, 2, 3))
    return (
        grad_input,
        grad_offset.view(offset.shape),
        None if grad_mask is None else grad_mask.view(mask.shape),
        grad_weight,
        grad_bias,
    )
