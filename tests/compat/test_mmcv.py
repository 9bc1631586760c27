"""deformconv.compat.mmcv against mmcv: its published golden values, its state_dict layouts
(current and legacy) and its layer contract, with torchvision's operator as the independent
reference for random weights."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import deformconv
from deformconv.compat.mmcv import (
    DeformConv2d,
    DeformConv2dPack,
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    deform_conv2d,
    modulated_deform_conv2d,
)
from deformconv.nn import offset_param_groups
from deformconv.tools import model_cost
from mmcv_reference import mmcv_pack_forward

# ---------------------------------------------------------------------------------------------
# mmcv's golden values, carried over from mmcv's tests/test_ops/test_deform_conv.py
# (https://github.com/open-mmlab/mmcv/blob/main/tests/test_ops/test_deform_conv.py): a 2x2
# DeformConv2dPack, 1 -> 1 channels, on one 3x3 image repeated over the batch, with the given
# offset-branch and main weights, and an upstream gradient of ones.
DCN_INPUT = [[[[1.0, 2.0, 3.0], [0.0, 1.0, 2.0], [3.0, 5.0, 2.0]]]]
DCN_OFFSET_WEIGHT = [
    [[0.1, 0.4, 0.6, 0.1]],
    [[0.3, 0.2, 0.1, 0.3]],
    [[0.5, 0.5, 0.2, 0.8]],
    [[0.8, 0.3, 0.9, 0.1]],
    [[0.3, 0.1, 0.2, 0.5]],
    [[0.3, 0.7, 0.5, 0.3]],
    [[0.6, 0.2, 0.5, 0.3]],
    [[0.4, 0.1, 0.8, 0.4]],
]
DCN_OFFSET_BIAS = [0.7, 0.1, 0.8, 0.5, 0.6, 0.5, 0.4, 0.7]
DCN_WEIGHT = [[[0.4, 0.2, 0.1, 0.9]]]
DCN_OUT = [[[[1.650, 0.0], [0.000, 0.0]]]]
DCN_X_GRAD = [[[[-0.666, 0.204, 0.000], [0.030, -0.416, 0.012], [0.000, 0.252, 0.129]]]]
DCN_OFFSET_WEIGHT_GRAD = [
    [[[1.44, 2.88], [0.00, 1.44]]],
    [[[-0.72, -1.44], [0.00, -0.72]]],
    [[[0.00, 0.00], [0.00, 0.00]]],
    [[[0.00, 0.00], [0.00, 0.00]]],
    [[[-0.10, -0.20], [0.00, -0.10]]],
    [[[-0.08, -0.16], [0.00, -0.08]]],
    [[[-0.54, -1.08], [0.00, -0.54]]],
    [[[-0.54, -1.08], [0.00, -0.54]]],
]
DCN_OFFSET_BIAS_GRAD = [1.44, -0.72, 0.0, 0.0, -0.10, -0.08, -0.54, -0.54]
DCN_WEIGHT_GRAD = [[[[3.62, 0.0], [0.40, 0.18]]]]

# mmcv's tests/test_ops/test_modulated_deform_conv.py: a 2x2 ModulatedDeformConv2dPack with
# padding 1, no bias, main weight 1 and its zero-initialised offset branch, loss = output.sum().
MDCN_INPUT = [[[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]]
MDCN_OUT = [
    [
        [
            [0.5, 1.5, 2.5, 1.5],
            [1.0, 3.0, 5.0, 3.0],
            [1.0, 3.0, 5.0, 3.0],
            [0.5, 1.5, 2.5, 1.5],
        ]
    ]
]
MDCN_X_GRAD = [[[[2.0, 2.0, 2.0], [2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]]]
MDCN_WEIGHT_GRAD = [[[[9.0, 9.0], [9.0, 9.0]]]]
MDCN_OFFSET_WEIGHT_GRAD = [
    [[[-7.0, -4.0], [0.0, 0.0]]],
    [[[-9.0, 7.5], [-6.0, 5.0]]],
    [[[-4.0, -7.0], [0.0, 0.0]]],
    [[[-7.5, -9.0], [-5.0, -6.0]]],
    [[[-7.0, -4.0], [-7.0, -4.0]]],
    [[[-6.0, 5.0], [-9.0, 7.5]]],
    [[[-4.0, -7.0], [-4.0, -7.0]]],
    [[[-5.0, -6.0], [-7.5, -9.0]]],
    [[[10.5, 6.0], [7.0, 4.0]]],
    [[[6.0, 10.5], [4.0, 7.0]]],
    [[[7.0, 4.0], [10.5, 6.0]]],
    [[[4.0, 7.0], [6.0, 10.5]]],
]
MDCN_OFFSET_BIAS_GRAD = [-3.0, -1.5, -3.0, -1.5, -3.0, -1.5, -3.0, -1.5, 4.5, 4.5, 4.5, 4.5]

DTYPES = [torch.float32, torch.float64]


def _close(got: torch.Tensor, expected, atol: float) -> None:
    torch.testing.assert_close(
        got.detach().double(),
        torch.tensor(np.asarray(expected), dtype=torch.float64),
        rtol=0,
        atol=atol,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 10])
@pytest.mark.parametrize("im2col_step", [2, 3])
def test_deform_conv2d_pack_reproduces_mmcv_golden_values(
    dtype: torch.dtype, batch: int, im2col_step: int
) -> None:
    model = DeformConv2dPack(1, 1, kernel_size=2, stride=1, padding=0, im2col_step=im2col_step)
    with torch.no_grad():
        model.conv_offset.weight.copy_(torch.tensor(DCN_OFFSET_WEIGHT).reshape(8, 1, 2, 2))
        model.conv_offset.bias.copy_(torch.tensor(DCN_OFFSET_BIAS))
        model.weight.copy_(torch.tensor(DCN_WEIGHT).reshape(1, 1, 2, 2))
    model.to(dtype)
    x = torch.tensor(np.repeat(DCN_INPUT, batch, axis=0), dtype=dtype, requires_grad=True)
    out = model(x)
    out.backward(torch.ones_like(out))
    # The published values have three decimals; mmcv's own test allows 1e-3 relative or more.
    _close(out, np.repeat(DCN_OUT, batch, axis=0), 1e-3)
    _close(x.grad, np.repeat(DCN_X_GRAD, batch, axis=0), 1e-3)
    _close(model.conv_offset.weight.grad / batch, DCN_OFFSET_WEIGHT_GRAD, 1e-3)
    _close(model.conv_offset.bias.grad / batch, DCN_OFFSET_BIAS_GRAD, 1e-3)
    _close(model.weight.grad / batch, DCN_WEIGHT_GRAD, 1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_modulated_deform_conv2d_pack_reproduces_mmcv_golden_values(dtype: torch.dtype) -> None:
    x = torch.tensor(MDCN_INPUT, dtype=dtype, requires_grad=True)
    dcn = ModulatedDeformConv2dPack(
        1, 1, kernel_size=(2, 2), stride=1, padding=1, deform_groups=1, bias=False
    )
    dcn.weight.data.fill_(1.0)
    dcn.to(dtype)
    out = dcn(x)
    out.sum().backward()
    # Multiples of 0.5 computed from exact inputs: exact up to rounding.
    atol = 1e-5 if dtype == torch.float32 else 1e-12
    _close(out, MDCN_OUT, atol)
    _close(x.grad, MDCN_X_GRAD, atol)
    _close(dcn.weight.grad, MDCN_WEIGHT_GRAD, atol)
    _close(dcn.conv_offset.weight.grad, MDCN_OFFSET_WEIGHT_GRAD, atol)
    _close(dcn.conv_offset.bias.grad, MDCN_OFFSET_BIAS_GRAD, atol)


def test_border_taps_get_no_offset_gradient_as_in_mmcv() -> None:
    """Zero offsets and padding 1 put every border tap exactly on row or column -1: mmcv's
    kernels give it no offset gradient, torchvision's give it one; elsewhere they agree."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 5, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    mask = torch.rand(1, 9, 5, 5, generator=gen, dtype=torch.float64)
    ours = torch.zeros(1, 18, 5, 5, dtype=torch.float64, requires_grad=True)
    theirs = torch.zeros(1, 18, 5, 5, dtype=torch.float64, requires_grad=True)
    modulated_deform_conv2d(x, ours, mask, w, None, 1, 1).sum().backward()
    torchvision.ops.deform_conv2d(x, theirs, w, padding=1, mask=mask).sum().backward()
    rows = torch.arange(5).view(1, 5, 1)
    cols = torch.arange(5).view(1, 1, 5)
    tap_y = torch.arange(3).repeat_interleave(3).view(9, 1, 1)
    tap_x = torch.arange(3).repeat(3).view(9, 1, 1)
    edge = ((rows - 1 + tap_y) == -1) | ((cols - 1 + tap_x) == -1)  # (9, 5, 5)
    edge = edge.repeat_interleave(2, dim=0).unsqueeze(0)
    assert edge.any() and theirs.grad[edge].abs().sum() > 0
    assert torch.all(ours.grad[edge] == 0)
    torch.testing.assert_close(ours.grad[~edge], theirs.grad[~edge])


def _random_state_dict(cin, cout, k, groups, deform_groups, modulated, bias, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    branch = (3 if modulated else 2) * deform_groups * k * k
    sd = {
        "weight": torch.randn(cout, cin // groups, k, k, generator=gen),
        "conv_offset.weight": torch.randn(branch, cin, k, k, generator=gen) * 0.3,
        "conv_offset.bias": torch.randn(branch, generator=gen) * 0.3,
    }
    if bias:
        sd["bias"] = torch.randn(cout, generator=gen)
    return sd


GEOMETRIES = [
    dict(stride=1, padding=1, dilation=1, groups=1, deform_groups=1),
    dict(stride=2, padding=1, dilation=1, groups=2, deform_groups=2),
    dict(stride=1, padding=2, dilation=2, groups=1, deform_groups=4),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["plain", "s2-g2-dg2", "d2-dg4"])
@pytest.mark.parametrize("legacy", [False, True], ids=["conv_offset", "conv_offset_mask"])
def test_modulated_pack_loads_mmcv_state_dicts_through_load_state_dict(
    geometry: dict, legacy: bool
) -> None:
    sd = _random_state_dict(4, 6, 3, geometry["groups"], geometry["deform_groups"], True, True)
    layer = ModulatedDeformConv2dPack(4, 6, 3, **geometry)
    stored = {
        k.replace("conv_offset.", "conv_offset_mask.") if legacy else k: v for k, v in sd.items()
    }
    result = layer.load_state_dict(stored)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(1))
    expected = mmcv_pack_forward(
        sd, x, geometry["stride"], geometry["padding"], geometry["dilation"], True
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["plain", "s2-g2-dg2", "d2-dg4"])
def test_pack_loads_mmcv_state_dicts_through_load_state_dict(geometry: dict) -> None:
    sd = _random_state_dict(4, 6, 3, geometry["groups"], geometry["deform_groups"], False, False)
    layer = DeformConv2dPack(4, 6, 3, **geometry)
    layer.load_state_dict(sd)
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(1), requires_grad=True)
    expected = mmcv_pack_forward(
        sd, x, geometry["stride"], geometry["padding"], geometry["dilation"], False
    )
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_legacy_keys_load_inside_a_model_by_mmcv_version_rule() -> None:
    """A model saved before version 2 (no version, or version 1) has conv_offset_mask keys; a
    version-2 state_dict with them is wrong, and its keys are named in the error."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), ModulatedDeformConv2dPack(4, 4, 3, padding=1))
    saved = model.state_dict()
    legacy = type(saved)(
        (k.replace("1.conv_offset.", "1.conv_offset_mask."), v) for k, v in saved.items()
    )
    legacy._metadata = {k: dict(v) for k, v in saved._metadata.items()}  # type: ignore[attr-defined]
    assert legacy._metadata["1"]["version"] == 2  # type: ignore[attr-defined]
    with pytest.raises(
        RuntimeError, match=r'"1\.conv_offset_mask\.weight", "1\.conv_offset_mask\.bias"'
    ) as info:
        nn.Sequential(
            nn.Conv2d(3, 4, 1), ModulatedDeformConv2dPack(4, 4, 3, padding=1)
        ).load_state_dict(legacy)
    assert '"1.conv_offset.weight", "1.conv_offset.bias"' in str(info.value)
    legacy._metadata["1"]["version"] = 1  # type: ignore[attr-defined]
    fresh = nn.Sequential(nn.Conv2d(3, 4, 1), ModulatedDeformConv2dPack(4, 4, 3, padding=1))
    fresh.load_state_dict(legacy)
    del legacy._metadata  # type: ignore[attr-defined]
    fresh.load_state_dict(legacy)
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(fresh(x), model(x))


def test_wrong_keys_are_listed_by_name() -> None:
    sd = _random_state_dict(4, 4, 3, 1, 1, False, False)
    sd["bias"] = torch.zeros(4)  # mmcv's DeformConv2dPack has no bias
    del sd["conv_offset.bias"]
    with pytest.raises(RuntimeError) as info:
        DeformConv2dPack(4, 4, 3, padding=1).load_state_dict(sd)
    message = str(info.value)
    assert 'Missing key(s) in state_dict: "conv_offset.bias"' in message
    assert 'Unexpected key(s) in state_dict: "bias"' in message


def test_state_dict_keys_and_version_are_mmcvs() -> None:
    v1 = DeformConv2dPack(4, 4, 3)
    v2 = ModulatedDeformConv2dPack(4, 4, 3)
    assert list(v1.state_dict()) == ["weight", "conv_offset.weight", "conv_offset.bias"]
    assert list(v2.state_dict()) == ["weight", "bias", "conv_offset.weight", "conv_offset.bias"]
    assert v1.state_dict()._metadata[""]["version"] == 2  # type: ignore[attr-defined]
    assert v2.state_dict()._metadata[""]["version"] == 2  # type: ignore[attr-defined]
    assert list(DeformConv2d(4, 4, 3).state_dict()) == ["weight"]
    assert list(ModulatedDeformConv2d(4, 4, 3, bias=False).state_dict()) == ["weight"]


# ---------------------------------------------------------------------------------------------
# The layer contract of mmcv/ops/deform_conv.py and modulated_deform_conv.py.


def test_defaults_and_initialisation_are_mmcvs() -> None:
    torch.manual_seed(0)
    v1 = DeformConv2d(8, 16, 3)
    assert v1.bias is None and v1.deform_groups == 1 and v1.im2col_step == 32
    assert v1.transposed is False and v1.output_padding == (0,)
    bound = (6 / (8 * 9)) ** 0.5  # kaiming_uniform_ with nonlinearity="relu"
    assert v1.weight.abs().max() <= bound and v1.weight.abs().max() > 0.9 * bound
    v2 = ModulatedDeformConv2d(8, 16, 3)
    bound = 1 / (8 * 9) ** 0.5  # mmcv's init_weights: uniform(-1/sqrt(n), 1/sqrt(n))
    assert v2.weight.abs().max() <= bound and v2.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(v2.bias) == 0
    pack = ModulatedDeformConv2dPack(8, 16, 3, padding=1)
    assert torch.count_nonzero(pack.conv_offset.weight) == 0
    assert (
        pack.conv_offset.out_channels == 27
        and DeformConv2dPack(8, 8, 3).conv_offset.out_channels == 18
    )


def test_new_modulated_pack_computes_half_the_convolution() -> None:
    """mmcv's mask is sigmoid(0) = 0.5 at initialisation."""
    layer = ModulatedDeformConv2dPack(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 7, 7)
    expected = F.conv2d(x, layer.weight, padding=1) / 2 + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_functionals_match_torchvision() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 7, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    offset = torch.randn(2, 2 * 2 * 9, 4, 4, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 2 * 9, 4, 4, generator=gen, dtype=torch.float64)
    got = modulated_deform_conv2d(x, offset, mask, w, b, 2, 1, 1, 2, 2)
    expected = torchvision.ops.deform_conv2d(x, offset, w, b, 2, 1, 1, mask=mask)
    torch.testing.assert_close(got, expected)
    got = deform_conv2d(x, offset, w, 2, 1, 1, 2, 2, False, 3)
    torch.testing.assert_close(got, torchvision.ops.deform_conv2d(x, offset, w, None, 2, 1, 1))


def test_functionals_cast_like_mmcv() -> None:
    """mmcv casts input to the offset's dtype and weight to the input's."""
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(3, 2, 3, 3)
    out = deform_conv2d(x, torch.zeros(1, 18, 3, 3, dtype=torch.float64), w)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.conv2d(x.double(), w.double()))


@pytest.mark.parametrize(
    "call,error,pattern",
    [
        (lambda: DeformConv2d(4, 4, 3, bias=True), ValueError, r"bias=True is not supported"),
        (
            lambda: DeformConv2d(3, 2, 3, groups=2),
            ValueError,
            r"in_channels must be divisible by groups",
        ),
        (
            lambda: DeformConv2d(4, 3, 3, groups=2),
            ValueError,
            r"out_channels must be divisible by groups",
        ),
        (
            lambda: DeformConv2dPack(4, 4, 3, deform_groups=3),
            ValueError,
            r"in_channels must be divisible by deform_groups",
        ),
        (
            lambda: DeformConv2d(4, 4, 3, im2col_step=0),
            ValueError,
            r"im2col_step must be a positive int, got 0",
        ),
        (
            lambda: ModulatedDeformConv2dPack(4, 4, 3, deform_groups=0),
            ValueError,
            r"deform_groups must be a positive int",
        ),
        (
            lambda: deform_conv2d(
                torch.rand(1, 4, 5, 5), torch.zeros(1, 18, 3, 3), torch.rand(4, 4, 3, 3), groups=2
            ),
            ValueError,
            r"groups=2 does not fit the tensors: input has 4 channels and weight.shape\[1\] is 4",
        ),
        (
            lambda: deform_conv2d(
                torch.rand(1, 4, 5, 5),
                torch.zeros(1, 18, 3, 3),
                torch.rand(4, 4, 3, 3),
                deform_groups=2,
            ),
            ValueError,
            r"offset must have 2 \* deform_groups \* kernel_height \* kernel_width = 36 channels",
        ),
        (
            lambda: deform_conv2d(
                torch.rand(1, 4, 5, 5), torch.zeros(1, 18, 3, 3), torch.rand(4, 4, 3, 3), bias=True
            ),
            ValueError,
            r"bias must be False",
        ),
        (
            lambda: modulated_deform_conv2d(
                torch.rand(1, 4, 5, 5),
                torch.zeros(1, 18, 3, 3),
                torch.ones(1, 18, 3, 3),
                torch.rand(4, 4, 3, 3),
            ),
            ValueError,
            r"mask must have deform_groups \* kernel_height \* kernel_width = 9 channels",
        ),
        (
            lambda: DeformConv2dPack(4, 4, 3)(torch.rand(1, 3, 8, 8)),
            ValueError,
            r"input must have shape \(batch, in_channels=4, height, width\), got \(1, 3, 8, 8\)",
        ),
        (
            lambda: ModulatedDeformConv2dPack(4, 4, 3)(torch.rand(1, 5, 8, 8)),
            ValueError,
            r"in_channels=4",
        ),
        (
            lambda: DeformConv2d(4, 4, 3)(torch.rand(4, 8, 8), torch.zeros(1, 18, 6, 6)),
            ValueError,
            r"in_channels=4",
        ),
        (
            lambda: ModulatedDeformConv2d(4, 4, 3)(torch.rand(1, 2, 8, 8), None, None),
            ValueError,
            r"in_channels=4",
        ),
    ],
)
def test_bad_arguments_are_named(call, error, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        call()


def test_deprecated_deformable_groups_is_accepted_with_a_warning() -> None:
    with pytest.warns(
        DeprecationWarning, match=r'"deformable_groups" is deprecated in DeformConv2dPack'
    ):
        layer = DeformConv2dPack(4, 4, 3, deformable_groups=2)
    assert layer.deform_groups == 2 and layer.conv_offset.out_channels == 36
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match=r"give deform_groups only"):
            ModulatedDeformConv2d(4, 4, 3, deform_groups=2, deformable_groups=2)


def test_im2col_step_does_not_constrain_the_batch() -> None:
    """mmcv asserts that im2col_step divides the batch; here any batch works, same numbers."""
    torch.manual_seed(0)
    layer = DeformConv2dPack(2, 3, 3, padding=1, im2col_step=4)
    nn.init.normal_(layer.conv_offset.weight, std=0.3)
    x = torch.randn(7, 2, 6, 6)
    out = layer(x)
    torch.testing.assert_close(out[:3], layer(x[:3]))


def test_top_level_names_are_these_layers() -> None:
    assert deformconv.DeformConv2dPack is DeformConv2dPack
    assert deformconv.ModulatedDeformConv2dPack is ModulatedDeformConv2dPack
    assert not hasattr(deformconv.nn, "DeformConv2dPack")
    assert not hasattr(deformconv.nn, "ModulatedDeformConv2dPack")
    assert issubclass(ModulatedDeformConv2dPack, ModulatedDeformConv2d)
    assert issubclass(DeformConv2dPack, DeformConv2d)


def test_offset_param_groups_finds_the_pack_branches() -> None:
    model = nn.Sequential(DeformConv2dPack(3, 4, 3), nn.ReLU(), ModulatedDeformConv2dPack(4, 4, 3))
    groups = offset_param_groups(model, lr=0.1, offset_lr_mult=0.1)
    branch = {id(p) for m in (model[0], model[2]) for p in m.conv_offset.parameters()}
    assert {id(p) for p in groups[1]["params"]} == branch
    assert len(groups[0]["params"]) == 1 + 2  # v1 weight; v2 weight and bias


def test_model_cost_counts_packs_like_deformable_layers() -> None:
    from deformconv.nn import DeformableConv2d

    ours = nn.Sequential(
        DeformableConv2d(3, 8, 3, padding=1, offset_groups=1, bias=False, modulated=False)
    )
    theirs = nn.Sequential(DeformConv2dPack(3, 8, 3, padding=1))
    a, b = model_cost(ours, (1, 3, 8, 8)), model_cost(theirs, (1, 3, 8, 8))
    assert (a.params, a.macs) == (b.params, b.macs)
    ours = nn.Sequential(DeformableConv2d(4, 8, 3, padding=1, offset_groups=2))
    theirs = nn.Sequential(ModulatedDeformConv2dPack(4, 8, 3, padding=1, deform_groups=2))
    a, b = model_cost(ours, (1, 4, 8, 8)), model_cost(theirs, (1, 4, 8, 8))
    assert (a.params, a.macs) == (b.params, b.macs)


@pytest.mark.parametrize(
    "make",
    [
        lambda: DeformConv2dPack(4, 6, 3, padding=1),
        lambda: ModulatedDeformConv2dPack(4, 6, 3, padding=1, deform_groups=2),
    ],
    ids=["v1", "v2"],
)
def test_compile_fullgraph(make) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = make()
    nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, layer(x))
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(grad, expected)
