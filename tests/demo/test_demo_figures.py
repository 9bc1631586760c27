from __future__ import annotations

import numpy as np
import pytest
import torch

from deformconv.demo.data import Split
from deformconv.demo.figures import (
    dilation_by_scale,
    dilation_figure,
    example_indices,
    restoration_figure,
    sampling_examples,
    sampling_figures,
    training_curves_figure,
    unit_positions,
)
from deformconv.demo.train import EpochRecord, TrainResult
from deformconv.tools.visualize import offset_field


@pytest.mark.parametrize(("centre", "grid"), [((2, 2), 8), ((5, 1), 8), ((0, 0), 4)])
def test_unit_positions(centre, grid):
    image = torch.zeros(1, 32, 32)
    step = 32 // grid
    image[
        0, centre[0] * step : (centre[0] + 1) * step, centre[1] * step : (centre[1] + 1) * step
    ] = 1
    digit, background = unit_positions(image, grid)
    assert digit == (float(centre[0]), float(centre[1]))
    distance = np.hypot(background[0] - digit[0], background[1] - digit[1])
    assert abs(distance - grid / 2) < 1.0
    assert unit_positions(torch.zeros(1, 32, 32), 8)[0] == (4.0, 4.0)


def test_example_indices_span_the_scales(model_and_split):
    _, split = model_and_split
    assert example_indices(split, 3) == [0, 2, 5]
    plain = Split(split.images, split.labels)
    assert example_indices(plain, 2) == [0, 1]


def test_dilation_by_scale_matches_offset_field(model_and_split):
    model, split = model_and_split
    scales, dilation = dilation_by_scale(model, split, batch_size=4)
    np.testing.assert_allclose(scales, split.scales.numpy(), rtol=1e-6)
    assert dilation.shape == (6, 2)
    stack = model.sampling_stacks(split.images[:1])[0]
    field = offset_field(stack, 3)
    # Units whose pooled intensity reaches a quarter of the maximum are on the digit.
    pooled = torch.nn.functional.adaptive_avg_pool2d(split.images[:1], 4)[0, 0]
    keep = (pooled > 0.25 * pooled.max()).numpy()
    assert dilation[0, 1] == pytest.approx(field.dilation[keep].mean())


def test_figures_render(model_and_split):
    model, split = model_and_split
    examples = sampling_examples(model, split, [0, 5])
    assert [e.names for e in examples] == [("unit on the digit", "unit on the background")] * 2
    assert "scale 0.50" in examples[0].title
    sampling, field = sampling_figures(model, split, 2, "tiny")
    assert len(sampling.axes) == 4 and len(field.axes) == 2 * 2 + 1
    measured = {"tiny": dilation_by_scale(model, split)}
    assert len(dilation_figure(measured, ["layer 3", "layer 4"]).axes) == 2
    with pytest.raises(ValueError, match="has 2 layers, layer_names 1"):
        dilation_figure(measured, ["layer 4"])
    history = [EpochRecord(e, 1.0 / e, 0.5, 0.4 + 0.1 * e, 0.1) for e in (1, 2, 3)]
    runs = {"P": {"a": TrainResult(history, 3, 0.7), "b": TrainResult(history[:2], 2, 0.6)}}
    curves = training_curves_figure(runs)
    assert len(curves.axes) == 2
    assert [t.get_text() for t in curves.axes[1].get_legend().get_texts()] == ["a", "b"]
    with pytest.raises(ValueError, match="at least one protocol"):
        training_curves_figure({})


def test_restoration_figure():
    inputs, targets = torch.zeros(3, 1, 9, 9), torch.ones(3, 1, 9, 9)
    fig = restoration_figure(inputs, {"a": torch.full_like(targets, 0.5)}, targets, "t")
    assert len(fig.axes) == 3 * 3
    assert [ax.get_title() for ax in fig.axes[:3]] == ["input", "a", "target"]
    # The error under each image is its mean squared error against the target.
    assert fig.axes[0].get_xlabel() == "error 1.0000"
    assert fig.axes[1].get_xlabel() == "error 0.2500"
    with pytest.raises(ValueError, match="must have one shape"):
        restoration_figure(inputs, {"a": torch.zeros(3, 1, 8, 8)}, targets)
