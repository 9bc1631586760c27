"""Double backward of the deformable-convolution operator: gradgradcheck (finite differences of
the first-order gradients, the independent reference) in float64 on configurations covering
groups, offset groups, stride, dilation, kernel shapes, v1 and v2, with and without bias; and the
uses that need it (gradient penalties), in eager mode and through the compat layers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from deformconv import deform_conv2d
from deformconv.compat.mmcv import ModulatedDeformConv2dPack
from deformconv.ops import output_size


@dataclass(frozen=True)
class Case:
    name: str
    in_channels: int
    out_channels: int
    groups: int
    offset_groups: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    mask: bool
    bias: bool


CASES = [
    Case("v2-bias", 2, 3, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1), True, True),
    Case("v1-no-bias", 2, 2, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1), False, False),
    Case("v2-groups2", 4, 4, 2, 1, (3, 3), (1, 1), (1, 1), (1, 1), True, False),
    Case("v1-offset-groups2-bias", 4, 2, 1, 2, (2, 2), (1, 1), (0, 0), (1, 1), False, True),
    Case("v2-stride2", 2, 3, 1, 1, (3, 3), (2, 2), (1, 1), (1, 1), True, False),
    Case("v2-dilation2-bias", 2, 2, 1, 1, (3, 3), (1, 1), (2, 2), (2, 2), True, True),
    Case("v2-2x3-g2-og2-stride21", 4, 2, 2, 2, (2, 3), (2, 1), (1, 0), (1, 1), True, True),
]


def _inputs(case: Case, seed: int = 0, batch: int = 2) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    size = (5, 5)
    out_h, out_w = output_size(*size, case.kernel, case.stride, case.padding, case.dilation)
    taps = case.offset_groups * case.kernel[0] * case.kernel[1]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = rand(batch, case.in_channels, *size)
    # Offsets of a few tenths of a pixel plus 0.25 keep every tap away from the integer
    # positions where bilinear sampling is not differentiable, so finite differences apply.
    offset = rand(batch, 2 * taps, out_h, out_w) * 0.3 + 0.25
    mask = (
        torch.rand(batch, taps, out_h, out_w, generator=gen, dtype=torch.float64)
        if case.mask
        else None
    )
    weight = rand(case.out_channels, case.in_channels // case.groups, *case.kernel)
    bias = rand(case.out_channels) if case.bias else None
    return [t if t is None else t.requires_grad_() for t in (x, offset, mask, weight, bias)]


# Every case in fast mode (one random direction); the two cheapest, one v1 and one v2, also in
# full mode, every element of every second derivative (the others pass it too, in minutes).
RUNS = [(case, True) for case in CASES] + [(CASES[3], False), (CASES[6], False)]


@pytest.mark.parametrize(
    "case,fast_mode", RUNS, ids=[f"{c.name}-{'fast' if f else 'full'}" for c, f in RUNS]
)
def test_gradgradcheck(case: Case, fast_mode: bool) -> None:
    x, offset, mask, weight, bias = _inputs(case, batch=2 if fast_mode else 1)
    leaves = [t for t in (x, offset, mask, weight, bias) if t is not None]

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        it = iter(tensors)
        x, offset = next(it), next(it)
        m = next(it) if case.mask else None
        w = next(it)
        b = next(it) if case.bias else None
        return deform_conv2d(
            x,
            offset,
            w,
            b,
            stride=case.stride,
            padding=case.padding,
            dilation=case.dilation,
            mask=m,
        )

    assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=fast_mode)


def test_gradient_penalty_matches_finite_differences() -> None:
    """d/dw of ||d out.sum() / dx||^2, by double backward and by central differences."""
    case = CASES[0]
    x, offset, mask, weight, bias = _inputs(case, seed=1)

    def penalty(w: torch.Tensor) -> torch.Tensor:
        out = deform_conv2d(x, offset, w, bias, padding=1, mask=mask)
        (gx,) = torch.autograd.grad((out * out).sum(), x, create_graph=True)
        return gx.square().sum()

    (analytic,) = torch.autograd.grad(penalty(weight), weight)
    eps = 1e-6
    direction = torch.randn_like(weight)
    numeric = (penalty(weight + eps * direction) - penalty(weight - eps * direction)) / (2 * eps)
    torch.testing.assert_close((analytic * direction).sum(), numeric.detach(), rtol=1e-6, atol=1e-8)


def test_hessian_vector_product_through_a_compat_layer() -> None:
    torch.manual_seed(0)
    layer = ModulatedDeformConv2dPack(2, 3, 3, padding=1).double()
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.2)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    params = list(layer.parameters())
    loss = layer(x).square().sum()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vector = [torch.randn_like(p) for p in params]
    hvp = torch.autograd.grad(grads, params, vector)
    assert all(torch.isfinite(h).all() for h in hvp)
    assert hvp[-2].abs().sum() > 0  # the offset branch's weight has second-order terms


def test_double_backward_of_an_empty_batch() -> None:
    x = torch.zeros(0, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    offset = torch.zeros(0, 18, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = deform_conv2d(x, offset, weight, padding=1)
    (gw,) = torch.autograd.grad(out.sum(), weight, create_graph=True)
    assert gw.shape == weight.shape and torch.count_nonzero(gw) == 0
    (gx,) = torch.autograd.grad(gw.square().sum() + out.sum(), x, allow_unused=True)
    assert gx is None or (gx.shape == x.shape and torch.count_nonzero(gx) == 0)
