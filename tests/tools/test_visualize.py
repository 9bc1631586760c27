from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from deformconv.tools.visualize import (
    SamplingExample,
    SamplingLayer,
    offset_field,
    offset_field_figure,
    sampling_figure,
    sampling_points,
    unit_centre,
)


def _bilinear(field: np.ndarray, y: float, x: float) -> np.ndarray:
    """Naive bilinear lookup of a (C, H, W) field, clamping the point into the grid."""
    _, h, w = field.shape
    y = min(max(y, 0.0), h - 1.0)
    x = min(max(x, 0.0), w - 1.0)
    y0, x0 = math.floor(y), math.floor(x)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    fy, fx = y - y0, x - x0
    return (
        field[:, y0, x0] * (1 - fy) * (1 - fx)
        + field[:, y0, x1] * (1 - fy) * fx
        + field[:, y1, x0] * fy * (1 - fx)
        + field[:, y1, x1] * fy * fx
    )


def _reference(layers, position, depth=None):
    """Recursive, one point at a time: the definition written out."""
    depth = len(layers) if depth is None else depth

    def down(level: int, y: float, x: float, weight: float) -> list[tuple[float, float, float]]:
        if level < 0:
            return [(y, x, weight)]
        layer = layers[level]
        kh, kw = layer.kernel_size
        out = []
        if len(layers) - level > depth:
            cy = y * layer.stride[0] - layer.padding[0] + (kh - 1) / 2 * layer.dilation[0]
            cx = x * layer.stride[1] - layer.padding[1] + (kw - 1) / 2 * layer.dilation[1]
            return down(
                level - 1,
                cy * layer.input_scale + layer.input_shift,
                cx * layer.input_scale + layer.input_shift,
                weight,
            )
        off = None if layer.offset is None else _bilinear(np.asarray(layer.offset, float), y, x)
        mask = None if layer.mask is None else _bilinear(np.asarray(layer.mask, float), y, x)
        for i in range(kh):
            for j in range(kw):
                k = i * kw + j
                py = y * layer.stride[0] - layer.padding[0] + i * layer.dilation[0]
                px = x * layer.stride[1] - layer.padding[1] + j * layer.dilation[1]
                if off is not None:
                    py += off[2 * k]
                    px += off[2 * k + 1]
                w = weight * (1.0 if mask is None else mask[k])
                out += down(
                    level - 1,
                    py * layer.input_scale + layer.input_shift,
                    px * layer.input_scale + layer.input_shift,
                    w,
                )
        return out

    return np.array(down(len(layers) - 1, float(position[0]), float(position[1]), 1.0))


def _stack(seed: int, modulated: bool) -> list[SamplingLayer]:
    g = torch.Generator().manual_seed(seed)
    return [
        SamplingLayer(padding=(1, 1)),
        SamplingLayer(
            padding=(1, 1),
            input_scale=2.0,
            input_shift=0.5,
            offset=torch.randn(18, 8, 8, generator=g) * 1.5,
            mask=torch.rand(9, 8, 8, generator=g) * 2 if modulated else None,
        ),
        SamplingLayer(
            kernel_size=(3, 2),
            stride=(2, 1),
            padding=(1, 0),
            dilation=(1, 2),
            offset=torch.randn(12, 4, 4, generator=g),
            mask=torch.rand(6, 4, 4, generator=g) if modulated else None,
        ),
    ]


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("depth", [None, 1, 2, 3])
@pytest.mark.parametrize("position", [(0, 0), (2, 1), (1.5, 2.25), (3, 3)])
def test_sampling_points_match_reference(modulated, depth, position):
    layers = _stack(0, modulated)
    points, weights = sampling_points(layers, position, depth)
    expected = _reference(layers, position, depth)
    np.testing.assert_allclose(points, expected[:, :2], atol=1e-9)
    np.testing.assert_allclose(weights, expected[:, 2], atol=1e-9)


def test_regular_grid_is_the_dense_receptive_field():
    # Two stride-1 3x3 layers with zero offsets sample the 5x5 block around the unit.
    layers = [SamplingLayer(padding=(1, 1), offset=torch.zeros(18, 6, 6)) for _ in range(2)]
    points, _ = sampling_points(layers, (3, 3))
    assert points.shape == (81, 2)
    assert sorted({tuple(p) for p in points.tolist()}) == [
        (float(y), float(x)) for y in range(1, 6) for x in range(1, 6)
    ]


def test_unit_centre_is_the_regular_grid_centroid():
    layers = [layer.regular() for layer in _stack(1, False)][:2]
    points, _ = sampling_points(layers, (3, 2))
    np.testing.assert_allclose(points.mean(0), unit_centre(layers, (3, 2)), atol=1e-12)


def test_offset_field_of_a_constant_shift():
    # Every tap of the pooled layer moves by (1, -0.5) in its input: (2, -1) image pixels.
    offset = torch.tensor([1.0, -0.5]).repeat(9).view(18, 1, 1).expand(18, 4, 4)
    layers = [
        SamplingLayer(padding=(1, 1)),
        SamplingLayer(padding=(1, 1), offset=offset, input_scale=2.0, input_shift=0.5),
    ]
    field = offset_field(layers, 1)
    np.testing.assert_allclose(field.displacement, np.broadcast_to([2.0, -1.0], (4, 4, 2)))
    np.testing.assert_allclose(field.dilation, np.ones((4, 4)))
    np.testing.assert_allclose(field.centres[1, 2], [2.5, 4.5])


@pytest.mark.parametrize("factor", [0.5, 2.0, 3.0])
def test_offset_field_dilation_of_a_stretched_kernel(factor):
    # Offsets (factor - 1) * (tap - centre) turn the 3x3 grid into one dilated by factor.
    taps = torch.tensor([(i - 1.0, j - 1.0) for i in range(3) for j in range(3)])
    offset = ((factor - 1) * taps).reshape(18, 1, 1).expand(18, 5, 5)
    field = offset_field([SamplingLayer(padding=(1, 1), offset=offset)])
    np.testing.assert_allclose(field.dilation, np.full((5, 5), factor), rtol=1e-12)
    np.testing.assert_allclose(field.displacement, np.zeros((5, 5, 2)), atol=1e-12)


def test_layer_validation_messages():
    with pytest.raises(ValueError, match=r"offset must have shape \(2 \* kh \* kw = 18"):
        SamplingLayer(offset=torch.zeros(9, 4, 4))
    with pytest.raises(ValueError, match="mask must have shape"):
        SamplingLayer(offset=torch.zeros(18, 4, 4), mask=torch.zeros(9, 3, 4))
    with pytest.raises(ValueError, match="mask needs offset"):
        SamplingLayer(mask=torch.zeros(9, 4, 4))
    with pytest.raises(ValueError, match="input_scale must be positive"):
        SamplingLayer(input_scale=0.0)
    with pytest.raises(ValueError, match="layers must hold at least one"):
        sampling_points([], (0, 0))
    with pytest.raises(TypeError, match=r"layers\[0\] must be a SamplingLayer"):
        sampling_points(["conv"], (0, 0))
    with pytest.raises(ValueError, match=r"depth must be in \[1, 1\]"):
        sampling_points([SamplingLayer()], (0, 0), depth=2)
    with pytest.raises(ValueError, match="regular layer"):
        offset_field([SamplingLayer()])
    with pytest.raises(ValueError, match=r"index must be in \[-1, 0\]"):
        offset_field([SamplingLayer()], 3)


def _png_size(fig) -> tuple[int, int]:
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=50)
    buffer.seek(0)
    return Image.open(buffer).size


@pytest.mark.parametrize("modulated", [False, True])
def test_figures_render(modulated):
    layers = _stack(2, modulated)
    examples = [
        SamplingExample(torch.rand(16, 16), layers, [(1, 1), (3, 2)], "first", ("a", "b")),
        SamplingExample(np.random.default_rng(0).random((1, 16, 16)), layers, [(2, 2)]),
    ]
    fig = sampling_figure(examples, depth=2)
    assert len(fig.axes) == 4
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]
    assert fig.axes[0].get_ylabel() == "first"
    assert min(_png_size(fig)) > 100
    field = offset_field_figure(examples)
    assert len(field.axes) == 2 * 2 + 1  # two deformable layers per row, plus the colour bar
    assert min(_png_size(field)) > 100


def test_figure_errors():
    with pytest.raises(ValueError, match="at least one SamplingExample"):
        sampling_figure([])
    with pytest.raises(ValueError, match="no offsets"):
        offset_field_figure([SamplingExample(torch.rand(4, 4), [SamplingLayer()], [])])
    bad = SamplingExample(torch.rand(2, 4, 4), [SamplingLayer(padding=(1, 1))], [(1, 1)])
    with pytest.raises(ValueError, match=r"image must be \(H, W\) or \(1, H, W\)"):
        sampling_figure([bad])


def test_tools_package_exports_visualize_without_importing_matplotlib():
    # deformconv.tools re-exports the sampling functions; matplotlib (an optional extra) must
    # be imported only when a figure is drawn, so a fresh interpreter is used to check it.
    import subprocess
    import sys

    code = (
        "import sys, deformconv.tools as t\n"
        "from deformconv.tools import visualize as v\n"
        "assert all(getattr(t, n) is getattr(v, n) for n in v.__all__), 'missing re-export'\n"
        "assert set(v.__all__) <= set(t.__all__), 'missing from __all__'\n"
        "print('matplotlib' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
