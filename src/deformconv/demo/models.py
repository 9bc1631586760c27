"""The demo's digit classifier, as a regular CNN and as its deformable twin.

Four 3x3 convolution blocks (convolution, batch norm, ReLU; 2x2 max pooling after the first two),
global average pooling and a linear classifier. In the deformable twin the last ``deformable``
blocks use :class:`~deformconv.nn.DeformableConv2d`, which predicts its own offsets from its input;
everything else is identical, so the two differ only by where the kernels sample.
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
from deformconv.tools.visualize import SamplingLayer

__all__ = ["DigitCNN", "ModelConfig", "deformable_twin", "load_checkpoint", "save_checkpoint"]

_FORMAT = "deformconv-demo-model/1"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of :class:`DigitCNN`.

    Args:
        channels: output channels of the four convolution blocks.
        deformable: how many of the last blocks are deformable (0 = regular CNN, at most 3: the
            first block always stays regular so the offsets are predicted from features).
        modulated: deformable blocks also predict a modulation mask (DCNv2).
        num_classes: classifier outputs.
        image_size: side of the square input images.
    """

    channels: tuple[int, int, int, int] = (16, 32, 64, 64)
    deformable: int = 0
    modulated: bool = False
    num_classes: int = 10
    image_size: int = 32

    def __post_init__(self) -> None:
        if len(self.channels) != 4 or any(
            not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in self.channels
        ):
            raise ValueError(f"channels must be 4 positive ints, got {self.channels!r}")
        if not 0 <= self.deformable <= 3:
            raise ValueError(f"deformable must be in [0, 3], got {self.deformable!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes!r}")
        if self.image_size < 4 or self.image_size % 4 != 0:
            raise ValueError(
                f"image_size must be a multiple of 4 and >= 4, got {self.image_size!r}"
            )


class DigitCNN(nn.Module):
    """A small CNN for ``(B, 1, S, S)`` digit images, regular or deformable.

    Shape:
        - input: ``(B, 1, S, S)`` with ``S = config.image_size``
        - output: ``(B, num_classes)`` logits

    Example:
        >>> model = DigitCNN(ModelConfig(channels=(4, 4, 4, 4), deformable=2, image_size=16))
        >>> model(torch.rand(3, 1, 16, 16)).shape
        torch.Size([3, 10])
        >>> [type(conv).__name__ for conv in model.convs]
        ['Conv2d', 'Conv2d', 'DeformableConv2d', 'DeformableConv2d']
    """

    # Blocks followed by a 2x2 max pool (the first two), halving the resolution.
    POOLED = (0, 1)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        ins = (1, *config.channels[:-1])
        convs: list[nn.Module] = []
        for index, (cin, cout) in enumerate(zip(ins, config.channels, strict=True)):
            if index >= 4 - config.deformable:
                convs.append(DeformableConv2d(cin, cout, 3, padding=1, modulated=config.modulated))
            else:
                convs.append(nn.Conv2d(cin, cout, 3, padding=1))
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in config.channels)
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Linear(config.channels[-1], config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = torch.relu(norm(conv(x)))
            if index in self.POOLED:
                x = self.pool(x)
        return self.classifier(x.mean(dim=(2, 3)))

    def sampling_stacks(self, images: Tensor) -> list[list[SamplingLayer]]:
        """The geometry and predicted offsets of every convolution, per image, first to last.

        Args:
            images: ``(N, 1, S, S)``.

        Returns:
            For each image, one :class:`~deformconv.tools.visualize.SamplingLayer` per
            convolution block, with the offsets (and mask) of offset group 0 for deformable
            blocks and ``None`` for regular ones, ready for
            :func:`~deformconv.tools.visualize.sampling_points`.

        Example:
            >>> model = DigitCNN(ModelConfig(channels=(4, 4, 4, 4), deformable=1, image_size=16))
            >>> stack = model.sampling_stacks(torch.rand(2, 1, 16, 16))[1]
            >>> [layer.offset is None for layer in stack], tuple(stack[3].offset.shape)
            ([True, True, True, False], (18, 4, 4))
        """
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape (N, 1, S, S), got {tuple(images.shape)}")
        x = images.to(self.classifier.weight)
        per_layer: list[tuple[Tensor | None, Tensor | None]] = []
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for index, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
                offset = mask = None
                if isinstance(conv, DeformableConv2d):
                    taps = conv.kernel_size[0] * conv.kernel_size[1]
                    offset, mask = conv.offsets_and_mask(x)
                    offset = offset[:, : 2 * taps].cpu()
                    mask = None if mask is None else mask[:, :taps].cpu()
                per_layer.append((offset, mask))
                x = torch.relu(norm(conv(x)))
                if index in self.POOLED:
                    x = self.pool(x)
        self.train(was_training)
        stacks: list[list[SamplingLayer]] = []
        for n in range(images.shape[0]):
            stack = []
            for index, (offset, mask) in enumerate(per_layer):
                # A unit of a pooled map sits at the centre of the 2x2 block it summarises.
                pooled_before = index - 1 in self.POOLED
                stack.append(
                    SamplingLayer(
                        kernel_size=(3, 3),
                        padding=(1, 1),
                        offset=None if offset is None else offset[n],
                        mask=None if mask is None else mask[n],
                        input_scale=2.0 if pooled_before else 1.0,
                        input_shift=0.5 if pooled_before else 0.0,
                    )
                )
            stacks.append(stack)
        return stacks


def deformable_twin(model: DigitCNN, deformable: int = 3, modulated: bool = False) -> DigitCNN:
    """A deformable copy of a trained regular ``model`` that computes exactly what it computes.

    The last ``deformable`` convolutions become :class:`~deformconv.nn.DeformableConv2d` layers
    built with ``from_conv2d``: same weights, zero-initialised offset branches, so only training
    the branches changes the output.

    Example:
        >>> regular = DigitCNN(ModelConfig(channels=(4, 4, 4, 4), image_size=16)).eval()
        >>> twin = deformable_twin(regular, deformable=2).eval()
        >>> x = torch.rand(2, 1, 16, 16)
        >>> torch.allclose(regular(x), twin(x), atol=1e-5)
        True
    """
    if not 0 < deformable <= 3:
        raise ValueError(f"deformable must be in [1, 3], got {deformable!r}")
    if model.config.deformable:
        raise ValueError(
            f"model must be a regular DigitCNN (deformable=0), got deformable="
            f"{model.config.deformable}"
        )
    twin = copy.deepcopy(model)
    twin.config = ModelConfig(
        **{**asdict(model.config), "deformable": deformable, "modulated": modulated}
    )
    for index in range(4 - deformable, 4):
        conv = twin.convs[index]
        assert isinstance(conv, nn.Conv2d)
        twin.convs[index] = DeformableConv2d.from_conv2d(conv, modulated=modulated)
    return twin


def save_checkpoint(
    model: DigitCNN, path: str | Path, extra: Mapping[str, Any] | None = None
) -> None:
    """Save ``model``'s configuration and weights so :func:`load_checkpoint` can rebuild it."""
    save_model_file(path, _FORMAT, asdict(model.config), model.state_dict(), extra)


def load_checkpoint(path: str | Path) -> DigitCNN:
    """Rebuild a :class:`DigitCNN` saved by :func:`save_checkpoint`, in eval mode.

    Raises:
        ValueError: ``path`` is not such a checkpoint.
    """
    payload = load_model_file(path, _FORMAT, "a model saved by `deformconv demo`")
    config = dict(payload["config"])
    config["channels"] = tuple(config["channels"])
    model = DigitCNN(ModelConfig(**config))
    model.load_state_dict(payload["state_dict"])
    return model.eval()
