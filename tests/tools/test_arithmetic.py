from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deformconv.nn import (
    DeformableConv2d,
    DeformableSeparableConv2d,
    DepthwiseConv2d,
    SeparableConv2d,
    SpatiallySeparableConv2d,
)
from deformconv.tools import ConvSpec, conv_cost, spec_from_module, transposed_output_padding

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


def build(spec: ConvSpec) -> nn.Module:
    """The real layer a spec describes."""
    common = {"stride": spec.stride, "padding": spec.padding, "dilation": spec.dilation}
    if spec.kind == "conv":
        return nn.Conv2d(
            spec.in_channels,
            spec.out_channels,
            spec.kernel_size,
            groups=spec.groups,
            bias=spec.bias,
            **common,
        )
    if spec.kind == "transposed":
        return nn.ConvTranspose2d(
            spec.in_channels,
            spec.out_channels,
            spec.kernel_size,
            output_padding=spec.output_padding,
            groups=spec.groups,
            bias=spec.bias,
            **common,
        )
    if spec.kind == "depthwise":
        return DepthwiseConv2d(
            spec.in_channels, spec.kernel_size, spec.depth_multiplier, bias=spec.bias, **common
        )
    if spec.kind == "separable":
        return SeparableConv2d(
            spec.in_channels,
            spec.out_channels,
            spec.kernel_size,
            depth_multiplier=spec.depth_multiplier,
            bias=spec.bias,
            **common,
        )
    if spec.kind == "spatial":
        return SpatiallySeparableConv2d(
            spec.in_channels,
            spec.out_channels,
            spec.kernel_size,
            per_channel=spec.per_channel,
            mid_channels=spec.mid_channels,
            bias=spec.bias,
            **common,
        )
    if spec.kind == "deformable":
        return DeformableConv2d(
            spec.in_channels,
            spec.out_channels,
            spec.kernel_size,
            groups=spec.groups,
            bias=spec.bias,
            offset_groups=spec.offset_groups,
            modulated=spec.modulated,
            **common,
        )
    return DeformableSeparableConv2d(
        spec.in_channels,
        spec.out_channels,
        spec.kernel_size,
        depth_multiplier=spec.depth_multiplier,
        bias=spec.bias,
        offset_groups=spec.offset_groups,
        modulated=spec.modulated,
        **common,
    )


GEOMETRY = [
    # kernel, stride, padding, dilation, size
    (3, 1, 0, 1, (9, 9)),
    ((3, 5), (2, 1), (1, 2), 1, (10, 11)),
    (2, 2, 1, (2, 1), (8, 7)),
    (5, 3, 2, 2, (13, 12)),
]
SAME = [(4, 2, "same", 1, (9, 10)), (3, (1, 3), "same", (2, 1), (7, 11))]
# nn.Conv2d takes padding="same" at stride 1 only.
SAME_STRIDE_1 = [(4, 1, "same", 1, (9, 10)), ((3, 2), 1, "same", (2, 3), (7, 11))]


def _pair(value):
    return (value, value) if isinstance(value, int) else value


def _cases(kind, geometries, options):
    """``(spec, input size)`` for each geometry, with the matching entry of ``options``."""
    return [
        (ConvSpec(kind, *channels, kernel, stride, padding, dilation, **extra), size)
        for (kernel, stride, padding, dilation, size), (channels, extra) in zip(
            geometries, itertools.cycle(options)
        )
    ]


CASES = (
    _cases("conv", GEOMETRY + SAME_STRIDE_1, [((4, 6), {}), ((4, 6), {"bias": False})])
    + _cases("conv", GEOMETRY, [((6, 9), {"groups": 3})])
    + [
        (
            ConvSpec(
                "transposed",
                4,
                6,
                k,
                s,
                p,
                d,
                groups=2,
                output_padding=tuple(v - 1 for v in _pair(s)),
            ),
            size,
        )
        for k, s, p, d, size in GEOMETRY
    ]
    + [(ConvSpec("transposed", 3, 2, 3, 2, 1, 3, output_padding=2), (5, 6))]
    + _cases(
        "depthwise", GEOMETRY + SAME, [((3, None), {"depth_multiplier": m}) for m in (1, 2, 3)]
    )
    + _cases(
        "separable",
        GEOMETRY + SAME,
        [((3, 5), {"depth_multiplier": m, "bias": m != 2}) for m in (1, 2, 3)],
    )
    + _cases("spatial", GEOMETRY + SAME, [((3, 3), {"per_channel": True})])
    + _cases("spatial", GEOMETRY + SAME, [((3, 5), {"mid_channels": m}) for m in (None, 2, 7)])
    + _cases(
        "deformable",
        GEOMETRY,
        [
            ((4, 6), {"groups": g, "offset_groups": og, "modulated": mod})
            for g, og, mod in ((1, 1, True), (2, 2, False), (1, 4, True), (2, 1, False))
        ],
    )
    + _cases(
        "deformable_separable",
        GEOMETRY,
        [
            ((4, 6), {"depth_multiplier": m, "offset_groups": og, "modulated": mod})
            for m, og, mod in ((1, 1, True), (2, 2, False), (3, 4, True), (1, 1, False))
        ],
    )
)
IDS = [repr(spec) for spec, _ in CASES]


@pytest.mark.parametrize(("spec", "size"), CASES, ids=IDS)
def test_shape_and_params_equal_the_real_layer(spec, size):
    torch.manual_seed(0)
    layer = build(spec)
    out = layer(torch.randn(2, spec.in_channels, *size))
    cost = conv_cost(spec, size, batch=2)
    assert (2, *cost.output_shape) == tuple(out.shape)
    assert cost.params == sum(p.numel() for p in layer.parameters())
    assert spec_from_module(layer) == spec


@pytest.mark.parametrize(
    ("spec", "size"), [c for c in CASES if not c[0].kind.startswith("deformable")], ids=repr
)
def test_macs_equal_flop_counter_over_two(spec, size):
    layer = build(spec)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(3, spec.in_channels, *size))
    assert conv_cost(spec, size, batch=3).macs * 2 == counter.get_total_flops()


@pytest.mark.parametrize(
    ("spec", "size"), [c for c in CASES if c[0].kind.startswith("deformable")], ids=repr
)
def test_deformable_steps(spec, size):
    """The offset branch is a convolution FlopCounterMode counts; sampling and modulation follow
    the documented convention: 4 MACs and 1 MAC per sampled value, C_in * kh * kw values per
    output position."""
    layer = build(spec)
    x = torch.randn(2, spec.in_channels, *size)
    with FlopCounterMode(display=False) as counter:
        branch = (
            layer.depthwise.conv_offset(x)
            if spec.kind == "deformable_separable"
            else layer.conv_offset(x)
        )
    steps = {step.name: step for step in conv_cost(spec, size, batch=2).steps}
    assert steps["offset branch"].macs * 2 == counter.get_total_flops()
    assert steps["offset branch"].output_shape == tuple(branch.shape[1:])
    _, h, w = steps["offset branch"].output_shape
    sampled = 2 * h * w * spec.in_channels * math.prod(spec.kernel_size)
    assert steps["bilinear sampling"].macs == 4 * sampled
    assert ("modulation" in steps) == spec.modulated
    if spec.modulated:
        assert steps["modulation"].macs == sampled


@pytest.mark.parametrize(("spec", "size"), CASES, ids=IDS)
def test_activation_memory_is_what_the_layers_steps_produce(spec, size):
    layer = build(spec)
    produced = []
    leaves = [m for m in layer.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(lambda m, i, o: produced.append(o.numel())) for m in leaves]
    out = layer(torch.randn(2, spec.in_channels, *size))
    for handle in handles:
        handle.remove()
    if isinstance(layer, DeformableConv2d):
        produced.append(out.numel())  # the deformable step itself is not a child module
    elif isinstance(layer, DeformableSeparableConv2d):
        produced.append(layer.depthwise(torch.randn(2, spec.in_channels, *size)).numel())
    cost = conv_cost(spec, size, batch=2, bytes_per_element=2)
    assert cost.activation_elements == sum(produced)
    assert cost.activation_bytes == 2 * sum(produced)


def _span(reach: torch.Tensor) -> int:
    """Widest run from first to last True along dim 0, over the other dims."""
    index = torch.arange(reach.shape[0]).reshape(-1, *[1] * (reach.dim() - 1))
    last = torch.where(reach, index, -1).amax(0)
    first = torch.where(reach, index, reach.shape[0]).amin(0)
    return int((last - first + 1).clamp(min=0).max())


def _measured_field(layer: nn.Module, channels: int, size: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of input that reach one output value, widest over all outputs: every
    layer here is affine, so one batch of one-hot inputs shows which inputs reach which outputs."""
    h, w = size
    impulses = torch.eye(h * w).reshape(h * w, 1, h, w).expand(-1, channels, -1, -1)
    with torch.no_grad():
        response = (layer(impulses) - layer(torch.zeros(1, channels, h, w))).abs().sum(1)
    reach = response.reshape(h, w, *response.shape[1:]) > 0  # [in_y, in_x, out_y, out_x]
    return _span(reach.any(1)), _span(reach.any(0))


@pytest.mark.parametrize(
    "spec",
    [ConvSpec("conv", 2, 2, (3, 2), 2, 3, (2, 3)), ConvSpec("separable", 2, 3, 4, 1, "same", 2)]
    + [ConvSpec("spatial", 2, 2, (5, 3), 1, 2, 1, per_channel=True)]
    + [
        ConvSpec("transposed", 1, 1, k, s, 0, d)
        for k, s, d in itertools.product((2, 3, 4), (1, 2, 3), (1, 2, 3))
    ],
    ids=repr,
)
def test_receptive_field_is_measured_by_gradients(spec):
    torch.manual_seed(0)
    layer = build(spec)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.rand_like(parameter) + 0.5)
    size = (12, 12)
    assert conv_cost(spec, size).receptive_field == _measured_field(layer, spec.in_channels, size)


def test_notes_examples():
    normal = conv_cost(ConvSpec("conv", 3, 256, 5), (12, 12))
    separable = conv_cost(ConvSpec("separable", 3, 256, 5), (12, 12))
    assert normal.output_shape == separable.output_shape == (256, 8, 8)
    assert (normal.macs, separable.macs, normal.macs_per_output) == (1_228_800, 53_952, 75)
    assert conv_cost(ConvSpec("conv", 16, 32, 3, bias=False), 12).params == 4608
    assert conv_cost(ConvSpec("separable", 16, 32, 3, bias=False), 12).params == 656
    assert conv_cost(
        ConvSpec("depthwise", 3, kernel_size=5, depth_multiplier=2), 12
    ).output_shape == (6, 8, 8)


def test_to_dict_is_json_ready():
    import json

    data = json.loads(json.dumps(conv_cost(ConvSpec("separable", 3, 256, 5), (12, 12)).to_dict()))
    assert data["output_shape"] == {"channels": 256, "height": 8, "width": 8}
    assert data["macs"] == 53952 and data["spec"]["kernel_size"] == [5, 5]
    assert [step["name"] for step in data["steps"]] == ["depthwise", "pointwise"]


def test_spec_repr_and_title():
    spec = ConvSpec("conv", 8, 16, 3, padding="same", groups=4, dilation=2)
    assert repr(spec) == (
        "ConvSpec(kind='conv', in_channels=8, out_channels=16, kernel_size=(3, 3), padding='same', "
        "dilation=(2, 2), groups=4)"
    )
    assert spec.title == "grouped dilated convolution (groups=4, dilation=2)"
    assert (
        ConvSpec("deformable_separable", 4, 4).title
        == "deformable depthwise separable convolution v2"
    )


def test_spec_from_module_reads_deformconv_and_torchvision_layers():
    torchvision = pytest.importorskip("torchvision")
    spec = spec_from_module(torchvision.ops.DeformConv2d(4, 8, 3, padding=1, groups=2))
    assert (spec.kind, spec.offset_branch, spec.groups, spec.padding) == (
        "deformable",
        False,
        2,
        (1, 1),
    )
    with pytest.raises(TypeError, match=r"module must be a 2-D convolution layer .* got Linear"):
        spec_from_module(nn.Linear(2, 3))


@pytest.mark.parametrize(
    ("kwargs", "size", "error", "message"),
    [
        ({"in_channels": -3}, 8, ValueError, "in_channels must be a positive int, got -3"),
        ({"out_channels": 0}, 8, ValueError, "out_channels must be a positive int, got 0"),
        (
            {"kernel_size": (3, -1)},
            8,
            ValueError,
            r"kernel_size must be >= 1, got \(3, -1\)",
        ),
        ({"padding": -2}, 8, ValueError, r"padding must be >= 0, got -2"),
        ({"stride": 0}, 8, ValueError, r"stride must be >= 1, got 0"),
        (
            {"kernel_size": 2.5},
            8,
            TypeError,
            r"kernel_size must be an int or a pair of ints, got 2.5",
        ),
        (
            {"padding": "full"},
            8,
            ValueError,
            "padding must be an int, a pair of ints, 'same' or 'valid', got 'full'",
        ),
        ({}, (0, 8), ValueError, r"input_size must be >= 1, got \(0, 8\)"),
        ({}, (8, -4), ValueError, r"input_size must be >= 1, got \(8, -4\)"),
        (
            {"kernel_size": 5},
            (4, 12),
            ValueError,
            r"the kernel extent along height is 5 \(kernel_size 5, dilation 1\), larger than the padded input height 4 \(input 4 \+ padding 0 \+ 0\)",
        ),
        (
            {"kernel_size": 3, "dilation": (1, 3), "padding": 1},
            (8, 4),
            ValueError,
            r"the kernel extent along width is 7 \(kernel_size 3, dilation 3\), larger than the padded input width 6 \(input 4 \+ padding 1 \+ 1\)",
        ),
        (
            {"groups": 4, "in_channels": 6},
            8,
            ValueError,
            "in_channels=6 must be divisible by groups=4",
        ),
        (
            {"groups": 2, "out_channels": 5},
            8,
            ValueError,
            "out_channels=5 must be divisible by groups=2",
        ),
        ({"groups": 0}, 8, ValueError, "groups must be a positive int, got 0"),
        (
            {"kind": "deformable", "offset_groups": 4, "in_channels": 6},
            8,
            ValueError,
            "in_channels=6 must be divisible by offset_groups=4",
        ),
        (
            {"kind": "separable", "groups": 2},
            8,
            ValueError,
            "groups applies to kinds conv, transposed, deformable, not 'separable'; got groups=2",
        ),
        (
            {"depth_multiplier": 2},
            8,
            ValueError,
            "depth_multiplier applies to kinds depthwise, separable, deformable_separable, not 'conv'",
        ),
        (
            {"kind": "depthwise", "out_channels": 7, "depth_multiplier": 2},
            8,
            ValueError,
            r"out_channels of a depthwise convolution is in_channels \* depth_multiplier = 8; got out_channels=7",
        ),
        ({"out_channels": None}, 8, ValueError, "out_channels is required for kind 'conv'"),
        (
            {"kind": "full"},
            8,
            ValueError,
            "kind must be one of conv, transposed, depthwise, separable, spatial, deformable, deformable_separable; got 'full'",
        ),
        (
            {"kind": "transposed", "padding": "same"},
            8,
            ValueError,
            "padding='same' applies to kinds conv, depthwise, separable and spatial, not 'transposed'",
        ),
        (
            {"kind": "transposed", "stride": 2, "output_padding": 2},
            8,
            ValueError,
            r"output_padding along height must be smaller than the stride \(2\) or the dilation \(1\); got 2",
        ),
        (
            {"kind": "transposed", "padding": 5},
            2,
            ValueError,
            "a transposed convolution of a 2x2 input gives a -6x-6 output",
        ),
        (
            {"kind": "spatial", "per_channel": True},
            8,
            ValueError,
            "out_channels must equal in_channels when per_channel=True, got in_channels=4, out_channels=8",
        ),
    ],
)
def test_bad_descriptions(kwargs, size, error, message):
    arguments = {"kind": "conv", "in_channels": 4, "out_channels": 8, "kernel_size": 3, **kwargs}
    with pytest.raises(error, match=message):
        conv_cost(ConvSpec(**arguments), size)


def test_bad_batch_and_bytes():
    spec = ConvSpec("conv", 1, 1)
    with pytest.raises(ValueError, match="batch must be a positive int, got 0"):
        conv_cost(spec, 8, batch=0)
    with pytest.raises(TypeError, match=r"bytes_per_element must be an int, got float 2\.5"):
        conv_cost(spec, 8, bytes_per_element=2.5)


def _transposed_size(n: int, k: int, s: int, p: int, d: int, op: int) -> int | None:
    try:
        out = F.conv_transpose2d(
            torch.zeros(1, 1, n, 1),
            torch.zeros(1, 1, k, 1),
            stride=(s, 1),
            padding=(p, 0),
            output_padding=(op, 0),
            dilation=(d, 1),
        )
    except RuntimeError:
        return None
    return out.shape[2]


@pytest.mark.parametrize(
    ("n", "k", "s", "p", "d"),
    list(itertools.product((1, 2, 5), (1, 2, 3, 4), (1, 2, 3), (0, 1, 3), (1, 2))),
)
def test_transposed_output_padding_against_conv_transpose(n, k, s, p, d):
    reachable = {}
    for op in range(max(s, d)):
        size = _transposed_size(n, k, s, p, d, op)
        if size is not None:
            reachable[size] = op
    for target in range(1, (n + 2) * s + k * d + 3):
        if target in reachable:
            assert transposed_output_padding(n, target, k, s, p, d) == (reachable[target],) * 2
            continue
        with pytest.raises(ValueError, match=f"output height {target} is out of reach") as error:
            transposed_output_padding(n, target, k, s, p, d)
        suggestion = re.search(r"padding=(\d+) reaches", str(error.value))
        if suggestion:
            fixed = int(suggestion.group(1))
            op = transposed_output_padding(n, target, k, s, fixed, d)[0]
            assert _transposed_size(n, k, s, fixed, d, op) == target


def test_transposed_output_padding_per_dimension_and_messages():
    assert transposed_output_padding((4, 5), (8, 10), (3, 2), (2, 2), (1, 0)) == (1, 0)
    with pytest.raises(
        ValueError,
        match=r"gives only 10 \(output_padding must stay 0 when stride and dilation are 1\); padding moves the size in steps of 2",
    ):
        transposed_output_padding(8, 11, 3)
    with pytest.raises(
        ValueError,
        match="even padding=0 tops out at 10; use a larger kernel_size, stride or dilation",
    ):
        transposed_output_padding(8, 12, 3)
    with pytest.raises(ValueError, match="output_size must be >= 1, got 0"):
        transposed_output_padding(8, 0, 3)
