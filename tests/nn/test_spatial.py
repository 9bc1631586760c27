from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deformconv.nn import SpatiallySeparableConv2d
from family_reference import tf_same_pads

SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
BINOMIAL_5 = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0
BOX_3x5 = np.ones((3, 5)) / 15.0
_g = np.exp(-0.5 * (np.arange(-3, 4) / 1.5) ** 2)
GAUSSIAN_7 = np.outer(_g, _g) / np.outer(_g, _g).sum()
LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def _full_conv(x, weight, bias, stride, padding, dilation, groups):
    """The single 2-D convolution the layer should equal, "same" padded by TensorFlow's rule."""
    if padding == "same":
        kh, kw = weight.shape[-2:]
        top, bottom = tf_same_pads(x.shape[-2], kh, stride[0], dilation[0])
        left, right = tf_same_pads(x.shape[-1], kw, stride[1], dilation[1])
        x, padding = F.pad(x, (left, right, top, bottom)), 0
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


GEOMETRIES = [
    # kernel, stride, padding, dilation, size
    ((3, 3), (1, 1), (0, 0), (1, 1), (9, 9)),
    ((3, 5), (2, 1), (1, 2), (1, 1), (10, 9)),
    ((5, 3), (1, 2), (2, 0), (2, 1), (12, 11)),
    ((2, 4), (2, 3), "same", (1, 1), (9, 10)),
    ((3, 3), (1, 1), "same", (2, 2), (7, 8)),
    ((3, 3), (3, 2), "valid", (1, 1), (8, 9)),
]


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "size"), GEOMETRIES)
def test_per_channel_equals_depthwise_conv_with_outer_product(
    kernel, stride, padding, dilation, size
):
    torch.manual_seed(0)
    layer = SpatiallySeparableConv2d(
        3, 3, kernel, stride, padding, dilation, per_channel=True
    ).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    column = layer.vertical.weight[:, 0, :, 0]
    row = layer.horizontal.weight[:, 0, 0, :]
    weight = column[:, :, None] * row[:, None, :]
    expected = _full_conv(x, weight[:, None], layer.horizontal.bias, stride, padding, dilation, 3)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.equivalent_weight(), weight[:, None])


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "size"), GEOMETRIES)
@pytest.mark.parametrize("mid", [None, 2])
def test_across_channels_equals_conv_with_equivalent_weight(
    kernel, stride, padding, dilation, size, mid
):
    torch.manual_seed(0)
    layer = SpatiallySeparableConv2d(
        3, 4, kernel, stride, padding, dilation, mid_channels=mid
    ).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    vertical = layer.vertical.weight[:, :, :, 0]
    horizontal = layer.horizontal.weight[:, :, 0, :]
    weight = torch.zeros(4, 3, *kernel, dtype=torch.float64)
    for o in range(4):
        for c in range(3):
            for m in range(layer.mid_channels):
                weight[o, c] += torch.outer(vertical[m, c], horizontal[o, m])
    expected = _full_conv(x, weight, layer.horizontal.bias, stride, padding, dilation, 1)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.equivalent_weight(), weight)
    assert layer.mid_channels == (4 if mid is None else mid)


@pytest.mark.parametrize(
    "kernel",
    [SOBEL_X, SOBEL_X.T, BINOMIAL_5, BOX_3x5, GAUSSIAN_7, np.zeros((3, 3)), np.float32(GAUSSIAN_7)],
    ids=["sobel-x", "sobel-y", "binomial", "box", "gaussian", "zeros", "gaussian-float32"],
)
def test_from_separable_kernel(kernel):
    layer = SpatiallySeparableConv2d.from_kernel(kernel, in_channels=2, padding="same").double()
    assert layer.horizontal.bias is None and layer.per_channel
    product = layer.equivalent_weight().detach()[0, 0].numpy()
    np.testing.assert_allclose(product, kernel, atol=1e-6 if kernel.dtype == np.float32 else 1e-12)
    x = torch.randn(1, 2, 9, 10, dtype=torch.float64)
    weight = torch.as_tensor(kernel, dtype=torch.float64).expand(2, 1, *kernel.shape)
    expected = _full_conv(x, weight, None, (1, 1), "same", (1, 1), 2)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_sobel_factors_are_the_textbook_ones():
    layer = SpatiallySeparableConv2d.from_kernel(SOBEL_X)
    assert layer.vertical.weight.flatten().tolist() == [1.0, 2.0, 1.0]
    assert layer.horizontal.weight.flatten().tolist() == [-1.0, 0.0, 1.0]


def test_one_separable_kernel_per_channel():
    kernels = np.stack([SOBEL_X, SOBEL_X.T, BINOMIAL_5[1:4, 1:4]])
    layer = SpatiallySeparableConv2d.from_kernel(kernels, in_channels=3)
    np.testing.assert_allclose(layer.equivalent_weight().detach()[:, 0].numpy(), kernels, atol=1e-6)


def test_from_kernels_shares_or_takes_per_channel_filters():
    shared = SpatiallySeparableConv2d.from_kernels(
        [1.0, 2.0, 1.0], [1.0, -1.0], in_channels=2, stride=2
    )
    assert shared.kernel_size == (3, 2) and shared.stride == (2, 2)
    assert shared(torch.randn(1, 2, 8, 8)).shape == (1, 2, 3, 4)
    per = SpatiallySeparableConv2d.from_kernels(
        torch.ones(2, 3), torch.arange(4.0).reshape(2, 2), 2
    )
    assert per.horizontal.weight[1].flatten().tolist() == [2.0, 3.0]


@pytest.mark.parametrize(
    ("kernel", "message"),
    [
        (LAPLACIAN, r"kernel of shape \[3, 3\] is not separable: it has rank 2"),
        (
            np.eye(4),
            r"kernel of shape \[4, 4\] is not separable: it has rank 4 \(singular values 1, 1, 1, 1\)",
        ),
    ],
)
def test_non_separable_kernel_is_refused_with_rank_and_pointer(kernel, message):
    with pytest.raises(ValueError, match=message) as error:
        SpatiallySeparableConv2d.from_kernel(kernel)
    assert "deformconv.tools.separability.factorize_kernel" in str(error.value)
    assert "`deformconv factor`" in str(error.value)


def test_non_separable_channel_is_named():
    with pytest.raises(
        ValueError, match=r"kernel\[1\] of shape \[3, 3\] is not separable: it has rank 2"
    ):
        SpatiallySeparableConv2d.from_kernel(np.stack([SOBEL_X, LAPLACIAN]), in_channels=2)


def test_rtol_decides_what_counts_as_rank_one():
    nearly = SOBEL_X + 1e-4 * LAPLACIAN
    with pytest.raises(ValueError, match="rank 2"):
        SpatiallySeparableConv2d.from_kernel(nearly)
    layer = SpatiallySeparableConv2d.from_kernel(nearly, rtol=1e-3)
    np.testing.assert_allclose(layer.equivalent_weight().detach()[0, 0].numpy(), SOBEL_X, atol=1e-3)


def test_notes_multiplication_count_per_output_value():
    # Same padding: the vertical pass produces exactly the output grid, 3 + 3 = 6 MACs per value.
    layer = SpatiallySeparableConv2d(1, 1, 3, padding="same", per_channel=True, bias=False)
    x = torch.randn(1, 1, 12, 12)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = layer(x)
    assert counter.get_total_flops() // 2 == 6 * out.numel()
    assert math.prod(out.shape) == 144


def test_gradcheck():
    layer = SpatiallySeparableConv2d(
        2, 3, (3, 2), stride=2, padding="same", mid_channels=2
    ).double()
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


def test_repr():
    assert repr(
        SpatiallySeparableConv2d(3, 3, 3, padding="same", per_channel=True, bias=False)
    ) == (
        "SpatiallySeparableConv2d(\n  3, 3, kernel_size=(3, 3), padding='same', per_channel=True, bias=False\n"
        "  (vertical): Conv2d(3, 3, kernel_size=(3, 1), stride=(1, 1), groups=3, bias=False)\n"
        "  (horizontal): Conv2d(3, 3, kernel_size=(1, 3), stride=(1, 1), groups=3, bias=False)\n)"
    )


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: SpatiallySeparableConv2d(3, 4, 3, per_channel=True),
            ValueError,
            "out_channels must equal in_channels when per_channel=True, got in_channels=3, out_channels=4",
        ),
        (
            lambda: SpatiallySeparableConv2d(3, 3, 3, per_channel=True, mid_channels=5),
            ValueError,
            "mid_channels must be None or in_channels when per_channel=True",
        ),
        (
            lambda: SpatiallySeparableConv2d(3, 4, 3, mid_channels=0),
            ValueError,
            "mid_channels must be a positive int, got 0",
        ),
        (
            lambda: SpatiallySeparableConv2d(-3, 4, 3),
            ValueError,
            "in_channels must be a positive int, got -3",
        ),
        (
            lambda: SpatiallySeparableConv2d(3, 4, (3, 0)),
            ValueError,
            r"kernel_size must be >= 1, got \(3, 0\)",
        ),
        (
            lambda: SpatiallySeparableConv2d.from_kernel(np.ones(3)),
            ValueError,
            r"kernel must have shape \[kh, kw\] or \[in_channels=1, kh, kw\], got \[3\]",
        ),
        (
            lambda: SpatiallySeparableConv2d.from_kernel(np.ones((2, 3, 3)), in_channels=3),
            ValueError,
            r"kernel must have shape \[kh, kw\] or \[in_channels=3, kh, kw\], got \[2, 3, 3\]",
        ),
        (
            lambda: SpatiallySeparableConv2d.from_kernels(np.ones((2, 3)), [1.0], in_channels=3),
            ValueError,
            r"column must have shape \[k\] or \[in_channels=3, k\] with k >= 1, got \[2, 3\]",
        ),
    ],
)
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
