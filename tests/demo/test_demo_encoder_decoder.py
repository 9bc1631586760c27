from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deformconv.demo.encoder_decoder import (
    EncoderDecoder,
    EncoderDecoderConfig,
    deformable_encoder,
    load_encoder_decoder,
    save_encoder_decoder,
)
from deformconv.nn import DeformableConv2d
from deformconv.tools import model_cost

TINY = (2, 3, 3)  # stem and two strided stages


def _shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Output shape of every block, recorded by forward hooks."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        module.register_forward_hook(
            lambda m, args, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
        for name, module in model.named_children()
        if not isinstance(module, nn.ModuleList)
    ]
    for prefix in ("down", "up"):
        for index, block in enumerate(getattr(model, prefix)):
            handles.append(
                block.register_forward_hook(
                    lambda m, args, out, name=f"{prefix}{index}": shapes.__setitem__(
                        name, tuple(out.shape)
                    )
                )
            )
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


@pytest.mark.parametrize("side", list(range(1, 41)))
def test_square_sizes_come_back_exactly(side):
    torch.manual_seed(side)
    model = EncoderDecoder(EncoderDecoderConfig((side, side), TINY)).eval()
    x = torch.rand(2, 1, side, side)
    shapes = _shapes(model, x)
    assert model(x).shape == x.shape
    # Each decoder stage returns to the size its mirror encoder stage started from.
    assert shapes["stem"][-2:] == shapes["up1"][-2:] == (side, side)
    assert shapes["down0"][-2:] == shapes["up0"][-2:]
    # A 3x3 convolution of stride 2 and padding 1 halves a side, rounding up (F.conv2d's rule).
    half = (side + 1) // 2
    assert shapes["down0"][-2:] == (half, half)
    assert shapes["down1"][-2:] == ((half + 1) // 2,) * 2


@pytest.mark.parametrize(
    ("size", "channels", "deformable"),
    [
        ((7, 12), TINY, 0),
        ((33, 8), (2, 3, 3, 4), 0),
        ((16, 17), (2, 3), 0),
        ((9, 10), TINY, 2),
        ((15, 15), (2, 3, 3, 4), 1),
        ((1, 5), TINY, 2),
    ],
)
def test_rectangular_and_deformable_sizes(size, channels, deformable):
    torch.manual_seed(0)
    config = EncoderDecoderConfig(size, channels, deformable=deformable, modulated=True)
    model = EncoderDecoder(config).eval()
    x = torch.rand(3, 1, *size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == x.shape and float(out.min()) > 0 and float(out.max()) < 1
    kinds = [type(block[0]).__name__ for block in model.down]
    stages = len(channels) - 1
    assert kinds == ["Conv2d"] * (stages - deformable) + ["DeformableConv2d"] * deformable
    assert all(type(block[0]) is nn.ConvTranspose2d for block in model.up)


def test_gradients_through_an_odd_sized_deformable_network():
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig((5, 7), TINY, deformable=2)).double().eval()
    for block in model.down:
        nn.init.normal_(block[0].conv_offset.weight, std=0.3)
    x = torch.rand(1, 1, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,), eps=1e-6, atol=1e-5)


def test_deformable_encoder_starts_as_the_regular_network():
    torch.manual_seed(0)
    regular = EncoderDecoder(EncoderDecoderConfig((11, 11), TINY)).eval()
    x = torch.rand(2, 1, 11, 11)
    twin = deformable_encoder(regular, 1, modulated=True).eval()
    assert [type(b[0]).__name__ for b in twin.down] == ["Conv2d", "DeformableConv2d"]
    assert twin.config.deformable == 1 and twin.config.modulated
    torch.testing.assert_close(twin(x), regular(x), atol=1e-6, rtol=1e-6)
    assert isinstance(regular.down[1][0], nn.Conv2d)  # the original is left alone
    with pytest.raises(ValueError, match="must be a regular EncoderDecoder"):
        deformable_encoder(twin)


def test_cost_counts_the_transposed_layers():
    # FlopCounterMode (torch's own counter) is the reference for the plain network's MACs.
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig((29, 29), (4, 8, 8)))
    cost = model_cost(model, (1, 1, 29, 29))
    rows = {row.name: row for row in cost.layers}
    assert rows["up.0.0"].type == rows["up.1.0"].type == "ConvTranspose2d"
    assert rows["up.0.0"].output_shape == (1, 8, 15, 15)
    assert rows["up.1.0"].output_shape == (1, 4, 29, 29)
    assert rows["head"].output_shape == (1, 1, 29, 29)
    assert cost.params == sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.zeros(1, 1, 29, 29))
    assert cost.macs == counter.get_total_flops() // 2
    # A transposed convolution does kernel x in x out MACs per input position.
    assert rows["up.1.0"].macs == 15 * 15 * 9 * 8 * 4
    deformable = model_cost(deformable_encoder(model), (1, 1, 29, 29))
    assert [r.type for r in deformable.layers if r.name.startswith("down.")][::3] == [
        "DeformableConv2d",
        "DeformableConv2d",
    ]
    assert deformable.macs > cost.macs


def test_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = deformable_encoder(EncoderDecoder(EncoderDecoderConfig((13, 13), TINY)))
    nn.init.normal_(model.down[1][0].conv_offset.weight, std=0.1)
    save_encoder_decoder(model.eval(), tmp_path / "m.pt", {"seed": 3})
    loaded = load_encoder_decoder(tmp_path / "m.pt")
    assert loaded.config == model.config and not loaded.training
    assert isinstance(loaded.down[1][0], DeformableConv2d)
    x = torch.rand(2, 1, 13, 13)
    torch.testing.assert_close(loaded(x), model(x))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not an encoder-decoder saved by"):
        load_encoder_decoder(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("no")
    with pytest.raises(ValueError, match=r"torch\.load failed"):
        load_encoder_decoder(tmp_path / "text.pt")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": (0, 4)}, r"image_size must be a tuple of 2 positive ints, got \(0, 4\)"),
        ({"image_size": 8}, "image_size must be a tuple of 2 positive ints, got 8"),
        ({"channels": (4,)}, "channels must hold the stem's width and at least one stage's"),
        ({"channels": (4, 0)}, r"channels must be a tuple of positive ints, got \(4, 0\)"),
        ({"deformable": 3}, r"deformable must be an int in \[0, 2\]"),
        ({"in_channels": 0}, "in_channels must be a positive int, got 0"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EncoderDecoderConfig(**kwargs)


def test_input_of_another_size_is_refused():
    model = EncoderDecoder(EncoderDecoderConfig((9, 9), TINY))
    with pytest.raises(
        ValueError, match=r"input must have shape \(N, 1, 9, 9\) .* got \(1, 1, 9, 8\)"
    ):
        model(torch.zeros(1, 1, 9, 8))
