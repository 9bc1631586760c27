from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from deformconv.nn import DepthwiseConv2d
from deformconv.nn.depthwise import pad_same, same_padding
from family_reference import depthwise_nhwc, tf_same_pads


@pytest.mark.parametrize("size", range(1, 12))
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
def test_same_padding_matches_tensorflow_rule(size, kernel, stride, dilation):
    pads = same_padding(size, kernel, stride, dilation)
    assert pads == tf_same_pads(size, kernel, stride, dilation)
    extent = dilation * (kernel - 1) + 1
    assert (size + sum(pads) - extent) // stride + 1 == math.ceil(size / stride)


def test_same_padding_rejects_bad_sizes():
    with pytest.raises(ValueError, match="kernel_size must be >= 1, got 0"):
        same_padding(5, 0)
    with pytest.raises(ValueError, match="stride must be >= 1, got -2"):
        same_padding(5, 3, stride=-2)


def test_pad_same_puts_the_extra_row_and_column_last():
    x = torch.ones(1, 1, 4, 4)
    padded = pad_same(x, 2)
    assert padded.shape == (1, 1, 5, 5)
    assert padded[0, 0, :4, :4].eq(1).all() and padded[0, 0, 4].eq(0).all()


CASES = [
    # channels, kernel, multiplier, stride, padding, dilation, size
    (3, 5, 1, 1, 0, 1, (12, 12)),
    (3, 5, 2, 1, "valid", 1, (12, 12)),
    (2, 3, 3, 2, 1, 1, (9, 8)),
    (4, (3, 2), 1, (2, 1), (1, 0), (1, 2), (10, 7)),
    (2, 4, 2, 2, "same", 1, (13, 12)),
    (3, 3, 1, 3, "same", 2, (11, 10)),
    (1, 2, 2, 1, "same", 1, (5, 6)),
]


@pytest.mark.parametrize(
    ("channels", "kernel", "mult", "stride", "padding", "dilation", "size"), CASES
)
def test_matches_numpy_reference(channels, kernel, mult, stride, padding, dilation, size):
    torch.manual_seed(0)
    layer = DepthwiseConv2d(channels, kernel, mult, stride, padding, dilation, dtype=torch.float64)
    x = torch.randn(2, channels, *size, dtype=torch.float64)
    kh, kw = layer.kernel_size
    keras_kernel = layer.weight.detach().reshape(channels, mult, kh, kw).permute(2, 3, 0, 1)
    pad = padding if isinstance(padding, str) else layer.padding
    expected = (
        depthwise_nhwc(
            x.permute(0, 2, 3, 1).numpy(), keras_kernel.numpy(), layer.stride, pad, layer.dilation
        )
        + layer.bias.detach().numpy()
    )
    out = layer(x)
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).detach().numpy(), expected, atol=1e-12)
    if padding == "same":
        assert out.shape[-2:] == tuple(
            math.ceil(n / s) for n, s in zip(size, layer.stride, strict=True)
        )


def test_is_a_grouped_conv2d_with_the_same_state_dict():
    layer = DepthwiseConv2d(4, 3, depth_multiplier=2, padding=1)
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=4)
    assert isinstance(layer, nn.Conv2d)
    conv.load_state_dict(layer.state_dict())
    x = torch.randn(1, 4, 7, 7)
    torch.testing.assert_close(layer(x), conv(x))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_same_agrees_with_torch_same_at_stride_one_with_even_kernel():
    layer = DepthwiseConv2d(3, (4, 2), padding="same", dilation=(1, 3))
    conv = nn.Conv2d(3, 3, (4, 2), padding="same", dilation=(1, 3), groups=3)
    conv.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 9, 10)
    torch.testing.assert_close(layer(x), conv(x))


def test_gradcheck_with_same_padding_and_stride():
    layer = DepthwiseConv2d(2, 3, 2, stride=2, padding="same", dtype=torch.float64)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


def test_batch_of_zero_and_non_contiguous_input():
    layer = DepthwiseConv2d(3, 3, padding="same", stride=2)
    assert layer(torch.randn(0, 3, 8, 8)).shape == (0, 3, 4, 4)
    x = torch.randn(1, 8, 8, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(layer(x), layer(x.contiguous()))


def test_repr_shows_non_default_arguments():
    assert repr(DepthwiseConv2d(3, 5)) == "DepthwiseConv2d(3, kernel_size=(5, 5))"
    assert repr(DepthwiseConv2d(3, 3, 2, stride=2, padding="same", bias=False)) == (
        "DepthwiseConv2d(3, kernel_size=(3, 3), depth_multiplier=2, stride=(2, 2), "
        "padding='same', bias=False)"
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"in_channels": 0}, ValueError, "in_channels must be a positive int, got 0"),
        ({"depth_multiplier": 0}, ValueError, "depth_multiplier must be a positive int, got 0"),
        ({"kernel_size": -3}, ValueError, r"kernel_size must be >= 1, got -3"),
        ({"kernel_size": (3, 3, 3)}, TypeError, r"kernel_size must be an int or a pair"),
        (
            {"padding": "full"},
            ValueError,
            "padding must be an int, a pair of ints, 'same' or 'valid', got 'full'",
        ),
        ({"padding": -1}, ValueError, r"padding must be >= 0, got -1"),
        ({"stride": 0}, ValueError, r"stride must be >= 1, got 0"),
        # bool subclasses int, but True for a size is a slip: refused (deformconv._validation)
        ({"in_channels": True}, TypeError, "in_channels must be an int, got bool True"),
        ({"stride": (1, False)}, TypeError, r"stride must be an int or a pair of ints"),
        ({"depth_multiplier": 2.0}, TypeError, "depth_multiplier must be an int, got float"),
    ],
)
def test_constructor_errors(kwargs, error, message):
    arguments = {"in_channels": 3, "kernel_size": 3, **kwargs}
    with pytest.raises(error, match=message):
        DepthwiseConv2d(**arguments)
