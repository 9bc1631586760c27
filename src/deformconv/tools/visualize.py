"""Where deformable convolutions sample: the points, followed back through stacked layers, and
figures of them in the style of Dai et al. 2017 ("Deformable Convolutional Networks", Fig. 5-6).

Coordinates are ``(row, column)`` in pixels of the input image, pixel ``i`` centred at ``i``. A
stack is described bottom-up by :class:`SamplingLayer` records (kernel geometry, the offsets a
layer predicted for one image, and how the layer's input coordinates map to the previous layer's
output, e.g. through a 2x2 pooling). :func:`sampling_points` starts from one unit of the top layer
and follows each kernel tap down, so ``L`` stacked 3x3 layers give ``9**L`` points.

The computations return NumPy arrays; the figure functions return ``matplotlib.figure.Figure``
objects (no pyplot, no global state) that the caller saves. matplotlib is imported only by them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "OffsetField",
    "SamplingExample",
    "SamplingLayer",
    "offset_field",
    "offset_field_figure",
    "sampling_figure",
    "sampling_points",
    "unit_centre",
]

Pair = tuple[int, int]


@dataclass(frozen=True)
class SamplingLayer:
    """One convolution of a stack, for one image.

    Args:
        kernel_size: the convolution's kernel ``(kh, kw)``.
        stride: the convolution's stride.
        padding: the convolution's padding.
        dilation: the convolution's dilation.
        offset: the offsets the layer applied, ``(2 * kh * kw, Ho, Wo)`` (channel ``2k`` is the
            row offset of tap ``k``, ``2k + 1`` the column offset, as in ``deform_conv2d``), or
            ``None`` for a regular convolution.
        mask: the modulation ``(kh * kw, Ho, Wo)`` of a DCNv2 layer, or ``None``.
        input_scale: input coordinate ``u`` of this layer is coordinate
            ``u * input_scale + input_shift`` of the previous layer's output (or of the image,
            for the first layer); a 2x2 pooling before the layer gives ``2``.
        input_shift: see ``input_scale``; a 2x2 pooling before the layer gives ``0.5``.
    """

    kernel_size: Pair = (3, 3)
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    offset: Tensor | np.ndarray | None = None
    mask: Tensor | np.ndarray | None = None
    input_scale: float = 1.0
    input_shift: float = 0.0

    def __post_init__(self) -> None:
        taps = self.kernel_size[0] * self.kernel_size[1]
        if self.offset is not None and (self.offset.ndim != 3 or self.offset.shape[0] != 2 * taps):
            raise ValueError(
                f"offset must have shape (2 * kh * kw = {2 * taps}, Ho, Wo), got "
                f"{tuple(self.offset.shape)}"
            )
        if self.mask is not None:
            if self.offset is None:
                raise ValueError("mask needs offset: a regular layer has no modulation")
            expected = (taps, *tuple(self.offset.shape[1:]))
            if tuple(self.mask.shape) != expected:
                raise ValueError(f"mask must have shape {expected}, got {tuple(self.mask.shape)}")
        if not self.input_scale > 0:
            raise ValueError(f"input_scale must be positive, got {self.input_scale!r}")

    def regular(self) -> SamplingLayer:
        """The same layer without offsets or mask: the regular grid."""
        return replace(self, offset=None, mask=None)


def _numpy(t: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, Tensor):
        return t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)


def _interpolate(field: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear values ``(C, N)`` of ``field (C, H, W)`` at points clamped into the grid."""
    _, h, w = field.shape
    ys = np.clip(ys, 0, h - 1)
    xs = np.clip(xs, 0, w - 1)
    y0 = np.minimum(np.floor(ys).astype(np.int64), h - 1)
    x0 = np.minimum(np.floor(xs).astype(np.int64), w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    fy, fx = ys - y0, xs - x0
    top = field[:, y0, x0] * (1 - fx) + field[:, y0, x1] * fx
    bottom = field[:, y1, x0] * (1 - fx) + field[:, y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _taps(layer: SamplingLayer) -> tuple[np.ndarray, np.ndarray]:
    kh, kw = layer.kernel_size
    ty = np.repeat(np.arange(kh) * layer.dilation[0], kw).astype(np.float64)
    tx = np.tile(np.arange(kw) * layer.dilation[1], kh).astype(np.float64)
    return ty, tx


def _expand(
    layer: SamplingLayer, ys: np.ndarray, xs: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Output points of ``layer`` -> its ``kh*kw`` sampling points each, in input coordinates."""
    ty, tx = _taps(layer)
    base_y = ys[:, None] * layer.stride[0] - layer.padding[0] + ty[None, :]
    base_x = xs[:, None] * layer.stride[1] - layer.padding[1] + tx[None, :]
    if layer.offset is not None:
        off = _interpolate(_numpy(layer.offset), ys, xs)  # (2K, N)
        base_y = base_y + off[0::2].T
        base_x = base_x + off[1::2].T
    w = np.repeat(weights[:, None], ty.size, axis=1)
    if layer.mask is not None:
        w = w * _interpolate(_numpy(layer.mask), ys, xs).T
    return base_y.ravel(), base_x.ravel(), w.ravel()


def _centre(layer: SamplingLayer, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Output points of ``layer`` -> the centre of their regular kernel, in input coordinates."""
    kh, kw = layer.kernel_size
    cy = ys * layer.stride[0] - layer.padding[0] + (kh - 1) / 2 * layer.dilation[0]
    cx = xs * layer.stride[1] - layer.padding[1] + (kw - 1) / 2 * layer.dilation[1]
    return cy, cx


def _check_stack(layers: Sequence[SamplingLayer], depth: int | None) -> int:
    if len(layers) == 0:
        raise ValueError("layers must hold at least one SamplingLayer, got an empty sequence")
    for index, layer in enumerate(layers):
        if not isinstance(layer, SamplingLayer):
            raise TypeError(f"layers[{index}] must be a SamplingLayer, got {type(layer).__name__}")
    if depth is None:
        return len(layers)
    if not 1 <= depth <= len(layers):
        raise ValueError(f"depth must be in [1, {len(layers)}] (the number of layers), got {depth}")
    return depth


def sampling_points(
    layers: Sequence[SamplingLayer],
    position: tuple[float, float],
    depth: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The image points that one top-layer unit samples, followed down through the stack.

    Args:
        layers: the stack, first (closest to the image) to last.
        position: ``(row, column)`` of the unit in the last layer's output.
        depth: follow the kernel taps through the last ``depth`` layers only (default: all);
            below them a point is carried down through the centre of each regular kernel.
            Offsets at fractional positions are interpolated bilinearly.

    Returns:
        ``points`` of shape ``(kh*kw)**depth x 2`` (``(row, column)`` image pixels) and their
        ``weights`` (the product of the modulation masks along the path; all ones without masks).

    Example:
        >>> layer = SamplingLayer(padding=(1, 1))
        >>> points, weights = sampling_points([layer], (4, 4))
        >>> points.tolist()[:3], weights.shape
        ([[3.0, 3.0], [3.0, 4.0], [3.0, 5.0]], (9,))
        >>> import torch
        >>> shifted = SamplingLayer(padding=(1, 1), offset=torch.full((18, 8, 8), 0.5))
        >>> sampling_points([shifted], (4, 4))[0][0].tolist()
        [3.5, 3.5]
    """
    depth = _check_stack(layers, depth)
    ys = np.array([float(position[0])])
    xs = np.array([float(position[1])])
    weights = np.ones(1)
    for level, layer in enumerate(reversed(layers)):
        if level < depth:
            ys, xs, weights = _expand(layer, ys, xs, weights)
        else:
            ys, xs = _centre(layer, ys, xs)
        ys = ys * layer.input_scale + layer.input_shift
        xs = xs * layer.input_scale + layer.input_shift
    return np.stack([ys, xs], axis=1), weights


def unit_centre(layers: Sequence[SamplingLayer], position: tuple[float, float]) -> np.ndarray:
    """Image ``(row, column)`` of the centre of a top-layer unit's regular receptive field.

    Example:
        >>> pooled = SamplingLayer(padding=(1, 1), input_scale=2.0, input_shift=0.5)
        >>> unit_centre([SamplingLayer(padding=(1, 1)), pooled], (3, 3)).tolist()
        [6.5, 6.5]
    """
    _check_stack(layers, None)
    ys = np.array([float(position[0])])
    xs = np.array([float(position[1])])
    for layer in reversed(layers):
        ys, xs = _centre(layer, ys, xs)
        ys = ys * layer.input_scale + layer.input_shift
        xs = xs * layer.input_scale + layer.input_shift
    return np.array([ys[0], xs[0]])


@dataclass(frozen=True)
class OffsetField:
    """What one layer does at each of its ``Ho x Wo`` output units, in image pixels.

    Attributes:
        centres: ``(Ho, Wo, 2)`` image position of each unit's regular kernel centre.
        displacement: ``(Ho, Wo, 2)`` mean shift of the unit's sampling points from the regular
            grid (row, column).
        dilation: ``(Ho, Wo)`` spread of the sampling points about their mean, relative to the
            regular grid's (1: as regular; 2: twice as wide).
    """

    centres: np.ndarray
    displacement: np.ndarray
    dilation: np.ndarray


def offset_field(layers: Sequence[SamplingLayer], index: int = -1) -> OffsetField:
    """Per-unit displacement and effective dilation of ``layers[index]``, in image pixels.

    Each unit's ``kh*kw`` sampling points are carried down to the image through the centres of
    the layers below, then compared with the regular grid.

    Example:
        >>> import torch
        >>> layer = SamplingLayer(padding=(1, 1), offset=torch.zeros(18, 4, 4))
        >>> field = offset_field([layer])
        >>> field.dilation.shape, float(field.dilation.mean()), float(abs(field.displacement).max())
        ((4, 4), 1.0, 0.0)
    """
    _check_stack(layers, None)
    if not -len(layers) <= index < len(layers):
        raise ValueError(f"index must be in [{-len(layers)}, {len(layers) - 1}], got {index}")
    index %= len(layers)
    layer = layers[index]
    if layer.offset is None:
        raise ValueError(
            f"layers[{index}] is a regular layer (offset None): it has no offset field"
        )
    h, w = layer.offset.shape[-2:]
    gy, gx = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )
    ys, xs = gy.ravel(), gx.ravel()
    taps = layer.kernel_size[0] * layer.kernel_size[1]
    learned = _expand(layer, ys, xs, np.ones_like(ys))
    grid = _expand(layer.regular(), ys, xs, np.ones_like(ys))
    centre_y, centre_x = _centre(layer, ys, xs)

    def down(py: np.ndarray, px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        py = py * layer.input_scale + layer.input_shift
        px = px * layer.input_scale + layer.input_shift
        for below_layer in reversed(layers[:index]):
            py, px = _centre(below_layer, py, px)
            py = py * below_layer.input_scale + below_layer.input_shift
            px = px * below_layer.input_scale + below_layer.input_shift
        return py, px

    ly, lx = (a.reshape(-1, taps) for a in down(learned[0], learned[1]))
    ry, rx = (a.reshape(-1, taps) for a in down(grid[0], grid[1]))
    cy, cx = down(centre_y, centre_x)

    def spread(py: np.ndarray, px: np.ndarray) -> np.ndarray:
        return np.sqrt(
            ((py - py.mean(1, keepdims=True)) ** 2 + (px - px.mean(1, keepdims=True)) ** 2).mean(1)
        )

    dilation = spread(ly, lx) / np.maximum(spread(ry, rx), 1e-12)
    displacement = np.stack([(ly - ry).mean(1), (lx - rx).mean(1)], axis=1)
    return OffsetField(
        centres=np.stack([cy, cx], axis=1).reshape(h, w, 2),
        displacement=displacement.reshape(h, w, 2),
        dilation=dilation.reshape(h, w),
    )


@dataclass(frozen=True)
class SamplingExample:
    """One image and its stack, with the top-layer units whose sampling points to draw.

    Args:
        image: ``(H, W)`` or ``(1, H, W)`` grey image.
        layers: the stack for this image (see :class:`SamplingLayer`).
        positions: ``(row, column)`` units of the last layer's output.
        title: shown beside the row.
        names: legend names of the positions (default ``unit 1``, ``unit 2``, ...).
    """

    image: Tensor | np.ndarray
    layers: Sequence[SamplingLayer]
    positions: Sequence[tuple[float, float]]
    title: str = ""
    names: Sequence[str] = ()


def _matplotlib() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("figures need matplotlib: pip install 'deformconv[demo]'") from exc
    return Figure


def _image2d(image: Tensor | np.ndarray) -> np.ndarray:
    array = _numpy(image)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"image must be (H, W) or (1, H, W), got shape {array.shape}")
    return array


_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4")


def _row_limits(
    image: np.ndarray, clouds: Sequence[np.ndarray]
) -> tuple[float, float, float, float]:
    """Axis limits holding the image and every point, so points outside the image stay visible."""
    low = np.array([-0.5, -0.5])
    high = np.array([image.shape[0] - 0.5, image.shape[1] - 0.5])
    for points in clouds:
        if points.size:
            low = np.minimum(low, points.min(0) - 1.0)
            high = np.maximum(high, points.max(0) + 1.0)
    return float(low[0]), float(high[0]), float(low[1]), float(high[1])


def _image_axes(ax, image: np.ndarray, limits: tuple[float, float, float, float]) -> None:
    from matplotlib.patches import Rectangle

    # Outside the image the layers read zeros: a dark surround with a dashed border shows it.
    ax.set_facecolor("#3a3a3a")
    ax.imshow(image, cmap="gray", vmin=0, vmax=max(1.0, float(image.max())))
    ax.add_patch(
        Rectangle(
            (-0.5, -0.5),
            image.shape[1],
            image.shape[0],
            fill=False,
            edgecolor="white",
            linestyle="--",
            linewidth=0.8,
        )
    )
    ax.set_xlim(limits[2], limits[3])
    ax.set_ylim(limits[1], limits[0])
    ax.set_xticks([])
    ax.set_yticks([])


def sampling_figure(
    examples: Sequence[SamplingExample],
    depth: int | None = None,
    title: str = "Where the kernels sample",
) -> Figure:
    """Per example (row), the regular grid beside the learned sampling points of a few units.

    Every unit's points are followed down ``depth`` layers (see :func:`sampling_points`); each
    unit has its own colour and its receptive-field centre is marked with a star. With a mask,
    a point's opacity follows its weight. The view extends past the image (dashed border) when
    points fall outside it.

    Example:
        >>> import torch
        >>> layer = SamplingLayer(padding=(1, 1), offset=torch.randn(18, 8, 8))
        >>> fig = sampling_figure([SamplingExample(torch.rand(8, 8), [layer], [(4, 4)])])
        >>> len(fig.axes)
        2
    """
    Figure = _matplotlib()
    if len(examples) == 0:
        raise ValueError("examples must hold at least one SamplingExample, got none")
    rows = len(examples)
    fig = Figure(figsize=(6.4, 3.1 * rows + 1.1), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False)
    for row, example in enumerate(examples):
        image = _image2d(example.image)
        stacks = ([layer.regular() for layer in example.layers], list(example.layers))
        traced = [[sampling_points(stack, p, depth) for p in example.positions] for stack in stacks]
        limits = _row_limits(image, [points for panel in traced for points, _ in panel])
        for col, panel in enumerate(("regular grid", "learned (deformable)")):
            ax = axes[row, col]
            _image_axes(ax, image, limits)
            for k, (points, weights) in enumerate(traced[col]):
                colour = _COLOURS[k % len(_COLOURS)]
                alpha = np.clip(weights / max(float(weights.max()), 1e-12), 0.15, 1.0) * 0.8
                name = example.names[k] if k < len(example.names) else f"unit {k + 1}"
                ax.scatter(
                    points[:, 1], points[:, 0], s=7, c=colour, alpha=alpha, linewidths=0, label=name
                )
                centre = unit_centre(example.layers, example.positions[k])
                ax.scatter(
                    [centre[1]],
                    [centre[0]],
                    marker="*",
                    s=170,
                    c=colour,
                    edgecolors="white",
                    linewidths=1.0,
                    zorder=5,
                )
            if row == 0:
                ax.set_title(panel, fontsize=11)
        if example.title:
            axes[row, 0].set_ylabel(example.title, fontsize=9)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncol=len(handles),
            fontsize=9,
            markerscale=2.5,
            title="sampling points of the unit marked * in that colour (dashed: image border)",
            title_fontsize=9,
        )
    fig.suptitle(title, fontsize=11)
    return fig


def offset_field_figure(
    examples: Sequence[SamplingExample],
    title: str = "Offset field of each deformable layer",
) -> Figure:
    """Per example (row) and deformable layer (column): arrows of the mean shift of each unit's
    sampling points over a colour map of its effective dilation (:func:`offset_field`).

    Arrows of a column share one scale, stated in its title, so the longest fit between units.

    Example:
        >>> import torch
        >>> layer = SamplingLayer(padding=(1, 1), offset=torch.randn(18, 8, 8))
        >>> fig = offset_field_figure([SamplingExample(torch.rand(8, 8), [layer], [])])
        >>> len(fig.axes)
        2
    """
    Figure = _matplotlib()
    from matplotlib.colors import TwoSlopeNorm

    if len(examples) == 0:
        raise ValueError("examples must hold at least one SamplingExample, got none")
    deformable = [i for i, layer in enumerate(examples[0].layers) if layer.offset is not None]
    if not deformable:
        raise ValueError("the examples' layers have no offsets: nothing to draw")
    rows, cols = len(examples), len(deformable)
    fig = Figure(figsize=(2.7 * cols + 1.2, 2.7 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    fields = [[offset_field(ex.layers, i) for i in deformable] for ex in examples]
    top = max(2.0, max(float(f.dilation.max()) for row in fields for f in row))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)
    mappable = None
    for col, index in enumerate(deformable):
        column = [fields[row][col] for row in range(rows)]
        centres = column[0].centres
        h, w = column[0].dilation.shape
        step_y = (centres[-1, 0, 0] - centres[0, 0, 0]) / max(h - 1, 1)
        step_x = (centres[0, -1, 1] - centres[0, 0, 1]) / max(w - 1, 1)
        lengths = np.concatenate([np.hypot(*f.displacement.reshape(-1, 2).T) for f in column])
        longest = float(np.percentile(lengths, 95)) if lengths.size else 0.0
        # Arrows shorter than a unit spacing stay true to scale; longer fields are shrunk.
        shrink = min(1.0, 0.9 * min(step_y, step_x) / longest) if longest > 0 else 1.0
        extent = (
            centres[0, 0, 1] - step_x / 2,
            centres[0, -1, 1] + step_x / 2,
            centres[-1, 0, 0] + step_y / 2,
            centres[0, 0, 0] - step_y / 2,
        )
        for row, example in enumerate(examples):
            image = _image2d(example.image)
            field = column[row]
            ax = axes[row, col]
            _image_axes(ax, image, (-0.5, image.shape[0] - 0.5, -0.5, image.shape[1] - 0.5))
            mappable = ax.imshow(
                field.dilation,
                cmap="coolwarm",
                norm=norm,
                alpha=0.4,
                extent=extent,
                interpolation="nearest",
            )
            ax.quiver(
                field.centres[..., 1],
                field.centres[..., 0],
                shrink * field.displacement[..., 1],
                -shrink * field.displacement[..., 0],
                color="yellow",
                angles="xy",
                scale_units="xy",
                scale=1.0,
                width=0.012,
            )
            if row == 0:
                scale = "true length" if shrink == 1.0 else f"arrows x{shrink:.2f}"
                ax.set_title(f"layer {index + 1} ({scale})", fontsize=10)
            if col == 0 and example.title:
                ax.set_ylabel(example.title, fontsize=9)
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=axes, shrink=0.8)
        bar.set_label("effective dilation (1 = regular grid)")
    fig.suptitle(
        title + "\narrows: mean shift of each unit's sampling points (image pixels)", fontsize=11
    )
    return fig
