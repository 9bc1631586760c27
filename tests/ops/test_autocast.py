"""Autocast: the operator, the functional and every deformable layer behave under torch.autocast
as F.conv2d does (the expected dtypes are F.conv2d's own in the same region, not constants);
float32 runs are the reference for the values, and a small model trains under CPU bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deformconv import DeformableConv2d, DeformConv2d, deform_conv2d
from deformconv.compat import detectron2, mmcv
from deformconv.nn import DeformableSeparableConv2d


def _conv2d_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype F.conv2d returns for float32 tensors in this autocast region."""
    with torch.autocast(device_type, dtype=dtype):
        x, w = (
            torch.randn(1, 2, 4, 4, device=device_type),
            torch.randn(3, 2, 3, 3, device=device_type),
        )
        return F.conv2d(x, w).dtype


def _offsets(batch: int, channels: int, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(5))


# Each case: the layer and the extra forward arguments after the input (offsets, mask).
LAYERS = {
    "DeformConv2d": lambda: (DeformConv2d(4, 6, 3, padding=1), (_offsets(2, 18), None)),
    "DeformableConv2d-v2": lambda: (DeformableConv2d(4, 6, 3, padding=1), ()),
    "DeformableConv2d-v1": lambda: (DeformableConv2d(4, 6, 3, padding=1, modulated=False), ()),
    "DeformableSeparableConv2d": lambda: (DeformableSeparableConv2d(4, 6, 3, padding=1), ()),
    "mmcv.DeformConv2d": lambda: (mmcv.DeformConv2d(4, 6, 3, padding=1), (_offsets(2, 18),)),
    "mmcv.DeformConv2dPack": lambda: (mmcv.DeformConv2dPack(4, 6, 3, padding=1), ()),
    "mmcv.ModulatedDeformConv2d": lambda: (
        mmcv.ModulatedDeformConv2d(4, 6, 3, padding=1),
        (_offsets(2, 18), torch.rand(2, 9, 8, 8)),
    ),
    "mmcv.ModulatedDeformConv2dPack": lambda: (
        mmcv.ModulatedDeformConv2dPack(4, 6, 3, padding=1, deform_groups=2),
        (),
    ),
    "detectron2.DeformConv": lambda: (
        detectron2.DeformConv(4, 6, 3, padding=1, norm=nn.BatchNorm2d(6)),
        (_offsets(2, 18),),
    ),
    "detectron2.ModulatedDeformConv": lambda: (
        detectron2.ModulatedDeformConv(4, 6, 3, padding=1, activation=F.relu),
        (_offsets(2, 18), torch.rand(2, 9, 8, 8)),
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_cpu_bfloat16_forward_and_backward_of_every_layer(name: str) -> None:
    torch.manual_seed(0)
    layer, extra = LAYERS[name]()
    for module in layer.modules():
        if hasattr(module, "conv_offset"):
            nn.init.normal_(module.conv_offset.weight, std=0.1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    reference = layer(x, *extra)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, *extra)
    assert out.dtype == _conv2d_dtype("cpu", torch.bfloat16) == torch.bfloat16
    # One rounding of inputs and weights to bfloat16 (8 bits of mantissa), float32 sums inside.
    scale = reference.abs().max()
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=3e-2 * scale.item())
    out.float().square().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    for param_name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, param_name
        assert torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_functional_follows_the_autocast_dtype_in_force(dtype: torch.dtype) -> None:
    """Autocast casts the tensors, then the kernels sum in float32: the reference is float32
    deformable convolution of the same rounded tensors, so only the final rounding differs.
    (Against unrounded offsets the offset gradient differs much more in bfloat16: rounding a
    position by 1% may move it into the next pixel cell, where the bilinear slope changes.)"""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 7, generator=gen, requires_grad=True)
    offset = torch.randn(2, 18, 7, 7, generator=gen, requires_grad=True)
    mask = torch.rand(2, 9, 7, 7, generator=gen, requires_grad=True)
    weight = torch.randn(5, 4, 3, 3, generator=gen, requires_grad=True)
    bias = torch.randn(5, generator=gen, requires_grad=True)
    leaves = (x, offset, mask, weight, bias)
    rounded = [t.detach().to(dtype).float().requires_grad_() for t in leaves]
    reference = deform_conv2d(*rounded[:2], rounded[3], rounded[4], padding=1, mask=rounded[2])
    ref_grads = torch.autograd.grad(reference.sum(), rounded)
    with torch.autocast("cpu", dtype=dtype):
        out = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    assert out.dtype == _conv2d_dtype("cpu", dtype) == dtype
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(
        out.float(), reference, rtol=ulp, atol=ulp * reference.abs().max().item()
    )
    grads = torch.autograd.grad(out.float().sum(), leaves)
    for got, expected, name in zip(
        grads, ref_grads, ("x", "offset", "mask", "w", "b"), strict=True
    ):
        assert got.dtype == torch.float32, name
        atol = ulp * expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=ulp, atol=atol, msg=name)


def test_mixed_dtypes_from_autocast_layers_feed_the_operator() -> None:
    """The case of the report: a bfloat16 activation (from an autocast nn.Conv2d) into a layer
    with float32 weights raised 'weight must have the input's dtype'."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), DeformableConv2d(4, 4, 3, padding=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16


def test_float64_is_left_alone_and_mismatches_still_refused() -> None:
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    offset = torch.zeros(1, 18, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert deform_conv2d(x, offset, w).dtype == torch.float64
        with pytest.raises(TypeError, match=r"weight must have the input's dtype torch.float64"):
            deform_conv2d(x, offset, w.float())
    with pytest.raises(TypeError, match=r"offset must have the input's dtype torch.float32"):
        deform_conv2d(x.float(), offset.to(torch.bfloat16), w.float())


def test_small_model_trains_under_cpu_bfloat16_autocast() -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            DeformableConv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            mmcv.ModulatedDeformConv2dPack(8, 8, 3, padding=1, deform_groups=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        )
        for module in model.modules():
            if hasattr(module, "conv_offset"):
                nn.init.normal_(module.conv_offset.weight, std=0.05)
        return model

    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (32,), generator=gen)
    images = torch.randn(32, 1, 12, 12, generator=gen) + 0.5 * labels.view(-1, 1, 1, 1)

    def train(autocast: bool) -> list[float]:
        model = make()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(10):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(images).float(), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    mixed, full = train(True), train(False)
    assert mixed[-1] < 0.85 * mixed[0], mixed
    # Stated tolerance: every loss within 0.02 of the float32 run's (measured: 0.001).
    assert max(abs(a - b) for a, b in zip(mixed, full, strict=True)) < 0.02, (mixed, full)
    model = make()
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), reference, rtol=0, atol=2e-2 * reference.abs().max().item()
    )


def test_compiled_under_autocast() -> None:
    torch._dynamo.reset()
    layer = DeformableConv2d(4, 6, 3, padding=1)
    nn.init.normal_(layer.conv_offset.weight, std=0.1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x)

    x = torch.randn(2, 4, 7, 7)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, fn(x))


@pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
def test_autocast_rules_are_registered(key: str) -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key("deformconv::deform_conv2d", key)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA autocast acts on CUDA tensors only; the Triton interpreter runs on CPU tensors",
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype: torch.dtype) -> None:
    layer = DeformableConv2d(4, 6, 3, padding=1).cuda()
    nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = torch.randn(2, 4, 8, 8, device="cuda", requires_grad=True)
    reference = layer(x)
    with torch.autocast("cuda", dtype=dtype):
        out = layer(x)
    assert out.dtype == _conv2d_dtype("cuda", dtype) == dtype
    torch.testing.assert_close(
        out.float(), reference, rtol=0, atol=3e-2 * reference.abs().max().item()
    )
    out.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
