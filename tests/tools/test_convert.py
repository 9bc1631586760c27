"""convert_to_deformable: mmdetection's R50-DCN recipe on torchvision's ResNet-50 (the layers of
mmdetection's configs/dcn, ``stage_with_dcn=(False, True, True, True)``), ResNeXt, a detection
backbone and timm; equality with the original model at conversion time, training, the report
against model_cost, and the errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from deformconv.nn import DeformableConv2d, offset_param_groups
from deformconv.tools import convert_to_deformable, model_cost

R50_DCN = (False, True, True, True)
# conv2 of every bottleneck of layer2 (4 blocks), layer3 (6) and layer4 (3) of ResNet-50.
R50_DCN_LAYERS = [
    f"layer{s}.{b}.conv2" for s, blocks in ((2, 4), (3, 6), (4, 3)) for b in range(blocks)
]


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


def _assert_same_output(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    # float32: the deformable kernel sums in another order than the convolution (1e-5 of the
    # output's scale); float64 shows that nothing else differs.
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert (a - b).abs().max() <= tol * a.abs().max(), (a - b).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_r50_dcn_starts_as_the_original_model(resnet50: nn.Module, dtype: torch.dtype) -> None:
    original = copy.deepcopy(resnet50).to(dtype)
    conversion = convert_to_deformable(original, stages=R50_DCN)
    assert [layer.name for layer in conversion.layers] == R50_DCN_LAYERS
    model = conversion.model
    assert model is not original and all(
        type(original.get_submodule(n)) is nn.Conv2d for n in R50_DCN_LAYERS
    )
    for name in R50_DCN_LAYERS:
        layer = model.get_submodule(name)
        assert isinstance(layer, DeformableConv2d) and layer.modulated and layer.offset_groups == 1
        torch.testing.assert_close(
            layer.weight, original.get_submodule(name).weight, rtol=0, atol=0
        )
    x = torch.randn(2, 3, 64, 64, dtype=dtype, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _assert_same_output(original(x), model(x), dtype)


def test_r50_dcn_trains(resnet50: nn.Module) -> None:
    conversion = convert_to_deformable(resnet50, stages=R50_DCN)
    model = conversion.model.train()
    optimizer = torch.optim.SGD(offset_param_groups(model, lr=0.1, offset_lr_mult=1.0), lr=0.1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    target = torch.randint(0, 1000, (2,), generator=gen)
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    branch = model.get_submodule("layer3.2.conv2").conv_offset.weight
    assert branch.grad is not None and branch.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    assert branch.abs().sum() > 0  # the offsets have left zero


def test_report_counts_equal_model_cost(resnet50: nn.Module) -> None:
    shape = (1, 3, 64, 64)
    conversion = convert_to_deformable(resnet50, stages=R50_DCN, input_shape=shape)
    before, after = model_cost(resnet50, shape), model_cost(conversion.model, shape)
    assert conversion.params_before == before.params
    assert conversion.params_after == after.params
    assert conversion.added_params == after.params - before.params
    assert conversion.added_macs == after.macs - before.macs
    rows = {row.name: row for row in after.layers}
    for layer in conversion.layers:
        assert layer.macs_after == rows[layer.name].macs
        assert layer.params_after == rows[layer.name].params
    first = conversion.layers[0]
    assert first.input_size == (1, 16, 16) and tuple(first.before.stride) == (2, 2)
    text = str(conversion)
    assert all(name in text for name in R50_DCN_LAYERS)
    assert f"+{conversion.added_params:,}" in text and f"+{conversion.added_macs:,}" in text
    assert json.loads(json.dumps(conversion.to_dict()))["added_macs"] == conversion.added_macs


def test_inplace_patterns_predicates_and_options() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.layer1.requires_grad_(False)
    model.layer4.eval()
    conversion = convert_to_deformable(
        model, ["layer1.0.conv1", "layer4.*.conv2"], modulated=False, offset_groups=4, inplace=True
    )
    assert conversion.model is model
    assert [layer.name for layer in conversion.layers] == [
        "layer1.0.conv1",
        "layer4.0.conv2",
        "layer4.1.conv2",
    ]
    first = model.layer1[0].conv1
    assert isinstance(first, DeformableConv2d) and not first.modulated and first.offset_groups == 4
    assert not first.weight.requires_grad and first.conv_offset.weight.requires_grad
    assert model.layer4[0].conv2.training is False and model.layer1[0].conv1.training is True
    assert conversion.macs_before is None and conversion.layers[0].added_params == 2 * 4 * 9 * (
        64 * 9 + 1
    )
    picked = convert_to_deformable(
        torchvision.models.resnet18(weights=None),
        lambda name, m: isinstance(m, nn.Conv2d) and m.stride == (2, 2) and m.kernel_size == (3, 3),
    )
    assert [layer.name for layer in picked.layers] == [
        "layer2.0.conv1",
        "layer3.0.conv1",
        "layer4.0.conv1",
    ]


def test_resnext_keeps_its_groups() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnext50_32x4d(weights=None).eval().double()
    conversion = convert_to_deformable(model, stages=R50_DCN, offset_groups=4)
    layer = conversion.model.get_submodule("layer2.0.conv2")
    assert layer.groups == 32 and layer.offset_groups == 4
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        _assert_same_output(model(x), conversion.model(x), torch.float64)


def test_detection_backbone() -> None:
    torch.manual_seed(0)
    detector = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=96, max_size=96
    ).eval()
    conversion = convert_to_deformable(detector, stages=R50_DCN)
    assert [layer.name for layer in conversion.layers] == [
        f"backbone.body.{name}" for name in R50_DCN_LAYERS
    ]
    images = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = detector.backbone(images)
        after = conversion.model.backbone(images)
        for key in before:
            _assert_same_output(before[key], after[key], torch.float32)
        detections = conversion.model(list(images))
    assert set(detections[0]) == {"boxes", "labels", "scores"}


def test_timm_resnet() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet26", pretrained=False).eval().double()
    conversion = convert_to_deformable(model, stages=R50_DCN)
    assert len(conversion.layers) == 2 + 2 + 2
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        _assert_same_output(model(x), conversion.model(x), torch.float64)


class _Padded(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (1, 1, 1, 1)))


@pytest.mark.parametrize(
    "model,kwargs,error,pattern",
    [
        (
            nn.Sequential(nn.Conv2d(3, 3, 3)),
            dict(layers="layer2.*"),
            ValueError,
            r"pattern 'layer2.\*' matches no module; the convolutions are named like '0'",
        ),
        (
            nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()),
            dict(layers="*"),
            TypeError,
            r"layer '1' is a ReLU, not an nn.Conv2d",
        ),
        (
            nn.Sequential(_Padded(3, 3, 3)),
            dict(layers="0"),
            TypeError,
            r"layer '0' is a _Padded, not an nn.Conv2d",
        ),
        (
            nn.Sequential(nn.Conv2d(3, 3, 3, padding="same")),
            dict(layers="0"),
            ValueError,
            r"layer '0' cannot convert: conv must use numeric zero padding",
        ),
        (
            nn.Sequential(nn.Conv2d(3, 3, 3)),
            dict(layers="0", offset_groups=2),
            ValueError,
            r"layer '0' cannot convert: in_channels must be divisible by offset_groups",
        ),
        (
            nn.Sequential(nn.Conv2d(3, 3, 3)),
            dict(layers=lambda n, m: False),
            ValueError,
            r"the layers predicate selected no module",
        ),
        (
            nn.Sequential(nn.Conv2d(3, 3, 3)),
            dict(stages=R50_DCN),
            ValueError,
            r"stages needs a ResNet-style model with children layer1, layer2, layer3, layer4",
        ),
        (nn.Sequential(nn.Conv2d(3, 3, 3)), dict(), ValueError, r"give exactly one of layers"),
        (
            nn.Sequential(nn.Conv2d(3, 3, 3)),
            dict(layers="0", stages=R50_DCN),
            ValueError,
            r"give exactly one of layers",
        ),
        (
            nn.Sequential(nn.Conv2d(3, 3, 3)),
            dict(layers="0", input_shape=(1, 0, 4)),
            ValueError,
            r"input_shape must be a shape of positive ints",
        ),
        (
            nn.Sequential(nn.Conv2d(3, 3, 3)),
            dict(stages=(1, 0)),
            TypeError,
            r"stages must be a sequence of bools",
        ),
        (
            nn.Linear(2, 2),
            dict(layers="weight"),
            ValueError,
            r"\(none: the model has no nn.Conv2d\)",
        ),
    ],
)
def test_bad_requests_are_named(model: nn.Module, kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        convert_to_deformable(model, **kwargs)
