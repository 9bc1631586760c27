"""An encoder-decoder for images: strided (optionally deformable) convolutions down, transposed
convolutions up, back to the input's exact size.

A 3x3 convolution of stride 2 and padding 1 maps a side of ``n`` pixels to ``ceil(n / 2)``, so
odd and even sides meet on the way down (15 and 16 both become 8). On the way up a transposed
convolution of the same geometry gives ``2m - 1`` pixels, or ``2m`` with ``output_padding=1``;
which one each stage needs depends on the side it must return to. The network computes the side
of every stage when it is built (:func:`~deformconv.tools.conv_cost`) and takes each decoder
stage's ``output_padding`` from :func:`~deformconv.tools.transposed_output_padding`, so the output
has exactly the input's size, odd or even. It is built for one input size, which ``forward``
checks. There are no skip connections: everything the output shows passes through the
bottleneck and the decoder.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deformconv.demo.checkpoint import load_model_file, save_model_file
from deformconv.nn import DeformableConv2d
from deformconv.tools import conv_cost, spec_from_module, transposed_output_padding

__all__ = [
    "EncoderDecoder",
    "EncoderDecoderConfig",
    "deformable_encoder",
    "load_encoder_decoder",
    "save_encoder_decoder",
]

_FORMAT = "deformconv-demo-encoder-decoder/1"
# Every stage's convolution: 3x3, stride 2 (1 for the stem and the head), padding 1.
_KERNEL, _STRIDE, _PADDING = 3, 2, 1


def _positive_ints(value: Any, name: str, length: int | None = None) -> tuple[int, ...]:
    items = tuple(value) if isinstance(value, tuple | list) else ()
    if (
        not items
        or (length is not None and len(items) != length)
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items)
    ):
        count = f"{length} " if length is not None else ""
        raise ValueError(f"{name} must be a tuple of {count}positive ints, got {value!r}")
    return items


@dataclass(frozen=True)
class EncoderDecoderConfig:
    """Architecture of :class:`EncoderDecoder`.

    Args:
        image_size: ``(height, width)`` of the input (and output).
        channels: width of the stem, then of each strided stage: ``len(channels) - 1`` stages
            each halve the resolution (rounding up) and the decoder doubles it back.
        in_channels: channels of the input and the output.
        deformable: how many of the strided encoder convolutions (the last ones) are
            :class:`~deformconv.nn.DeformableConv2d`.
        modulated: deformable convolutions also learn a modulation mask (DCNv2).
    """

    image_size: tuple[int, int] = (32, 32)
    channels: tuple[int, ...] = (16, 32, 64)
    in_channels: int = 1
    deformable: int = 0
    modulated: bool = False

    def __post_init__(self) -> None:
        _positive_ints(self.image_size, "image_size", 2)
        channels = _positive_ints(self.channels, "channels")
        if len(channels) < 2:
            raise ValueError(
                f"channels must hold the stem's width and at least one stage's, got {channels!r}"
            )
        if isinstance(self.in_channels, bool) or not (
            isinstance(self.in_channels, int) and self.in_channels >= 1
        ):
            raise ValueError(f"in_channels must be a positive int, got {self.in_channels!r}")
        stages = len(channels) - 1
        if isinstance(self.deformable, bool) or not 0 <= self.deformable <= stages:
            raise ValueError(
                f"deformable must be an int in [0, {stages}] (the strided stages), "
                f"got {self.deformable!r}"
            )


def _block(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU())


class EncoderDecoder(nn.Module):
    """Strided convolutions down, ``ConvTranspose2d`` up, a sigmoid output of the input's size.

    Layers: ``stem`` (3x3 convolution at full resolution), ``down[i]`` (3x3, stride 2),
    ``up[i]`` (3x3 transposed convolution, stride 2, ``output_padding`` chosen per stage), and
    ``head`` (3x3 convolution to ``in_channels``, then a sigmoid); batch norm and ReLU follow
    every convolution but the head's.

    Shape:
        - input: ``(B, in_channels, H, W)`` with ``(H, W) = config.image_size``
        - output: ``(B, in_channels, H, W)`` in ``(0, 1)``

    Attributes:
        sizes: ``(height, width)`` at the stem and after each strided stage, full size first.

    Example:
        >>> net = EncoderDecoder(EncoderDecoderConfig(image_size=(15, 16), channels=(4, 8, 8)))
        >>> net.sizes
        [(15, 16), (8, 8), (4, 4)]
        >>> [up[0].output_padding for up in net.up]
        [(1, 1), (0, 1)]
        >>> net(torch.rand(2, 1, 15, 16)).shape
        torch.Size([2, 1, 15, 16])
    """

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.channels
        stages = len(widths) - 1
        self.stem = _block(
            nn.Conv2d(config.in_channels, widths[0], _KERNEL, padding=_PADDING), widths[0]
        )
        self.sizes = [tuple(config.image_size)]
        down = []
        for index in range(stages):
            cin, cout = widths[index], widths[index + 1]
            conv: nn.Module
            if index >= stages - config.deformable:
                conv = DeformableConv2d(
                    cin, cout, _KERNEL, _STRIDE, _PADDING, modulated=config.modulated
                )
            else:
                conv = nn.Conv2d(cin, cout, _KERNEL, _STRIDE, _PADDING)
            self.sizes.append(conv_cost(spec_from_module(conv), self.sizes[-1]).output_shape[1:])
            down.append(_block(conv, cout))
        self.down = nn.ModuleList(down)
        up = []
        for index in reversed(range(stages)):
            cin, cout = widths[index + 1], widths[index]
            output_padding = transposed_output_padding(
                self.sizes[index + 1], self.sizes[index], _KERNEL, _STRIDE, _PADDING
            )
            transposed = nn.ConvTranspose2d(
                cin, cout, _KERNEL, _STRIDE, _PADDING, output_padding=output_padding
            )
            up.append(_block(transposed, cout))
        self.up = nn.ModuleList(up)
        self.head = nn.Conv2d(widths[0], config.in_channels, _KERNEL, padding=_PADDING)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.config.in_channels, *self.config.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"input must have shape (N, {expected[0]}, {expected[1]}, {expected[2]}) (the "
                f"image_size the network was built for), got {tuple(x.shape)}"
            )
        x = self.stem(x)
        for block in self.down:
            x = block(x)
        for block in self.up:
            x = block(x)
        return torch.sigmoid(self.head(x))


def deformable_encoder(
    model: EncoderDecoder, deformable: int | None = None, modulated: bool = False
) -> EncoderDecoder:
    """A copy of a regular ``model`` whose last ``deformable`` strided convolutions (default:
    all) are :class:`~deformconv.nn.DeformableConv2d` with zero offsets: it computes exactly
    what ``model`` computes until its offset branches train.

    Example:
        >>> regular = EncoderDecoder(EncoderDecoderConfig((9, 9), (4, 4, 4))).eval()
        >>> twin = deformable_encoder(regular).eval()
        >>> x = torch.rand(1, 1, 9, 9)
        >>> [type(b[0]).__name__ for b in twin.down], torch.allclose(regular(x), twin(x))
        (['DeformableConv2d', 'DeformableConv2d'], True)
    """
    stages = len(model.down)
    count = stages if deformable is None else deformable
    if model.config.deformable:
        raise ValueError(
            f"model must be a regular EncoderDecoder (deformable=0), got deformable="
            f"{model.config.deformable}"
        )
    config = EncoderDecoderConfig(
        **{**asdict(model.config), "deformable": count, "modulated": modulated}
    )
    twin = copy.deepcopy(model)
    twin.config = config
    for index in range(stages - count, stages):
        conv = twin.down[index][0]
        assert isinstance(conv, nn.Conv2d)
        twin.down[index][0] = DeformableConv2d.from_conv2d(conv, modulated=modulated)
    return twin


def save_encoder_decoder(
    model: EncoderDecoder, path: str | Path, extra: Mapping[str, Any] | None = None
) -> None:
    """Save ``model``'s configuration and weights for :func:`load_encoder_decoder`."""
    save_model_file(path, _FORMAT, asdict(model.config), model.state_dict(), extra)


def load_encoder_decoder(path: str | Path) -> EncoderDecoder:
    """Rebuild an :class:`EncoderDecoder` saved by :func:`save_encoder_decoder`, in eval mode.

    Raises:
        ValueError: ``path`` is not such a file.
    """
    what = "an encoder-decoder saved by `deformconv demo --task restore`"
    payload = load_model_file(path, _FORMAT, what)
    config = dict(payload["config"])
    config["image_size"] = tuple(config["image_size"])
    config["channels"] = tuple(config["channels"])
    model = EncoderDecoder(EncoderDecoderConfig(**config))
    model.load_state_dict(payload["state_dict"])
    return model.eval()
