"""Deformable layers: torchvision compatibility, loading mmcv checkpoints into DeformableConv2d,
start-as-a-plain-convolution, learning, compilation, parameter groups, constructor and input
checks. (mmcv's and detectron2's exact layers are tested in tests/compat.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from deformconv.nn import (
    DeformableConv2d,
    DeformableSeparableConv2d,
    DeformConv2d,
    offset_param_groups,
)
from mmcv_reference import mmcv_pack_forward


def test_loads_torchvision_state_dict_and_matches() -> None:
    torch.manual_seed(0)
    theirs = torchvision.ops.DeformConv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    ours = DeformConv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 9, 9)
    offset = torch.randn(2, 18, 5, 5)
    mask = torch.rand(2, 9, 5, 5)
    torch.testing.assert_close(ours(x, offset, mask), theirs(x, offset, mask))
    torch.testing.assert_close(ours(x, offset), theirs(x, offset))


def test_no_bias_state_dict_matches_torchvision() -> None:
    theirs = torchvision.ops.DeformConv2d(2, 2, 1, bias=False)
    ours = DeformConv2d(2, 2, 1, bias=False)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.bias is None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(modulated=False),
        dict(offset_groups=2, stride=2, padding=2, dilation=2),
        dict(groups=2, kernel_size=(3, 1), padding=(1, 0)),
        dict(max_offset=2.0),
    ],
    ids=["v2", "v1", "og2-s2-d2", "g2-3x1", "bounded"],
)
def test_starts_as_the_plain_convolution(kwargs: dict) -> None:
    torch.manual_seed(0)
    args = dict(kernel_size=3, padding=1) | kwargs
    layer = DeformableConv2d(4, 6, **args)
    conv = nn.Conv2d(
        4,
        6,
        **{k: v for k, v in args.items() if k not in ("offset_groups", "modulated", "max_offset")},
    )
    conv.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = torch.randn(2, 4, 10, 11)
    torch.testing.assert_close(layer(x), conv(x))
    offset, mask = layer.offsets_and_mask(x)
    assert torch.count_nonzero(offset) == 0
    if layer.modulated:
        assert torch.equal(mask, torch.ones_like(mask))
    else:
        assert mask is None


def test_from_conv2d_copies_the_convolution() -> None:
    conv = nn.Conv2d(3, 5, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1))
    layer = DeformableConv2d.from_conv2d(conv, modulated=False)
    x = torch.randn(2, 3, 9, 8)
    torch.testing.assert_close(layer(x), conv(x))
    with pytest.raises(ValueError, match=r"conv must use numeric zero padding"):
        DeformableConv2d.from_conv2d(nn.Conv2d(3, 5, 3, padding="same"))
    with pytest.raises(TypeError, match=r"conv must be an nn.Conv2d, got Linear"):
        DeformableConv2d.from_conv2d(nn.Linear(2, 2))


def test_offset_branch_learns_a_shift() -> None:
    """With the main weight frozen, training only the offset branch recovers a shifted input."""
    torch.manual_seed(0)
    layer = DeformableConv2d(2, 2, 3, padding=1, modulated=True)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(8, 2, 12, 12)
    shifted = torch.roll(x, shifts=(1, 0), dims=(2, 3))
    with torch.no_grad():
        target = F.conv2d(shifted, layer.weight, layer.bias, padding=1)
    opt = torch.optim.Adam(layer.conv_offset.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("legacy", [False, True], ids=["conv_offset", "conv_offset_mask"])
def test_loads_mmcv_modulated_state_dict(legacy: bool) -> None:
    torch.manual_seed(0)
    sd = {
        "weight": torch.randn(6, 4, 3, 3),
        "bias": torch.randn(6),
        "conv_offset.weight": torch.randn(2 * 27, 4, 3, 3) * 0.1,
        "conv_offset.bias": torch.randn(2 * 27) * 0.1,
    }
    layer = DeformableConv2d(4, 6, 3, stride=1, padding=1, offset_groups=2)
    stored = {
        k.replace("conv_offset.", "conv_offset_mask.") if legacy else k: v for k, v in sd.items()
    }
    layer.load_mmcv_state_dict(stored)
    x = torch.randn(2, 4, 8, 8)
    expected = mmcv_pack_forward(sd, x, 1, 1, 1, modulated=True)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_loads_mmcv_v1_state_dict() -> None:
    torch.manual_seed(0)
    sd = {
        "weight": torch.randn(4, 4, 3, 3),
        "conv_offset.weight": torch.randn(18, 4, 3, 3) * 0.1,
        "conv_offset.bias": torch.randn(18) * 0.1,
    }
    layer = DeformableConv2d(4, 4, 3, padding=1, modulated=False, bias=False)
    layer.load_mmcv_state_dict(sd)
    x = torch.randn(2, 4, 8, 8)
    expected = mmcv_pack_forward(sd, x, 1, 1, 1, modulated=False)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_loads_torchvision_weights_into_the_self_offsetting_layer() -> None:
    theirs = torchvision.ops.DeformConv2d(4, 6, 3, padding=1)
    layer = DeformableConv2d(4, 6, 3, padding=1)
    missing, unexpected = layer.load_state_dict(theirs.state_dict(), strict=False)
    assert sorted(missing) == ["conv_offset.bias", "conv_offset.weight"] and not unexpected
    x = torch.randn(1, 4, 7, 7)
    zeros = torch.zeros(1, 18, 7, 7)
    torch.testing.assert_close(layer(x), theirs(x, zeros, torch.ones(1, 9, 7, 7)))


def test_max_offset_bounds_offsets() -> None:
    layer = DeformableConv2d(2, 2, 3, padding=1, max_offset=1.5)
    nn.init.normal_(layer.conv_offset.weight, std=10.0)
    offset, _ = layer.offsets_and_mask(torch.randn(2, 2, 8, 8))
    assert offset.abs().max() <= 1.5
    assert offset.abs().max() > 1.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: DeformConv2d(4, 6, 3, padding=1),
        lambda: DeformableConv2d(4, 6, 3, padding=1, offset_groups=2),
        lambda: DeformableConv2d(4, 6, 3, padding=1, modulated=False),
    ],
    ids=["DeformConv2d", "DeformableConv2d", "DeformableConv2d-v1"],
)
def test_compile_fullgraph(make) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = make()
    if isinstance(layer, DeformableConv2d):
        nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = torch.randn(2, 4, 8, 8)
    extra = () if isinstance(layer, DeformableConv2d) else (torch.randn(2, 18, 8, 8),)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x, *extra)
    torch.testing.assert_close(out, layer(x, *extra))
    out.sum().backward()
    assert layer.weight.grad is not None


def test_compile_with_inductor() -> None:
    torch._dynamo.reset()
    layer = DeformableConv2d(3, 4, 3, padding=1)
    nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = torch.randn(1, 3, 6, 6)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


def test_offset_param_groups() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        DeformableConv2d(4, 4, 3),
        DeformableConv2d(4, 4, 3, modulated=False, bias=False),
    )
    groups = offset_param_groups(model, lr=0.1, offset_lr_mult=0.5, weight_decay=1e-4)
    assert [len(g["params"]) for g in groups] == [2 + 2 + 1, 4]
    assert groups[1]["lr"] == pytest.approx(0.05) and groups[1]["weight_decay"] == 1e-4
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}
    assert len(offset_param_groups(nn.Conv2d(1, 1, 1), lr=0.1)) == 1
    with pytest.raises(ValueError, match=r"lr must be positive, got 0"):
        offset_param_groups(model, lr=0)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (
            dict(in_channels=3, groups=2),
            r"in_channels must be divisible by groups, got in_channels=3, groups=2",
        ),
        (
            dict(out_channels=3, groups=2),
            r"out_channels must be divisible by groups, got out_channels=3",
        ),
        (
            dict(offset_groups=3),
            r"in_channels must be divisible by offset_groups, got in_channels=4, offset_groups=3",
        ),
        (dict(in_channels=0), r"in_channels must be a positive int, got 0"),
        (dict(max_offset=-1.0), r"max_offset must be a positive finite number or None, got -1.0"),
        (dict(kernel_size=0), r"kernel_size must be >= 1, got 0"),
    ],
)
def test_constructor_errors(kwargs: dict, pattern: str) -> None:
    args = dict(in_channels=4, out_channels=4, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=pattern):
        DeformableConv2d(**args)


def test_repr_shows_non_default_arguments() -> None:
    assert repr(DeformConv2d(4, 6, 3)) == "DeformConv2d(4, 6, kernel_size=(3, 3))"
    text = repr(DeformableConv2d(4, 6, 3, padding=1, offset_groups=2, modulated=False))
    assert "padding=(1, 1)" in text and "offset_groups=2" in text and "modulated=False" in text


@pytest.mark.parametrize(
    "layer,extra",
    [
        (DeformConv2d(4, 6, 3, padding=1), (torch.zeros(1, 18, 8, 8),)),
        (DeformableConv2d(4, 6, 3, padding=1), ()),
        (DeformableSeparableConv2d(4, 6, 3, padding=1), ()),
    ],
    ids=["DeformConv2d", "DeformableConv2d", "DeformableSeparableConv2d"],
)
def test_wrong_input_channels_are_refused_at_the_entrance(layer: nn.Module, extra: tuple) -> None:
    """Named after the layer's in_channels, not after its hidden offset branch (issue 13)."""
    with pytest.raises(
        ValueError,
        match=r"input must have shape \(batch, in_channels=4, height, width\), got \(1, 3, 8, 8\)",
    ):
        layer(torch.randn(1, 3, 8, 8), *extra)
    with pytest.raises(ValueError, match=r"in_channels=4, height, width\), got \(3, 8, 8\)"):
        layer(torch.randn(3, 8, 8), *extra)
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor, got list"):
        layer([1.0], *extra)
