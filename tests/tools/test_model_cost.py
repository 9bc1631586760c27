from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deformconv.nn import (
    DeformableConv2d,
    DeformableSeparableConv2d,
    DeformConv2d,
    DepthwiseConv2d,
    SeparableConv2d,
    SpatiallySeparableConv2d,
)
from deformconv.tools import ConvSpec, conv_cost, model_cost


def _flop_counter_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(shape))
    return counter.get_total_flops() // 2


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()
        )

    def forward(self, x):
        return torch.relu(x + self.body(x))


PLAIN_MODELS = {
    "sequential": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=4),
        nn.ConvTranspose2d(16, 4, 4, stride=2, padding=1, output_padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    ),
    "residual": lambda: nn.Sequential(nn.Conv2d(3, 8, 3), Residual(8), Residual(8)),
    "family": lambda: nn.Sequential(
        DepthwiseConv2d(3, 3, 2, stride=2, padding="same"),
        SeparableConv2d(6, 8, 3, padding="same"),
        SpatiallySeparableConv2d(8, 8, 5, padding=2, per_channel=True),
        SpatiallySeparableConv2d(8, 4, 3, mid_channels=6),
    ),
}


@pytest.mark.parametrize("name", PLAIN_MODELS)
def test_totals_of_plain_models_equal_flop_counter(name):
    torch.manual_seed(0)
    model = PLAIN_MODELS[name]()
    cost = model_cost(model, (2, 3, 20, 18))
    assert cost.macs == _flop_counter_macs(model, (2, 3, 20, 18))
    assert cost.params == sum(p.numel() for p in model.parameters())


def test_torchvision_resnet18_total_equals_flop_counter():
    models = pytest.importorskip("torchvision.models")
    model = models.resnet18()
    cost = model_cost(model, (1, 3, 64, 64))
    assert cost.macs == _flop_counter_macs(model, (1, 3, 64, 64))
    assert cost.params == 11_689_512
    names = [row.name for row in cost.layers]
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"] and names[-1] == "fc"
    rows = {row.name: row for row in cost.layers}
    assert rows["conv1"].receptive_field == (7, 7)
    assert rows["maxpool"].receptive_field == (11, 11)
    assert rows["layer1.0.conv1"].receptive_field == (19, 19)
    assert rows["fc"].receptive_field is None


def test_rows_of_a_small_chain():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2))
    cost = model_cost(model, (1, 3, 9, 9))
    assert [
        (r.name, r.type, r.output_shape, r.params, r.macs, r.receptive_field) for r in cost.layers
    ] == [
        ("0", "Conv2d", (1, 4, 9, 9), 112, 81 * 4 * 27, (3, 3)),
        ("1", "ReLU", (1, 4, 9, 9), 0, 0, (3, 3)),
        ("2", "Conv2d", (1, 4, 4, 4), 148, 16 * 4 * 36, (5, 5)),
    ]
    assert cost.layers[0].spec == ConvSpec("conv", 3, 4, 3, padding=1)
    assert cost.layers[1].spec is None


def _field_by_gradient(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """Rows and columns of input that reach the central output value."""
    x = torch.rand(shape, requires_grad=True)
    out = model(x)
    out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    rows = x.grad.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
    cols = x.grad.abs().sum(dim=(0, 1, 2)).nonzero().flatten()
    return int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1


@pytest.mark.parametrize(
    "layers",
    [
        [
            nn.Conv2d(1, 2, 3),
            nn.Conv2d(2, 2, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(2, 1, (3, 5), dilation=2),
        ],
        [
            nn.Conv2d(1, 2, 5, padding=2),
            nn.AvgPool2d(3, stride=2),
            nn.Conv2d(2, 1, 3, stride=(1, 2)),
        ],
        [
            DepthwiseConv2d(1, 3, 2, stride=2, padding="same"),
            SeparableConv2d(2, 2, 3),
            nn.AvgPool2d(2),
        ],
        [SpatiallySeparableConv2d(1, 2, (5, 3), stride=2), nn.Conv2d(2, 1, 3, dilation=3)],
        [nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Conv2d(2, 1, 3, stride=2)],
    ],
    ids=["convs", "pool", "separable", "spatial", "reflect"],
)
def test_receptive_field_matches_gradient_of_the_last_layer(layers):
    torch.manual_seed(0)
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.rand_like(parameter) + 0.5)
    cost = model_cost(model, (1, 1, 41, 41))
    assert cost.layers[-1].receptive_field == _field_by_gradient(model, (1, 1, 41, 41))


def test_receptive_field_through_additions_concatenation_and_flatten():
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = nn.Conv2d(1, 1, 3, padding=1)
            self.large = nn.Conv2d(1, 1, 7, padding=3)
            self.head = nn.Linear(2 * 8 * 8, 2)

        def forward(self, x):
            both = torch.cat([self.small(x), self.large(x)], dim=1)
            return self.head(torch.flatten(both + 1, 1))

    cost = model_cost(Branches(), (1, 1, 8, 8))
    assert [(r.name, r.receptive_field) for r in cost.layers] == [
        ("small", (3, 3)),
        ("large", (7, 7)),
        ("head", None),
    ]


class TorchvisionDeformable(nn.Module):
    """Offsets (and a mask) from a plain convolution, fed to torchvision's layer."""

    def __init__(self, offset_groups: int, modulated: bool) -> None:
        super().__init__()
        import torchvision

        taps = 9 * offset_groups
        self.offset = nn.Conv2d(4, (3 if modulated else 2) * taps, 5, padding=2)
        self.dcn = torchvision.ops.DeformConv2d(4, 6, 3, padding=1, groups=2)
        self.taps, self.modulated = taps, modulated

    def forward(self, x):
        out = self.offset(x)
        mask = torch.sigmoid(out[:, 2 * self.taps :]) if self.modulated else None
        return self.dcn(x, out[:, : 2 * self.taps], mask)


@pytest.mark.parametrize(
    ("offset_groups", "modulated"), list(itertools.product((1, 2), (False, True)))
)
def test_torchvision_deform_conv_is_counted_from_its_call(offset_groups, modulated):
    pytest.importorskip("torchvision")
    model = TorchvisionDeformable(offset_groups, modulated)
    cost = model_cost(model, (2, 4, 10, 10))
    rows = {row.name: row for row in cost.layers}
    spec = ConvSpec(
        "deformable",
        4,
        6,
        3,
        padding=1,
        groups=2,
        offset_groups=offset_groups,
        modulated=modulated,
        offset_branch=False,
    )
    assert rows["dcn"].spec == spec
    assert rows["dcn"].macs == conv_cost(spec, (10, 10), batch=2).macs
    steps = {step.name for step in conv_cost(spec, 10).steps}
    assert steps == {"bilinear sampling", "convolution"} | ({"modulation"} if modulated else set())
    # The offsets come from a 5 x 5 window around each output, wider than the 3 x 3 grid.
    assert rows["dcn"].receptive_field == (5, 5)
    assert cost.macs == rows["offset"].macs + rows["dcn"].macs


def test_deformconv_layers_count_their_offset_branch():
    model = nn.Sequential(
        DeformableConv2d(3, 8, 3, padding=1, offset_groups=1, modulated=False),
        DeformableSeparableConv2d(
            8, 16, 3, stride=2, padding=1, depth_multiplier=2, offset_groups=2
        ),
        DeformConv2d(16, 4, 1),
    )
    head = model[2]
    model[2] = nn.Identity()
    cost = model_cost(model, (1, 3, 12, 12))
    assert [row.name for row in cost.layers] == ["0", "1", "2"]
    first = conv_cost(ConvSpec("deformable", 3, 8, 3, padding=1, modulated=False), 12)
    second = conv_cost(
        ConvSpec("deformable_separable", 8, 16, 3, 2, 1, depth_multiplier=2, offset_groups=2), 12
    )
    assert [row.macs for row in cost.layers[:2]] == [first.macs, second.macs]
    assert [row.params for row in cost.layers[:2]] == [first.params, second.params]
    assert cost.layers[1].receptive_field == (5, 5)
    assert head.in_channels == 16


def test_work_outside_child_layers_goes_to_the_module_that_does_it():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(4, 4, 1)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            tokens = self.proj(x).flatten(2).transpose(1, 2)
            mixed, _ = self.attn(tokens, tokens, tokens)
            return mixed @ tokens.transpose(1, 2)

    model = Attention()
    model.train()  # FlopCounterMode misses the fused kernel that eval mode would use
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 4, 6, 6))
    cost = model_cost(model, (1, 4, 6, 6))
    assert cost.macs == counter.get_total_flops() // 2
    tokens, dim = 36, 4
    rows = {row.name: row for row in cost.layers}
    # Projections in, scores and weighted sum over 2 heads of width 2, projection out.
    attention = 3 * tokens * dim * dim + 2 * tokens * tokens * dim + tokens * dim * dim
    assert (rows["attn"].macs, rows["attn"].params) == (attention, 3 * dim * dim + 3 * dim)
    assert (rows["(model)"].macs, rows["(model)"].params) == (tokens * tokens * dim, 0)
    assert [row.name for row in cost.layers] == ["proj", "attn", "(model)"]


def test_model_state_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model.train()
    model[2].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model_cost(model, (2, 3, 8, 8))
    assert model.training and model[1].training and not model[2].training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert all(
        not hook for m in model.modules() for hook in (m._forward_hooks, m._forward_pre_hooks)
    )


def test_shared_parameters_are_counted_once_and_repeated_calls_get_rows():
    conv = nn.Conv2d(2, 2, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    cost = model_cost(model, (1, 2, 5, 5))
    assert cost.params == 2 * 2 * 9 + 2
    assert [row.name for row in cost.layers] == ["0", "1", "0"]
    assert cost.layers[2].receptive_field == (5, 5)


def test_to_dict():
    cost = model_cost(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Flatten()), (1, 1, 4, 4))
    assert cost.to_dict() == {
        "input_shape": [1, 1, 4, 4],
        "params": 10,
        "macs": 36,
        "layers": [
            {
                "name": "0",
                "type": "Conv2d",
                "output_shape": [1, 1, 2, 2],
                "params": 10,
                "macs": 36,
                "receptive_field": [3, 3],
            },
            {
                "name": "1",
                "type": "Flatten",
                "output_shape": [1, 4],
                "params": 0,
                "macs": 0,
                "receptive_field": None,
            },
        ],
    }


@pytest.mark.parametrize("shape", [(), (1, 0, 4, 4), (1, 3, -2, 4)])
def test_bad_input_shape(shape):
    with pytest.raises(ValueError, match="input_shape must be a non-empty shape of positive sizes"):
        model_cost(nn.Conv2d(3, 1, 1), shape)
