"""``padding_mode`` of the depthwise, depthwise separable and spatially separable layers.

Each layer is compared with one plain ``F.conv2d`` (no padding) on an input padded by NumPy's
``reflect`` / ``edge`` / ``wrap`` / ``constant`` modes, for explicit and TensorFlow ``"same"``
padding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deformconv.nn import DepthwiseConv2d, SeparableConv2d, SpatiallySeparableConv2d
from deformconv.nn.depthwise import pad_same
from family_reference import pad_nchw, tf_same_pads

MODES = ["zeros", "reflect", "replicate", "circular"]
# kernel, stride, padding, dilation, input size
GEOMETRIES = [
    ((3, 3), (1, 1), (1, 1), (1, 1), (7, 8)),
    ((3, 5), (2, 1), (2, 1), (1, 1), (9, 8)),
    ((3, 3), (1, 2), (2, 2), (2, 1), (8, 9)),
    ((4, 3), (2, 2), "same", (1, 1), (9, 8)),
    ((3, 3), (1, 1), "same", (2, 1), (8, 7)),
]


def _pads(x, kernel, stride, padding, dilation):
    if padding == "same":
        return (
            tf_same_pads(x.shape[-2], kernel[0], stride[0], dilation[0]),
            tf_same_pads(x.shape[-1], kernel[1], stride[1], dilation[1]),
        )
    return (padding[0], padding[0]), (padding[1], padding[1])


def _reference(x, weight, bias, kernel, stride, padding, dilation, groups, mode):
    rows, cols = _pads(x, kernel, stride, padding, dilation)
    padded = torch.from_numpy(pad_nchw(x.numpy(), rows, cols, mode))
    return F.conv2d(padded, weight, bias, stride, 0, dilation, groups)


def _layer(kind, channels, kernel, stride, padding, dilation, mode):
    torch.manual_seed(0)
    args = {"stride": stride, "padding": padding, "dilation": dilation, "padding_mode": mode}
    if kind == "depthwise":
        return DepthwiseConv2d(channels, kernel, depth_multiplier=2, **args).double()
    if kind == "separable":
        return SeparableConv2d(channels, 5, kernel, depth_multiplier=2, **args).double()
    return SpatiallySeparableConv2d(channels, 4, kernel, mid_channels=3, **args).double()


def _expected(kind, layer, x, kernel, stride, padding, dilation, mode):
    if kind == "depthwise":
        w, b, groups = layer.weight, layer.bias, x.shape[1]
        return _reference(x, w, b, kernel, stride, padding, dilation, groups, mode)
    if kind == "separable":
        dw = layer.depthwise
        mid = _reference(x, dw.weight, None, kernel, stride, padding, dilation, x.shape[1], mode)
        return layer.pointwise(mid)
    weight, bias = layer.equivalent_weight(), layer.horizontal.bias
    return _reference(x, weight, bias, kernel, stride, padding, dilation, 1, mode)


@pytest.mark.parametrize("kind", ["depthwise", "separable", "spatial"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "size"), GEOMETRIES)
def test_layer_equals_conv_of_numpy_padded_input(
    kind, mode, kernel, stride, padding, dilation, size
):
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layer = _layer(kind, 3, kernel, stride, padding, dilation, mode)
    with torch.no_grad():
        expected = _expected(kind, layer, x, kernel, stride, padding, dilation, mode)
        got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["depthwise", "separable", "spatial"])
def test_gradcheck_with_reflect_padding(kind):
    layer = _layer(kind, 2, (3, 3), (2, 1), "same", (1, 1), "reflect")
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_padding_mode_is_kept_and_shown():
    assert "padding_mode='circular'" in repr(DepthwiseConv2d(3, 3, padding_mode="circular"))
    spatial = SpatiallySeparableConv2d(3, 3, 3, padding=1, padding_mode="reflect")
    assert spatial.padding_mode == "reflect"
    assert "padding_mode='reflect'" in repr(spatial)
    assert SeparableConv2d(3, 4, 3, padding_mode="replicate").padding_mode == "replicate"
    assert "padding_mode" not in repr(DepthwiseConv2d(3, 3))


@pytest.mark.parametrize(
    "make",
    [
        lambda: DepthwiseConv2d(3, 3, padding_mode="mirror"),
        lambda: SeparableConv2d(3, 4, 3, padding_mode="mirror"),
        lambda: SpatiallySeparableConv2d(3, 4, 3, padding_mode="mirror"),
        lambda: pad_same(torch.zeros(1, 1, 4, 4), 3, padding_mode="mirror"),
    ],
)
def test_unknown_padding_mode_is_refused_by_name(make):
    with pytest.raises(ValueError, match=r"padding_mode must be one of .*'mirror'"):
        make()
