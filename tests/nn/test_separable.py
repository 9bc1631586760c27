from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from deform_reference import deform_conv2d_naive
from deformconv.nn import DeformableSeparableConv2d, SeparableConv2d
from family_reference import separable_nhwc

# Valid and same padding, strides (also uneven), dilation, depth multipliers 1 to 3, even and
# odd kernels and inputs.
KERAS_CASES = [
    (padding, stride, dilation, mult, kernel, size)
    for padding, (stride, dilation), (mult, kernel, size) in itertools.product(
        ("valid", "same"),
        (((1, 1), (1, 1)), ((2, 2), (1, 1)), ((2, 1), (1, 1)), ((1, 1), (2, 2)), ((3, 2), (1, 2))),
        ((1, (3, 3), (9, 9)), (2, (2, 4), (10, 11)), (3, (3, 2), (8, 7))),
    )
]


@pytest.mark.parametrize(("padding", "stride", "dilation", "mult", "kernel", "size"), KERAS_CASES)
def test_keras_weights_match_numpy_reference(padding, stride, dilation, mult, kernel, size):
    rng = np.random.default_rng(hash((padding, stride, dilation, mult, kernel)) % 2**32)
    channels, filters = 3, 4
    depthwise = rng.standard_normal((*kernel, channels, mult))
    pointwise = rng.standard_normal((1, 1, channels * mult, filters))
    bias = rng.standard_normal(filters)
    x_nhwc = rng.standard_normal((2, *size, channels))

    layer = SeparableConv2d.from_keras(
        depthwise,
        pointwise,
        bias,
        stride=stride,
        padding=padding,
        dilation=dilation,
        dtype=torch.float64,
    )
    out = layer(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2))

    expected = separable_nhwc(x_nhwc, depthwise, pointwise, bias, stride, padding, dilation)
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).detach().numpy(), expected, atol=1e-10)


def test_load_keras_weights_into_a_float32_layer():
    rng = np.random.default_rng(1)
    layer = SeparableConv2d(2, 5, 3, padding="same", depth_multiplier=2, bias=False)
    depthwise = rng.standard_normal((3, 3, 2, 2)).astype(np.float32)
    pointwise = rng.standard_normal((1, 1, 4, 5)).astype(np.float32)
    layer.load_keras_weights(depthwise, pointwise)
    x = rng.standard_normal((1, 6, 6, 2))
    expected = separable_nhwc(x, depthwise, pointwise, None, (1, 1), "same", (1, 1))
    out = layer(torch.from_numpy(x).float().permute(0, 3, 1, 2))
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).detach().numpy(), expected, atol=1e-5)


def test_structure_and_parameter_count():
    layer = SeparableConv2d(16, 32, 3, bias=False)
    assert sum(p.numel() for p in layer.parameters()) == 656
    assert layer.depthwise.weight.shape == (16, 1, 3, 3) and layer.depthwise.bias is None
    assert layer.pointwise.weight.shape == (32, 16, 1, 1)
    assert (layer.in_channels, layer.out_channels, layer.depth_multiplier) == (16, 32, 1)


def test_same_padding_with_stride_keeps_ceil_size():
    layer = SeparableConv2d(3, 8, 4, stride=2, padding="same")
    assert layer(torch.randn(1, 3, 13, 12)).shape == (1, 8, 7, 6)


def test_gradcheck():
    layer = SeparableConv2d(2, 3, 3, stride=2, padding="same", depth_multiplier=2).double()
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda layer: layer.load_keras_weights(
                np.ones((3, 3, 2)), np.ones((1, 1, 4, 3)), np.ones(3)
            ),
            r"depthwise_kernel must have Keras shape \[3, 3, 2, 2\], got \[3, 3, 2\]",
        ),
        (
            lambda layer: layer.load_keras_weights(
                np.ones((3, 3, 2, 2)), np.ones((1, 1, 2, 3)), np.ones(3)
            ),
            r"pointwise_kernel must have Keras shape \[1, 1, 4, 3\], got \[1, 1, 2, 3\]",
        ),
        (
            lambda layer: layer.load_keras_weights(np.ones((3, 3, 2, 2)), np.ones((1, 1, 4, 3))),
            "bias must be given: the layer was built with bias=True, got bias=None",
        ),
        (
            lambda layer: layer.load_keras_weights(
                np.ones((3, 3, 2, 2)), np.ones((1, 1, 4, 3)), np.ones(4)
            ),
            r"bias must have Keras shape \[3\], got \[4\]",
        ),
    ],
)
def test_keras_loading_errors(call, message):
    layer = SeparableConv2d(2, 3, 3, depth_multiplier=2)
    with pytest.raises(ValueError, match=message):
        call(layer)


def test_from_keras_errors():
    with pytest.raises(
        ValueError,
        match=r"depthwise_kernel must have Keras shape \[kh, kw, C, depth_multiplier\], got \[3, 3\]",
    ):
        SeparableConv2d.from_keras(np.ones((3, 3)), np.ones((1, 1, 3, 2)))
    with pytest.raises(ValueError, match="bias must be None: the layer was built with bias=False"):
        SeparableConv2d(2, 3, 3, bias=False).load_keras_weights(
            np.ones((3, 3, 2, 1)), np.ones((1, 1, 2, 3)), np.ones(3)
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out_channels": 0}, "out_channels must be a positive int, got 0"),
        ({"depth_multiplier": -1}, "depth_multiplier must be a positive int, got -1"),
        (
            {"padding": "causal"},
            "padding must be an int, a pair of ints, 'same' or 'valid', got 'causal'",
        ),
    ],
)
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SeparableConv2d(**{"in_channels": 3, "out_channels": 4, "kernel_size": 3, **kwargs})


DEFORMABLE_CASES = [
    # channels, out, kernel, stride, padding, dilation, multiplier, offset groups, modulated
    (4, 6, 3, 1, 1, 1, 1, 1, True),
    (4, 5, 3, 2, 1, 1, 2, 2, False),
    (2, 3, (3, 2), 1, (1, 0), (2, 1), 3, 2, True),
]


@pytest.mark.parametrize(
    ("channels", "out", "kernel", "stride", "padding", "dilation", "mult", "groups", "modulated"),
    DEFORMABLE_CASES,
)
def test_deformable_separable_starts_as_separable(
    channels, out, kernel, stride, padding, dilation, mult, groups, modulated
):
    torch.manual_seed(0)
    layer = DeformableSeparableConv2d(
        channels,
        out,
        kernel,
        stride,
        padding,
        dilation,
        mult,
        offset_groups=groups,
        modulated=modulated,
    )
    plain = SeparableConv2d(channels, out, kernel, stride, padding, dilation, mult)
    plain.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(2, channels, 9, 8)
    torch.testing.assert_close(layer(x), plain(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("channels", "out", "kernel", "stride", "padding", "dilation", "mult", "groups", "modulated"),
    DEFORMABLE_CASES,
)
def test_deformable_separable_matches_naive_reference(
    channels, out, kernel, stride, padding, dilation, mult, groups, modulated
):
    torch.manual_seed(1)
    layer = DeformableSeparableConv2d(
        channels,
        out,
        kernel,
        stride,
        padding,
        dilation,
        mult,
        offset_groups=groups,
        modulated=modulated,
    ).double()
    nn.init.normal_(layer.depthwise.conv_offset.weight, std=0.3)
    nn.init.normal_(layer.depthwise.conv_offset.bias, std=0.5)
    x = torch.randn(1, channels, 7, 6, dtype=torch.float64)
    offset, mask = layer.depthwise.offsets_and_mask(x)
    assert offset.abs().max() > 0.1
    sampled = deform_conv2d_naive(
        x.numpy(),
        offset.detach().numpy(),
        layer.depthwise.weight.detach().numpy(),
        stride=layer.depthwise.stride,
        padding=layer.depthwise.padding,
        dilation=layer.depthwise.dilation,
        mask=None if mask is None else mask.detach().numpy(),
    )
    pointwise = layer.pointwise.weight.detach().numpy()[:, :, 0, 0]
    expected = np.einsum("oc,bchw->bohw", pointwise, sampled)
    expected += layer.pointwise.bias.detach().numpy()[None, :, None, None]
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, atol=1e-9)


def test_deformable_separable_structure_and_errors():
    layer = DeformableSeparableConv2d(8, 16, 3, padding=1, depth_multiplier=2, offset_groups=4)
    assert layer.depthwise.groups == 8 and layer.depthwise.bias is None
    assert layer.depthwise.conv_offset.out_channels == 3 * 4 * 9
    assert (layer.in_channels, layer.out_channels) == (8, 16)
    with pytest.raises(
        TypeError, match=r"padding must be an int or a pair of ints \(explicit zeros\), got 'same'"
    ):
        DeformableSeparableConv2d(8, 16, 3, padding="same")
    with pytest.raises(ValueError, match="in_channels must be divisible by offset_groups"):
        DeformableSeparableConv2d(8, 16, 3, offset_groups=3)
    with pytest.raises(ValueError, match="depth_multiplier must be a positive int, got 0"):
        DeformableSeparableConv2d(8, 16, 3, depth_multiplier=0)
