"""The demo's figures: where the trained deformable layers sample on deformed digits, their offset
fields, how their sampling spread follows the digits' scale, the training curves, and the
restoration task's inputs, outputs and targets (occluded digits:
:mod:`~deformconv.demo.occluded_sampling`).

Every function returns a ``matplotlib.figure.Figure``; the command line saves them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from deformconv.demo.data import Split
from deformconv.demo.models import DigitCNN
from deformconv.demo.train import TrainResult
from deformconv.tools.visualize import (
    SamplingExample,
    SamplingLayer,
    offset_field,
    offset_field_figure,
    sampling_figure,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "dilation_by_scale",
    "dilation_figure",
    "example_indices",
    "restoration_figure",
    "sampling_examples",
    "training_curves_figure",
    "unit_positions",
]


def example_indices(split: Split, count: int = 3) -> list[int]:
    """Indices of ``count`` images spanning the applied scales (smallest, ..., largest).

    Example:
        >>> split = Split(torch.zeros(5, 1, 4, 4), torch.zeros(5, dtype=torch.long),
        ...               torch.tensor([1.0, 0.5, 1.4, 0.9, 1.1]))
        >>> example_indices(split, 3)
        [1, 0, 2]
    """
    if split.scales is None:
        return list(range(min(count, len(split))))
    order = torch.argsort(split.scales).tolist()
    picks = np.linspace(0, len(order) - 1, count).round().astype(int)
    return [order[i] for i in picks]


def unit_positions(image: torch.Tensor, grid: int) -> list[tuple[float, float]]:
    """Two top-layer units of a ``grid x grid`` map: one on the digit, one on the background.

    The digit unit is the one nearest the image's intensity-weighted centre. The background unit
    is, among the darkest units, the one whose distance from the digit unit is closest to half
    the grid: clear of the digit, but not in a corner where most of its kernel is off the image.

    Example:
        >>> image = torch.zeros(1, 16, 16); image[0, 4:8, 4:8] = 1
        >>> unit_positions(image, 4)
        [(1.0, 1.0), (1.0, 3.0)]
    """
    pooled = F.adaptive_avg_pool2d(image.reshape(1, 1, *image.shape[-2:]).float(), grid)[0, 0]
    total = float(pooled.sum())
    coords = torch.arange(grid, dtype=torch.float32)
    if total > 0:
        cy = float((pooled.sum(1) * coords).sum() / total)
        cx = float((pooled.sum(0) * coords).sum() / total)
    else:
        cy = cx = (grid - 1) / 2
    digit = (float(round(cy)), float(round(cx)))
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    distance = ((yy - digit[0]) ** 2 + (xx - digit[1]) ** 2).sqrt()
    dark = pooled <= pooled.min() + 0.05 * pooled.max()
    score = torch.where(dark, (distance - grid / 2).abs(), torch.full_like(pooled, float("inf")))
    flat = int(torch.argmin(score))
    return [digit, (float(flat // grid), float(flat % grid))]


def sampling_examples(
    model: DigitCNN, split: Split, indices: Sequence[int]
) -> list[SamplingExample]:
    """Sampling examples of ``model`` on ``split[indices]``, each with a digit and a background
    unit (see :func:`unit_positions`) and a title giving label, prediction and scale."""
    images = split.images[list(indices)]
    stacks = model.sampling_stacks(images)
    with torch.no_grad():
        predictions = model.eval()(images.to(model.classifier.weight)).argmax(1).tolist()
    grid = stacks[0][-1].offset.shape[-1] if stacks[0][-1].offset is not None else None
    if grid is None:
        raise ValueError("model's last convolution is regular: it has no sampling offsets")
    examples = []
    for k, index in enumerate(indices):
        title = f"label {int(split.labels[index])}, predicted {predictions[k]}"
        if split.scales is not None:
            title += f", scale {float(split.scales[index]):.2f}"
        positions = unit_positions(images[k], grid)
        examples.append(
            SamplingExample(
                images[k, 0],
                stacks[k],
                positions,
                title,
                ("unit on the digit", "unit on the background"),
            )
        )
    return examples


def _digit_units(image: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    pooled = F.adaptive_avg_pool2d(image.reshape(1, 1, *image.shape[-2:]).float(), shape)[0, 0]
    keep = pooled > 0.25 * float(pooled.max())
    return keep.numpy()


def dilation_by_scale(
    model: DigitCNN, split: Split, batch_size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Mean effective dilation of each deformable layer over the units on the digit, per image.

    Returns:
        ``scales`` ``(N,)`` (the split's applied scales; ones if it has none) and ``dilation``
        ``(N, L)`` for the ``L`` deformable layers (see
        :func:`~deformconv.tools.visualize.offset_field`).
    """
    rows = []
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size]
        for image, stack in zip(images, model.sampling_stacks(images), strict=True):
            rows.append(_stack_dilation(image, stack))
    scales = split.scales if split.scales is not None else torch.ones(len(split))
    return scales.numpy().astype(np.float64), np.array(rows)


def _stack_dilation(image: torch.Tensor, stack: Sequence[SamplingLayer]) -> list[float]:
    values = []
    for index, layer in enumerate(stack):
        if layer.offset is None:
            continue
        field = offset_field(stack, index)
        keep = _digit_units(image, field.dilation.shape)
        values.append(float(field.dilation[keep].mean()) if keep.any() else float("nan"))
    return values


def _figure() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("figures need matplotlib: pip install 'deformconv[demo]'") from exc
    return Figure


def dilation_figure(
    measured: Mapping[str, tuple[np.ndarray, np.ndarray]],
    layer_names: Sequence[str],
) -> Figure:
    """Effective dilation against the digit's scale: one row per model, one panel per layer,
    with a least-squares line and the correlation ``r`` in the legend.

    Args:
        measured: model name -> ``(scales (N,), dilation (N, L))`` of :func:`dilation_by_scale`.
        layer_names: names of the ``L`` layers.
    """
    Figure = _figure()
    if not measured:
        raise ValueError("measured must hold at least one model, got none")
    count = len(layer_names)
    fig = Figure(figsize=(3.2 * count + 0.6, 2.9 * len(measured) + 0.7), layout="constrained")
    axes = fig.subplots(len(measured), count, squeeze=False)
    for row, (name, (scales, dilation)) in enumerate(measured.items()):
        if dilation.shape[1] != count:
            raise ValueError(
                f"dilation of {name!r} has {dilation.shape[1]} layers, layer_names {count}"
            )
        for k, ax in enumerate(axes[row]):
            y = dilation[:, k]
            ok = np.isfinite(y)
            ax.scatter(scales[ok], y[ok], s=9, alpha=0.5, color="#4363d8", linewidths=0)
            if ok.sum() > 2:
                slope, intercept = np.polyfit(scales[ok], y[ok], 1)
                xs = np.linspace(scales[ok].min(), scales[ok].max(), 2)
                r = float(np.corrcoef(scales[ok], y[ok])[0, 1])
                ax.plot(xs, slope * xs + intercept, color="#e6194b", label=f"fit, r = {r:.2f}")
                ax.legend(fontsize=9, loc="upper left")
            ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel("scale applied to the digit")
            if k == 0:
                ax.set_ylabel(f"{name}\neffective dilation", fontsize=9)
            ax.set_title(layer_names[k], fontsize=10)
            ax.grid(alpha=0.3)
    fig.suptitle(
        "Does the sampling spread follow the digit's size? (units on the digit, "
        "deformed test digits; 1 = regular grid)",
        fontsize=10,
    )
    return fig


def training_curves_figure(runs: Mapping[str, Mapping[str, TrainResult]]) -> Figure:
    """Training loss and validation accuracy per epoch; one row per protocol, one line per run.

    Args:
        runs: protocol title -> run name -> its :class:`~deformconv.demo.train.TrainResult`.
    """
    Figure = _figure()
    if not runs:
        raise ValueError("runs must hold at least one protocol, got none")
    fig = Figure(figsize=(10, 3.3 * len(runs) + 0.4), layout="constrained")
    axes = fig.subplots(len(runs), 2, squeeze=False)
    colours = ("#4363d8", "#e6194b", "#3cb44b", "#f58231")
    for row, (title, results) in enumerate(runs.items()):
        loss_ax, acc_ax = axes[row]
        for k, (name, result) in enumerate(results.items()):
            epochs = [r.epoch for r in result.history]
            colour = colours[k % len(colours)]
            loss_ax.plot(
                epochs,
                [r.train_loss for r in result.history],
                marker="o",
                markersize=3,
                color=colour,
                label=name,
            )
            acc_ax.plot(
                epochs,
                [100 * r.val_accuracy for r in result.history],
                marker="o",
                markersize=3,
                color=colour,
                label=name,
            )
            acc_ax.scatter(
                [result.best_epoch],
                [100 * result.best_val_accuracy],
                s=90,
                facecolors="none",
                edgecolors=colour,
                linewidths=1.5,
            )
        loss_ax.set_ylabel("training loss")
        loss_ax.set_yscale("log")
        acc_ax.set_ylabel("validation accuracy (%)")
        for ax in (loss_ax, acc_ax):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.set_title(title, fontsize=10)
        acc_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(
        "Training curves; validation digits are deformed unless marked plain "
        "(circle: epoch selected on validation)",
        fontsize=11,
    )
    return fig


def sampling_figures(
    model: DigitCNN, split: Split, count: int = 3, title: str = ""
) -> tuple[Figure, Figure]:
    """The sampling-point figure and the offset-field figure of ``model`` on ``count`` images."""
    examples = sampling_examples(model, split, example_indices(split, count))
    deformable = sum(layer.offset is not None for layer in examples[0].layers)
    return (
        sampling_figure(
            examples,
            depth=deformable,
            title=f"{title}\nimage points that 2 top-layer units sample through "
            f"{deformable} deformable layers",
        ),
        offset_field_figure(examples, title=f"{title}: offset field"),
    )


def restoration_figure(
    inputs: torch.Tensor,
    outputs: Mapping[str, torch.Tensor],
    targets: torch.Tensor,
    title: str = "",
) -> Figure:
    """One row per image: the input, each model's output and the target, side by side, with
    each output's mean squared error against the target.

    Args:
        inputs: ``(N, 1, H, W)``.
        outputs: model name -> its ``(N, 1, H, W)`` outputs.
        targets: ``(N, 1, H, W)``.
    """
    Figure = _figure()
    count = inputs.shape[0]
    if count == 0:
        raise ValueError("inputs must hold at least one image, got none")
    for name, out in outputs.items():
        if out.shape != targets.shape or inputs.shape != targets.shape:
            raise ValueError(
                f"inputs, outputs[{name!r}] and targets must have one shape, got "
                f"{tuple(inputs.shape)}, {tuple(out.shape)} and {tuple(targets.shape)}"
            )
    columns = {"input": inputs, **outputs, "target": targets}
    fig = Figure(figsize=(1.9 * len(columns) + 0.4, 1.9 * count + 0.9), layout="constrained")
    axes = fig.subplots(count, len(columns), squeeze=False)
    for col, (name, images) in enumerate(columns.items()):
        for row in range(count):
            ax = axes[row, col]
            ax.imshow(images[row, 0].detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if name != "target":
                error = float(((images[row] - targets[row]) ** 2).mean())
                ax.set_xlabel(f"error {error:.4f}", fontsize=8)
            if row == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title or "Restoration: input, outputs and target", fontsize=11)
    return fig
