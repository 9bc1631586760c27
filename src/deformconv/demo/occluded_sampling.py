"""Where deformable layers sample on occluded digits, next to the same digits unoccluded.

:func:`occluder_sampling_share` measures it: the share of the sampling points of one top-layer
unit (the unit on the digit) that fall on the occluder, once on the occluded digit and once on the
same digit unoccluded, with the same occluder outline. A regular CNN samples the same grid in
both, so its two shares are equal; a deformable layer that learned to look around what hides the
digit gives a smaller share on the occluded digit. :func:`occlusion_sampling_figure` draws the
points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from deformconv.demo.data import Split
from deformconv.demo.figures import _figure, unit_positions
from deformconv.demo.models import DigitCNN
from deformconv.tools.visualize import SamplingLayer, sampling_points, unit_centre

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["occluder_sampling_share", "occluder_unit", "occlusion_sampling_figure", "share_on"]


def share_on(points: np.ndarray, mask: np.ndarray) -> float:
    """Share of ``points`` (``(P, 2)`` image rows and columns) that fall on a ``True`` pixel of
    ``mask`` (``(H, W)``); a point belongs to the pixel it rounds to, points off the image to none.

    Example:
        >>> mask = np.zeros((4, 4), dtype=bool); mask[1, 2] = True
        >>> share_on(np.array([[1.2, 1.6], [0.0, 0.0], [9.0, 2.0], [0.9, 2.4]]), mask)
        0.5
    """
    rows, cols = np.rint(points[:, 0]).astype(int), np.rint(points[:, 1]).astype(int)
    inside = (rows >= 0) & (rows < mask.shape[0]) & (cols >= 0) & (cols < mask.shape[1])
    hits = mask[rows[inside], cols[inside]]
    return float(hits.sum()) / max(len(points), 1)


def _depth(stack: Sequence[SamplingLayer]) -> int:
    depth = sum(layer.offset is not None for layer in stack)
    if stack[-1].offset is None:
        raise ValueError("model's last convolution is regular: it has no sampling offsets")
    return depth


def occluder_sampling_share(
    model: DigitCNN, plain: Split, occluded: Split, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the share of the digit unit's sampling points on the occluder.

    The unit is the top-layer unit on the digit (:func:`~deformconv.demo.figures.unit_positions`
    of the unoccluded image); its points are followed down every deformable layer.

    Args:
        model: a classifier with deformable layers (its last convolution deformable).
        plain: the unoccluded images.
        occluded: the same images occluded, with their ``occluders``.

    Returns:
        ``(on_plain, on_occluded)``, each ``(N,)``: the shares on the unoccluded and on the
        occluded image, measured against the same occluder outline.
    """
    if occluded.occluders is None:
        raise ValueError("occluded must be an occluded split (its occluders are None)")
    shares: list[list[float]] = [[], []]
    for start in range(0, len(plain), batch_size):
        batch = slice(start, start + batch_size)
        stacks = [model.sampling_stacks(s.images[batch]) for s in (plain, occluded)]
        depth = _depth(stacks[0][0])
        grid = stacks[0][0][-1].offset.shape[-1]
        for k in range(len(stacks[0])):
            index = start + k
            unit = unit_positions(plain.images[index], grid)[0]
            mask = occluded.occluders[index, 0].numpy()
            for which in range(2):
                points, _ = sampling_points(stacks[which][k], unit, depth)
                shares[which].append(share_on(points, mask))
    return np.array(shares[0]), np.array(shares[1])


def occluder_unit(occluder: torch.Tensor, grid: int) -> tuple[float, float]:
    """The top-layer unit of a ``grid x grid`` map over the occluder's centre of mass.

    Args:
        occluder: ``(H, W)`` or ``(1, H, W)`` bool.

    Example:
        >>> mask = torch.zeros(16, 16, dtype=torch.bool); mask[9:13, 1:5] = True
        >>> occluder_unit(mask, 4)
        (2.0, 0.0)
    """
    mask = occluder.reshape(occluder.shape[-2:])
    h, w = mask.shape
    where = torch.nonzero(mask).float()
    if where.numel() == 0:
        return (float((grid - 1) // 2), float((grid - 1) // 2))
    row, col = where.mean(0).tolist()
    return (
        float(min(grid - 1, int(row * grid / h))),
        float(min(grid - 1, int(col * grid / w))),
    )


def occlusion_sampling_figure(
    model: DigitCNN,
    plain: Split,
    occluded: Split,
    indices: Sequence[int],
    title: str = "",
) -> Figure:
    """Where the deformable layers sample on occluded digits (right) and on the same digits
    unoccluded (left).

    Two top-layer units are followed down every deformable layer in both panels: the unit on
    the digit (:func:`~deformconv.demo.figures.unit_positions`, on the unoccluded digit) and the
    unit over the occluder (:func:`occluder_unit`); the occluder's outline is drawn in both.

    Args:
        model: a classifier with deformable layers.
        plain: the unoccluded images.
        occluded: the same images occluded, with their ``occluders``.
        indices: which images, one row each.
    """
    Figure = _figure()
    if occluded.occluders is None:
        raise ValueError("occluded must be an occluded split (its occluders are None)")
    if len(indices) == 0:
        raise ValueError("indices must name at least one image, got none")
    index = list(indices)
    pairs = (plain.images[index], occluded.images[index])
    stacks = [model.sampling_stacks(images) for images in pairs]
    depth = _depth(stacks[0][0])
    grid = stacks[0][0][-1].offset.shape[-1]
    with torch.no_grad():
        device = model.classifier.weight
        predicted = [model.eval()(images.to(device)).argmax(1).tolist() for images in pairs]
    fig = Figure(figsize=(6.6, 3.1 * len(index) + 1.2), layout="constrained")
    axes = fig.subplots(len(index), 2, squeeze=False)
    colours = ("#e6194b", "#42d4f4")
    names = ("unit on the digit", "unit over the occluder")
    for row, k in enumerate(index):
        mask = occluded.occluders[k, 0].numpy()
        units = [
            unit_positions(plain.images[k], grid)[0],
            occluder_unit(occluded.occluders[k], grid),
        ]
        traced = [
            [sampling_points(stacks[col][row], unit, depth)[0] for unit in units]
            for col in range(2)
        ]
        image = pairs[0][row, 0].numpy()
        low = np.minimum([-0.5, -0.5], np.min([p.min(0) - 1 for c in traced for p in c], 0))
        high = np.maximum(
            [image.shape[0] - 0.5, image.shape[1] - 0.5],
            np.max([p.max(0) + 1 for c in traced for p in c], 0),
        )
        for col, caption in enumerate(("unoccluded", "occluded")):
            ax = axes[row, col]
            ax.set_facecolor("#3a3a3a")
            ax.imshow(pairs[col][row, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.contour(
                mask.astype(float),
                levels=[0.5],
                colors="#ffe119",
                linewidths=1.2,
                linestyles="--" if col == 0 else "-",
            )
            for u, points in enumerate(traced[col]):
                ax.scatter(
                    points[:, 1],
                    points[:, 0],
                    s=6,
                    c=colours[u],
                    alpha=0.6,
                    linewidths=0,
                    label=names[u],
                )
                centre = unit_centre(stacks[col][row], units[u])
                ax.scatter(
                    [centre[1]],
                    [centre[0]],
                    marker="*",
                    s=150,
                    c=colours[u],
                    edgecolors="white",
                    linewidths=1.0,
                    zorder=5,
                )
            ax.set_xlim(low[1], high[1])
            ax.set_ylim(high[0], low[0])
            ax.set_xticks([])
            ax.set_yticks([])
            share = share_on(traced[col][0], mask)
            ax.set_xlabel(
                f"predicted {predicted[col][row]}\n{100 * share:.0f}% of the red points on the "
                "occluder",
                fontsize=8,
            )
            if row == 0:
                ax.set_title(caption, fontsize=11)
        axes[row, 0].set_ylabel(f"label {int(plain.labels[k])}", fontsize=9)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncol=2,
        fontsize=9,
        markerscale=2.5,
        title="sampling points of the unit marked * in that colour; yellow: the occluder",
        title_fontsize=9,
    )
    fig.suptitle(
        f"{title}\nimage points that 2 top-layer units sample through {depth} deformable layers",
        fontsize=11,
    )
    return fig
