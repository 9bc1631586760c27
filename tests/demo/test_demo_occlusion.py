from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from deformconv.demo.data import load_digits
from deformconv.demo.occlusion import OCCLUDERS, Occlusion, coverage, digit_pixels, occlude


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_digits(size=32, digit_size=20).test.images[:40]


def _counted(image: np.ndarray, mask: np.ndarray, threshold: float) -> tuple[int, int]:
    """Digit pixels and covered digit pixels of one image, counted pixel by pixel."""
    peak = image.max()
    digit = covered = 0
    for r in range(image.shape[0]):
        for c in range(image.shape[1]):
            if peak > 0 and image[r, c] > threshold * peak:
                digit += 1
                covered += int(mask[r, c])
    return digit, covered


@pytest.mark.parametrize("shape", OCCLUDERS)
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.9])
def test_occluder_covers_the_stated_fraction(digits, shape, fraction):
    occlusion = Occlusion(fraction=fraction, shape=shape)
    _, masks = occlude(digits, occlusion, torch.Generator().manual_seed(0))
    for n in range(digits.shape[0]):
        image, mask = digits[n, 0].numpy(), masks[n, 0].numpy()
        total, covered = _counted(image, mask, occlusion.threshold)
        wanted = math.ceil(fraction * total)
        if shape == "rectangle":
            # A rectangle grows by whole rows and columns: it may miss the count by up to
            # the digit pixels of one row or column of its outline.
            rows, cols = np.nonzero(mask)
            digit = image > occlusion.threshold * image.max()
            edges = [digit[rows.min(), :], digit[rows.max(), :], digit[:, cols.min()]]
            edges.append(digit[:, cols.max()])
            slack = max(int(e.sum()) for e in edges)
        else:
            slack = 1  # a blob's outline is continuous: ties at equal distance are rare
        assert abs(covered - wanted) <= slack, (n, covered, wanted, slack)
        assert coverage(digits[n : n + 1], masks[n : n + 1]).item() == pytest.approx(
            covered / total
        )


@pytest.mark.parametrize("shape", OCCLUDERS)
def test_occluder_shape_fill_and_untouched_pixels(digits, shape):
    occlusion = Occlusion(fraction=0.4, shape=shape, fill=0.75)
    out, masks = occlude(digits, occlusion, torch.Generator().manual_seed(1))
    assert out.shape == digits.shape and masks.dtype == torch.bool
    assert torch.equal(out[masks], torch.full_like(out[masks], 0.75))
    assert torch.equal(out[~masks], digits[~masks])
    rectangles = 0
    for n in range(digits.shape[0]):
        mask = masks[n, 0].numpy()
        _, components = ndimage.label(mask)
        assert components == 1, n  # one piece
        assert (mask & digit_pixels(digits[n : n + 1])[0, 0].numpy()).any()  # over the digit
        rows, cols = np.nonzero(mask)
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        rectangles += int(box.all())
    if shape == "rectangle":
        assert rectangles == digits.shape[0]
    else:
        assert rectangles < digits.shape[0] // 4


def test_occlusion_is_seeded_and_erases_with_fill_zero(digits):
    occlusion = Occlusion(fraction=0.3, fill=0.0)
    first = occlude(digits, occlusion, torch.Generator().manual_seed(5))
    second = occlude(digits, occlusion, torch.Generator().manual_seed(5))
    other = occlude(digits, occlusion, torch.Generator().manual_seed(6))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])
    assert float(first[0][first[1]].abs().max()) == 0.0
    assert torch.equal(occlusion.apply(digits, torch.Generator().manual_seed(5)), first[0])


def test_nothing_to_cover():
    blank = torch.zeros(2, 1, 8, 8)
    out, masks = occlude(blank, Occlusion(0.5), torch.Generator().manual_seed(0))
    assert torch.equal(out, blank) and not masks.any()
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 2:6, 3] = 1
    out, masks = occlude(image, Occlusion(0.0), torch.Generator().manual_seed(0))
    assert torch.equal(out, image) and not masks.any()
    assert coverage(blank, masks.expand(2, -1, -1, -1)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 1.0}, r"fraction must be in \[0, 1\), got 1.0"),
        ({"fraction": -0.1}, r"fraction must be in \[0, 1\), got -0.1"),
        ({"fraction": float("nan")}, r"fraction must be in \[0, 1\), got nan"),
        ({"shape": "circle"}, r"shape must be one of \('rectangle', 'blob'\), got 'circle'"),
        ({"fill": 1.5}, r"fill must be in \[0, 1\], got 1.5"),
        ({"threshold": 0.0}, r"threshold must be in \(0, 1\), got 0.0"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Occlusion(**kwargs)


def test_bad_images():
    with pytest.raises(ValueError, match=r"images must have shape \(N, 1, H, W\), got \(2, 3, 8\)"):
        occlude(torch.zeros(2, 3, 8), Occlusion(), torch.Generator())
