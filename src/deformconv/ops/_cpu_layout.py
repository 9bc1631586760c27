"""Shapes of one CPU deformable-convolution call, and the prologue its kernels share.

The prologue copies the input once into a zero-padded channels-last array: each bilinear corner
of a tap is then a contiguous run of channels, and the four corners of any position inside
``(-1, H) x (-1, W)`` are valid indices (the zero border stands in for torchvision's "outside
reads zero"). Offsets and mask are read in their own layout, flattened over output pixels.

A pixel's sampled values ("columns", what the matrix multiply contracts with the weight) are
ordered (weight group, tap, channel within the weight group), so each weight group's block is
contiguous, and each *run* of channels that shares an offset group and a weight group is
contiguous both in the input and, per tap, in the columns.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from deformconv.ops._buffers import cpu_buffers

Pair = tuple[int, int]


class Geometry(NamedTuple):
    """The integers the kernels read, by name (a NamedTuple reaches Numba as a typed tuple)."""

    height: int  # input rows H
    width: int  # input columns W
    padded_width: int  # W + 2: one zero pixel on each side
    channels: int  # C: the distance between neighbouring pixels of the padded input
    kernel_h: int
    kernel_w: int
    taps: int  # kernel_h * kernel_w
    group_channels: int  # C / groups: the distance between two taps' columns in a weight group
    pixels: int  # output pixels Ho * Wo


class Runs(NamedTuple):
    """Ranges of input channels, one entry per range in each array (int64)."""

    first: np.ndarray  # first input channel
    length: np.ndarray  # number of channels
    column: np.ndarray  # column of (tap 0, first channel) in a pixel's columns
    group: np.ndarray  # offset group


class Chunks(NamedTuple):
    """The channel chunks of the fused backward pass, one entry per chunk in each array (int64).

    A chunk is a range of channels of one weight group: either whole offset groups (``groups``
    of them, from offset group ``group`` on), or a part of one offset group (``groups`` is 1).
    In the chunk-major weight layout (:func:`chunk_columns`) its ``K * length`` columns start
    at ``column``, ordered (tap, channel). ``part`` numbers the chunks that share an offset
    group (0, 1, ...): each part of a group's offset and mask gradients is summed on its own
    and the parts are added afterwards, in order.
    """

    first: np.ndarray
    length: np.ndarray
    group: np.ndarray  # first offset group
    groups: np.ndarray  # number of offset groups
    weight_group: np.ndarray
    part: np.ndarray
    column: np.ndarray


@dataclass(frozen=True)
class Layout:
    """Shapes of one call."""

    batch: int
    channels: int
    height: int
    width: int
    out_h: int
    out_w: int
    kernel_h: int
    kernel_w: int
    groups: int
    offset_groups: int

    @property
    def taps(self) -> int:
        return self.kernel_h * self.kernel_w

    @property
    def pixels(self) -> int:
        return self.out_h * self.out_w

    @property
    def group_channels(self) -> int:
        return self.channels // self.groups

    @property
    def row_size(self) -> int:
        """Columns per output pixel: ``C * kh * kw``."""
        return self.channels * self.taps

    def geometry(self) -> Geometry:
        return Geometry(
            height=self.height,
            width=self.width,
            padded_width=self.width + 2,
            channels=self.channels,
            kernel_h=self.kernel_h,
            kernel_w=self.kernel_w,
            taps=self.taps,
            group_channels=self.group_channels,
            pixels=self.pixels,
        )

    def runs(self, max_length: int | None = None) -> Runs:
        """The maximal runs of channels sharing an offset group and a weight group, in channel
        order, each cut into pieces of at most ``max_length`` channels when given."""
        per_offset_group = self.channels // self.offset_groups
        cg = self.group_channels
        rows = []
        for g in range(self.offset_groups):
            c = g * per_offset_group
            while c < (g + 1) * per_offset_group:
                weight_group = c // cg
                stop = min((g + 1) * per_offset_group, (weight_group + 1) * cg)
                if max_length is not None:
                    stop = min(stop, c + max_length)
                column = weight_group * self.taps * cg + c - weight_group * cg
                rows.append((c, stop - c, column, g))
                c = stop
        first, length, column, group = (
            np.array(v, dtype=np.int64) for v in zip(*rows, strict=True)
        )
        return Runs(first=first, length=length, column=column, group=group)

    def chunks(self, min_tasks: int, min_length: int = 8, max_length: int = 64) -> Chunks:
        """The chunks of the fused backward pass, for tasks of (image, chunk).

        Runs (see :meth:`runs`) that are whole offset groups of the same weight group are
        merged into chunks of up to ``max_length`` channels (longer rows for the matrix
        multiplies), as long as ``batch * chunks`` stays at least ``min_tasks``; when even the
        runs are too few, each is cut into equal parts of at least ``min_length`` channels.
        """
        runs = self.runs()
        per_group = self.channels // self.offset_groups
        cg = self.group_channels
        wanted = -(-min_tasks // self.batch)  # chunks needed for min_tasks tasks
        merge = max(1, min(max_length // per_group, len(runs.first) // max(wanted, 1)))
        rows = []  # (first, length, first offset group, offset groups)
        for first, length, group in zip(runs.first, runs.length, runs.group, strict=True):
            first, length, group = int(first), int(length), int(group)
            last = rows[-1] if rows else None
            if (
                last is not None
                and length == per_group
                and last[1] % per_group == 0
                and last[3] < merge
                and last[0] // cg == first // cg
            ):
                rows[-1] = (last[0], last[1] + length, last[2], last[3] + 1)
            else:
                rows.append((first, length, group, 1))
        parts = max(1, -(-wanted // len(rows)))
        if parts > 1:
            cut = []
            for first, length, group, groups in rows:
                # Only single offset groups are cut (merging happened only with tasks to spare).
                pieces = max(1, min(parts, length // min_length)) if groups == 1 else 1
                step = -(-length // pieces)
                for start in range(first, first + length, step):
                    cut.append((start, min(step, first + length - start), group, groups))
            rows = cut
        part: dict[int, int] = {}
        table = []
        for first, length, group, groups in rows:
            weight_group = first // cg
            index = part.get(group, 0)
            part[group] = index + 1
            column = self.taps * (first - weight_group * cg)
            table.append((first, length, group, groups, weight_group, index, column))
        columns = (np.array(v, dtype=np.int64) for v in zip(*table, strict=True))
        return Chunks(*columns)

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


class Prologue:
    """What every kernel of one call reads, shared by the forward and the backward pass.

    Attributes:
        layout: the shapes; geometry: the same as the kernels read them.
        padded: ``(B, H + 2, W + 2, C)`` zero-bordered channels-last input (a reused buffer);
            padded_rows: the same as ``(B, (H + 2) * (W + 2) * C)`` NumPy rows.
        offset: ``(B, 2 * G * K, Ho * Wo)``; mask: ``(B, G * K, Ho * Wo)``, or ``(1, 1, Ho * Wo)``
            ones without one (``modulated`` False).
        base_y: ``(kh, Ho * Wo)`` and base_x: ``(kw, Ho * Wo)``, the sampling positions before
            offsets; runs: see :meth:`Layout.runs`.
        weight_rows: ``(O, K * C / groups)``, the weight in column order.
    """

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
        self.layout = layout = Layout(
            batch=batch,
            channels=channels,
            height=height,
            width=width,
            out_h=offset.shape[2],
            out_w=offset.shape[3],
            kernel_h=kh,
            kernel_w=kw,
            groups=channels // cpg,
            offset_groups=offset.shape[1] // (2 * kh * kw),
        )
        self.geometry = layout.geometry()
        self.dtype = input.dtype
        self.padded = padded_channels_last(input.detach(), "deform_conv2d.input")
        self.padded_rows = self.padded.view(batch, -1).numpy()
        self.offset = _rows(offset, batch, -1, layout.pixels)
        self.modulated = mask is not None
        self.mask = (
            _rows(mask, batch, -1, layout.pixels)
            if mask is not None
            else np.ones((1, 1, layout.pixels), dtype=self.padded_rows.dtype)
        )
        self.base_y, self.base_x, self.runs = _static(
            layout, stride, padding, dilation, self.padded_rows.dtype
        )
        self.weight_rows = (
            weight.detach().permute(0, 2, 3, 1).reshape(out_channels, -1).contiguous()
        )


@functools.lru_cache(maxsize=64)
def _static(
    layout: Layout, stride: Pair, padding: Pair, dilation: Pair, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, Runs]:
    """What a call reads that depends only on its shapes: ``(base_y, base_x, runs)``, cached
    (read-only) because a network calls each layer with the same shapes again and again."""
    oy, ox = np.divmod(np.arange(layout.pixels), layout.out_w)
    base_y = (
        np.arange(layout.kernel_h)[:, None] * dilation[0] + oy * stride[0] - padding[0]
    ).astype(dtype)
    base_x = (
        np.arange(layout.kernel_w)[:, None] * dilation[1] + ox * stride[1] - padding[1]
    ).astype(dtype)
    runs = layout.runs()
    for array in (base_y, base_x, *runs):
        array.flags.writeable = False
    return base_y, base_x, runs


def padded_channels_last(x: Tensor, name: str) -> Tensor:
    """``(B, C, H, W) -> (B, H + 2, W + 2, C)`` with a zero border, in the reused buffer
    ``name``."""
    b, c, h, w = x.shape
    xp = scratch(name, (b, h + 2, w + 2, c), x.dtype)
    xp[:, 0].zero_()
    xp[:, -1].zero_()
    xp[:, 1:-1, 0].zero_()
    xp[:, 1:-1, -1].zero_()
    _to_channels_last(x.numpy(), xp.numpy(), 1)
    return xp


def channels_last_rows(x: Tensor, name: str) -> Tensor:
    """``(B, C, H, W) -> (B, H * W, C)``, in the reused buffer ``name``."""
    b, c, h, w = x.shape
    rows = scratch(name, (b, h, w, c), x.dtype)
    _to_channels_last(x.numpy(), rows.numpy(), 0)
    return rows.view(b, h * w, c)


def unpadded(xp: Tensor) -> Tensor:
    """``(B, H + 2, W + 2, C)`` padded channels-last -> a fresh ``(B, C, H, W)`` tensor."""
    b, hp, wp, c = xp.shape
    out = torch.empty((b, c, hp - 2, wp - 2), dtype=xp.dtype)
    _from_channels_last(xp.numpy(), out.numpy(), 1)
    return out


# The layout changes run in Numba rather than as ``Tensor.copy_`` of a permuted view: on narrow
# layers torch's copy ran at 4 GB/s (batch 8, 48 channels, 32x32: 0.39 ms against 0.10 ms here).
# Each task is one row of one image: reads are contiguous, writes stride by the channel count.


@njit(parallel=True, cache=True)
def _to_channels_last(x, out, border):
    """``out[b, h + border, w + border, c] = x[b, c, h, w]``."""
    batch, channels, height, width = x.shape
    for task in prange(batch * height):
        b = task // height
        h = task - b * height
        for c in range(channels):
            for w in range(width):
                out[b, h + border, w + border, c] = x[b, c, h, w]


@njit(parallel=True, cache=True)
def _from_channels_last(xp, out, border):
    """``out[b, c, h, w] = xp[b, h + border, w + border, c]``."""
    batch, channels, height, width = out.shape
    for task in prange(batch * height):
        b = task // height
        h = task - b * height
        for c in range(channels):
            for w in range(width):
                out[b, c, h, w] = xp[b, h + border, w + border, c]


def _rows(t: Tensor, *shape: int) -> np.ndarray:
    return t.detach().contiguous().view(*shape).numpy()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A reused buffer of ``shape`` (contents undefined)."""
    return cpu_buffers.get(name, int(math.prod(shape)), dtype).view(shape)


def chunk_columns(layout: Layout, chunks: Chunks) -> np.ndarray:
    """``(K * C / groups,)`` int64 for each weight group's chunk-major column order:
    ``weight_rows[:, index]`` is the weight in that order, and the chunk-major weight gradient
    goes back by ``grad[:, index] = chunked``. (Every weight group has the same chunk layout
    relative to its first channel only when offset and weight groups line up, so the index is
    built per weight group, shape ``(groups, K * C / groups)``.)"""
    cg, taps = layout.group_channels, layout.taps
    index = np.empty((layout.groups, taps * cg), dtype=np.int64)
    for first, length, weight_group, column in zip(
        chunks.first, chunks.length, chunks.weight_group, chunks.column, strict=True
    ):
        start = int(first) - int(weight_group) * cg
        for k in range(taps):
            span = slice(int(column) + k * int(length), int(column) + (k + 1) * int(length))
            index[weight_group, span] = k * cg + start + np.arange(int(length))
    return index
