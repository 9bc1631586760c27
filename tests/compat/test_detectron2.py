"""deformconv.compat.detectron2 against detectron2's layers (detectron2/layers/deform_conv.py,
https://github.com/facebookresearch/detectron2/blob/main/detectron2/layers/deform_conv.py):
arguments, defaults, init, state_dict keys, norm and activation, empty inputs, CPU forward and
backward, with torchvision's operator as the independent reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from deformconv.compat.detectron2 import DeformConv, ModulatedDeformConv


def _detectron2_state_dict(cin: int, cout: int, groups: int, bias: bool, seed: int = 0) -> dict:
    """The keys detectron2's DeformBottleneckBlock saves for its conv2 with a norm."""
    gen = torch.Generator().manual_seed(seed)
    sd = {"weight": torch.randn(cout, cin // groups, 3, 3, generator=gen)}
    if bias:
        sd["bias"] = torch.randn(cout, generator=gen)
    sd.update(
        {
            "norm.weight": torch.rand(cout, generator=gen) + 0.5,
            "norm.bias": torch.randn(cout, generator=gen),
            "norm.running_mean": torch.randn(cout, generator=gen),
            "norm.running_var": torch.rand(cout, generator=gen) + 0.5,
            "norm.num_batches_tracked": torch.tensor(7),
        }
    )
    return sd


def _reference(sd: dict, x, offset, mask, stride, padding, dilation) -> torch.Tensor:
    """detectron2's forward: the deformable convolution, the norm (eval), the activation."""
    out = torchvision.ops.deform_conv2d(
        x, offset, sd["weight"], sd.get("bias"), stride, padding, dilation, mask=mask
    )
    out = F.batch_norm(
        out, sd["norm.running_mean"], sd["norm.running_var"], sd["norm.weight"], sd["norm.bias"]
    )
    return F.relu(out)


@pytest.mark.parametrize("modulated", [False, True], ids=["DeformConv", "ModulatedDeformConv"])
@pytest.mark.parametrize(
    "geometry",
    [
        dict(stride=1, padding=1, dilation=1, groups=1, deformable_groups=1),
        dict(stride=2, padding=2, dilation=2, groups=2, deformable_groups=2),
    ],
    ids=["plain", "s2-d2-g2-dg2"],
)
def test_loads_detectron2_state_dict_and_matches(modulated: bool, geometry: dict) -> None:
    layer_cls = ModulatedDeformConv if modulated else DeformConv
    layer = layer_cls(4, 6, 3, **geometry, norm=nn.BatchNorm2d(6), activation=F.relu).eval()
    sd = _detectron2_state_dict(4, 6, geometry["groups"], bias=modulated)
    assert sorted(layer.state_dict()) == sorted(sd)
    result = layer.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 9, 9, generator=gen)
    s, p, d = geometry["stride"], geometry["padding"], geometry["dilation"]
    out_size = (9 + 2 * p - d * 2 - 1) // s + 1
    taps = geometry["deformable_groups"] * 9
    offset = torch.randn(2, 2 * taps, out_size, out_size, generator=gen)
    mask = torch.rand(2, taps, out_size, out_size, generator=gen) if modulated else None
    args = (x, offset, mask) if modulated else (x, offset)
    expected = _reference(sd, x, offset, mask, s, p, d)
    torch.testing.assert_close(layer(*args), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modulated", [False, True], ids=["DeformConv", "ModulatedDeformConv"])
def test_cpu_backward_with_several_deformable_groups(modulated: bool) -> None:
    """detectron2 raises on CPU here ("Deformable Conv is not supported on CPUs!")."""
    torch.manual_seed(0)
    layer = (ModulatedDeformConv if modulated else DeformConv)(
        4, 6, 3, padding=1, deformable_groups=2
    )
    layer.double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    # Random offsets keep every tap off the exact edge row, where detectron2's CUDA kernel and
    # torchvision disagree about the offset gradient (tested in test_mmcv.py).
    offset = (torch.randn(2, 36, 6, 6, dtype=torch.float64) * 0.7).requires_grad_()
    mask = torch.rand(2, 18, 6, 6, dtype=torch.float64, requires_grad=True) if modulated else None
    args = (x, offset, mask) if modulated else (x, offset)
    out = layer(*args)
    leaves = [x, offset, layer.weight] + ([mask, layer.bias] if modulated else [])
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    rx, ro, rw, *rest = ref_leaves
    rm, rb = rest if modulated else (None, None)
    ref = torchvision.ops.deform_conv2d(rx, ro, rw, rb, padding=1, mask=rm)
    torch.testing.assert_close(out, ref)
    for got, expected in zip(
        grads, torch.autograd.grad(ref.square().sum(), ref_leaves), strict=True
    ):
        torch.testing.assert_close(got, expected)


def test_defaults_and_initialisation_are_detectron2s() -> None:
    torch.manual_seed(0)
    v1 = DeformConv(8, 16, 3)
    v2 = ModulatedDeformConv(8, 16, 3)
    assert (
        v1.bias is None and v1.deformable_groups == 1 and v1.norm is None and v1.activation is None
    )
    assert v2.with_bias is True and torch.count_nonzero(v2.bias) == 0
    assert ModulatedDeformConv(8, 16, 3, bias=False).bias is None
    bound = (6 / (8 * 9)) ** 0.5  # kaiming_uniform_ with nonlinearity="relu"
    for layer in (v1, v2):
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    assert repr(v1) == (
        "DeformConv(in_channels=8, out_channels=16, kernel_size=(3, 3), stride=(1, 1), "
        "padding=(0, 0), dilation=(1, 1), groups=1, deformable_groups=1, bias=False)"
    )


class _MustNotRun(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("norm ran on an empty input")


@pytest.mark.parametrize("modulated", [False, True], ids=["DeformConv", "ModulatedDeformConv"])
def test_empty_input_gives_an_empty_output_as_detectron2(modulated: bool) -> None:
    layer_cls = ModulatedDeformConv if modulated else DeformConv
    layer = layer_cls(4, 6, 3, stride=2, padding=1, norm=_MustNotRun(), activation=torch.relu)
    x = torch.zeros(0, 4, 9, 9, requires_grad=True)
    # detectron2 does not look at the offsets (or mask) of an empty input.
    args = (x, torch.zeros(0, 1), torch.zeros(0, 1)) if modulated else (x, torch.zeros(0, 1))
    out = layer(*args)
    assert out.shape == (0, 6, 5, 5)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with pytest.raises(ValueError, match=r"input of shape \(2, 4, 0, 9\) is empty but its output"):
        layer_cls(4, 6, 1, padding=1)(torch.zeros(2, 4, 0, 9), *args[1:])


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: DeformConv(4, 4, 3, bias=True), r"bias=True is not supported in DeformConv"),
        (lambda: DeformConv(4, 4, 3, groups=3), r"in_channels must be divisible by groups"),
        (
            lambda: ModulatedDeformConv(4, 4, 3, deformable_groups=3),
            r"in_channels must be divisible by deformable_groups",
        ),
        (
            lambda: DeformConv(4, 4, 3, deformable_groups=2)(
                torch.rand(1, 4, 5, 5), torch.zeros(1, 18, 3, 3)
            ),
            r"offset must have 2 \* deformable_groups \* kernel_height \* kernel_width = 36 channels",
        ),
        (
            lambda: ModulatedDeformConv(4, 4, 3)(
                torch.rand(1, 4, 5, 5), torch.zeros(1, 18, 3, 3), torch.ones(1, 18, 3, 3)
            ),
            r"mask must have deformable_groups \* kernel_height \* kernel_width = 9 channels",
        ),
        (
            lambda: DeformConv(4, 4, 3)(torch.rand(1, 3, 5, 5), torch.zeros(1, 18, 3, 3)),
            r"input must have shape \(batch, in_channels=4, height, width\), got \(1, 3, 5, 5\)",
        ),
    ],
)
def test_bad_arguments_are_named(call, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        call()


def test_wrong_keys_are_listed_by_name() -> None:
    sd = _detectron2_state_dict(4, 4, 1, bias=True)
    with pytest.raises(RuntimeError) as info:
        DeformConv(4, 4, 3, norm=nn.BatchNorm2d(4)).load_state_dict(sd)
    assert 'Unexpected key(s) in state_dict: "bias"' in str(info.value)
    del sd["norm.running_var"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "norm.running_var"'):
        ModulatedDeformConv(4, 4, 3, norm=nn.BatchNorm2d(4)).load_state_dict(sd)


def test_border_taps_get_no_offset_gradient_as_in_detectron2_cuda() -> None:
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    layer = DeformConv(2, 3, 3, padding=1).double()
    offset = torch.zeros(1, 18, 5, 5, dtype=torch.float64, requires_grad=True)
    layer(x, offset).sum().backward()
    # tap 0 of output (0, 0) samples (-1, -1): no gradient; the centre tap 4 at (2, 2) has one.
    assert offset.grad[0, 0:2, 0, 0].abs().sum() == 0
    reference = offset.detach().clone().requires_grad_()
    torchvision.ops.deform_conv2d(x, reference, layer.weight.detach(), padding=1).sum().backward()
    torch.testing.assert_close(offset.grad[0, 8:10, 2, 2], reference.grad[0, 8:10, 2, 2])


def test_compile_fullgraph() -> None:
    torch._dynamo.reset()
    layer = ModulatedDeformConv(
        4, 6, 3, padding=1, norm=nn.BatchNorm2d(6), activation=F.relu
    ).eval()
    args = (torch.randn(2, 4, 7, 7), torch.randn(2, 18, 7, 7), torch.rand(2, 9, 7, 7))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), layer(*args))
