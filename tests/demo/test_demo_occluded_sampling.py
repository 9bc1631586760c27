from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deformconv.demo.data import Split
from deformconv.demo.models import DigitCNN, ModelConfig
from deformconv.demo.occluded_sampling import (
    occluder_sampling_share,
    occluder_unit,
    occlusion_sampling_figure,
    share_on,
)


def _occluded(split: Split, rows: slice = slice(4, 8), cols: slice = slice(6, 10)) -> Split:
    occluders = torch.zeros(len(split), 1, 16, 16, dtype=torch.bool)
    occluders[:, :, rows, cols] = True
    return Split(torch.where(occluders, 0.5, split.images), split.labels, occluders=occluders)


@pytest.mark.parametrize(
    ("rows", "cols", "grid", "expected"),
    [
        ((0, 4), (0, 4), 4, (0.0, 0.0)),
        ((12, 16), (4, 8), 4, (3.0, 1.0)),
        ((8, 12), (2, 6), 2, (1.0, 0.0)),
    ],
)
def test_occluder_unit(rows, cols, grid, expected):
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, rows[0] : rows[1], cols[0] : cols[1]] = True
    assert occluder_unit(mask, grid) == expected


def test_occlusion_figure_traces_both_panels(model_and_split):
    model, split = model_and_split
    occluded = _occluded(split)
    fig = occlusion_sampling_figure(model, split, occluded, [0, 3], "tiny")
    assert len(fig.axes) == 4
    top = fig.axes[0]
    # Each panel holds the image, two point clouds and two stars; both units are traced.
    clouds = [c for c in top.collections if c.get_offsets().shape[0] == 9**2]
    assert len(clouds) == 2
    assert "predicted" in top.get_xlabel() and top.get_ylabel() == "label 0"
    with pytest.raises(ValueError, match="occluded must be an occluded split"):
        occlusion_sampling_figure(model, split, split, [0])
    with pytest.raises(ValueError, match="at least one image"):
        occlusion_sampling_figure(model, split, occluded, [])


def test_share_on_by_hand():
    mask = np.zeros((5, 5), dtype=bool)
    mask[1:3, 1:3] = True
    # Points round to the nearest pixel; those off the image count, but never as hits.
    points = np.array([[1.4, 1.4], [2.6, 1.0], [0.6, 2.4], [-3.0, 1.0], [4.0, 4.0], [1.0, 7.0]])
    assert share_on(points, mask) == pytest.approx(2 / 6)


def test_share_is_the_same_without_offsets(model_and_split):
    """With zero offsets a deformable CNN samples the regular grid whatever the image: the two
    shares must agree, image by image."""
    _, split = model_and_split
    torch.manual_seed(1)
    still = DigitCNN(ModelConfig(channels=(4, 4, 8, 8), deformable=2, image_size=16)).eval()
    occluded = _occluded(split, rows=slice(0, 9), cols=slice(0, 16))  # the upper half
    on_plain, on_occluded = occluder_sampling_share(still, split, occluded, batch_size=4)
    np.testing.assert_array_equal(on_plain, on_occluded)
    assert on_plain.shape == (6,) and (on_plain > 0).all()
    for conv in still.convs[2:]:
        nn.init.normal_(conv.conv_offset.weight, std=2.0)
    moved_plain, moved_occluded = occluder_sampling_share(still, split, occluded)
    # Offsets that depend on the image move the points differently on the two images.
    assert not np.array_equal(moved_plain, moved_occluded)
    with pytest.raises(ValueError, match="occluded must be an occluded split"):
        occluder_sampling_share(still, split, split)
