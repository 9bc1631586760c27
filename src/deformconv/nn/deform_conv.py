"""Deformable convolution layers (Dai et al. 2017, "Deformable Convolutional Networks";
Zhu et al. 2019, "Deformable ConvNets v2").

- :class:`DeformConv2d` takes offsets (and a mask) from the caller, exactly like
  ``torchvision.ops.DeformConv2d``, whose state_dict it loads unchanged.
- :class:`DeformableConv2d` predicts its own offsets (and, for v2, its modulation mask) from its
  input with a regular convolution branch ``conv_offset``. The branch starts at zero, so a new layer
  equals a plain convolution: offsets 0 and, for v2, a mask of exactly 1 (``2 * sigmoid(0)``).

mmcv's and detectron2's layers, with their own names, defaults and numbers, are in
:mod:`deformconv.compat`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from deformconv._validation import check_divisor, check_int, to_pair
from deformconv.nn.depthwise import _geometry_repr
from deformconv.ops.deform_conv import deform_conv2d

__all__ = ["DeformConv2d", "DeformableConv2d"]

IntPair = int | tuple[int, int]


class DeformConv2d(nn.Module):
    """Deformable convolution whose offsets (and optional mask) are passed to ``forward``.

    Same arguments, parameters, initialisation and ``state_dict`` keys as
    ``torchvision.ops.DeformConv2d``.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: kernel height and width.
        stride: as in ``nn.Conv2d``.
        padding: as in ``nn.Conv2d``.
        dilation: as in ``nn.Conv2d``.
        groups: weight groups; must divide both channel counts.
        bias: learn an additive bias.

    Shape:
        - input: ``(B, in_channels, H, W)``
        - offset: ``(B, 2 * offset_groups * kh * kw, Ho, Wo)``
        - mask (optional): ``(B, offset_groups * kh * kw, Ho, Wo)``
        - output: ``(B, out_channels, Ho, Wo)``

    Example:
        >>> layer = DeformConv2d(4, 8, kernel_size=3, padding=1)
        >>> x = torch.rand(2, 4, 16, 16)
        >>> offset = torch.zeros(2, 18, 16, 16)
        >>> layer(x, offset).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_int(in_channels, "in_channels")
        check_int(out_channels, "out_channels")
        check_divisor(groups, "groups", in_channels, "in_channels")
        check_divisor(groups, "groups", out_channels, "out_channels")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = to_pair(kernel_size, "kernel_size", 1)
        self.stride = to_pair(stride, "stride", 1)
        self.padding = to_pair(padding, "padding", 0)
        self.dilation = to_pair(dilation, "dilation", 1)
        self.groups = groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation of ``nn.Conv2d`` (and of torchvision's layer)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _check_input(self, input: Tensor) -> None:
        """Refuse an input the layer was not built for, before any of its branches sees it."""
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise ValueError(
                f"input must have shape (batch, in_channels={self.in_channels}, height, width), "
                f"got {tuple(input.shape)}"
            )

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        self._check_input(input)
        return deform_conv2d(
            input,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"]
        parts += _geometry_repr(self.stride, self.padding, self.dilation)
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.bias is None:
            parts.append("bias=False")
        return ", ".join(parts)


class DeformableConv2d(DeformConv2d):
    """Deformable convolution that predicts its own offsets (v1) and mask (v2) from its input.

    A regular convolution branch ``conv_offset`` with the layer's kernel, stride, padding and
    dilation maps the input to ``2 * offset_groups * kh * kw`` offset channels, followed (when
    ``modulated``) by ``offset_groups * kh * kw`` mask logits; the mask is ``2 * sigmoid(logit)``,
    in (0, 2). The branch is zero-initialised, so a new layer computes exactly the plain
    convolution with its weights. With ``max_offset`` set, offsets are bounded smoothly:
    ``max_offset * tanh(raw / max_offset)``.

    How it differs from mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack`` (which
    :mod:`deformconv.compat.mmcv` provides exactly): the mask is ``2 * sigmoid`` rather than
    ``sigmoid``, so a new layer starts as the plain convolution instead of half of it; the main
    weight and bias start as ``nn.Conv2d``'s, and the bias is on by default in v1 too; offsets may
    be bounded (``max_offset``); :meth:`from_conv2d` turns a trained ``nn.Conv2d`` into one. The
    branch name ``conv_offset`` and its channel layout (offsets, then mask logits) are mmcv's, and
    :meth:`load_mmcv_state_dict` loads an mmcv checkpoint with identical outputs.

    Args:
        in_channels: as :class:`DeformConv2d`.
        out_channels: as :class:`DeformConv2d`.
        kernel_size: as :class:`DeformConv2d`.
        stride: as :class:`DeformConv2d`.
        padding: as :class:`DeformConv2d`.
        dilation: as :class:`DeformConv2d`.
        groups: as :class:`DeformConv2d`.
        bias: as :class:`DeformConv2d`.
        offset_groups: groups of input channels that share one offset field; must divide
            ``in_channels``.
        modulated: predict a modulation mask (DCNv2) as well as offsets (DCNv1).
        max_offset: optional positive bound on each offset component, in pixels.

    Shape:
        - input: ``(B, in_channels, H, W)``
        - output: ``(B, out_channels, Ho, Wo)``

    Example:
        >>> layer = DeformableConv2d(3, 8, kernel_size=3, padding=1)
        >>> x = torch.rand(2, 3, 16, 16)
        >>> layer(x).shape
        torch.Size([2, 8, 16, 16])
        >>> plain = torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
        >>> torch.allclose(layer(x), plain, atol=1e-5)
        True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        bias: bool = True,
        offset_groups: int = 1,
        modulated: bool = True,
        max_offset: float | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        check_divisor(offset_groups, "offset_groups", in_channels, "in_channels")
        if max_offset is not None and not (
            isinstance(max_offset, int | float) and math.isfinite(max_offset) and max_offset > 0
        ):
            raise ValueError(
                f"max_offset must be a positive finite number or None, got {max_offset!r}"
            )
        self.offset_groups = offset_groups
        self.modulated = bool(modulated)
        self.max_offset = None if max_offset is None else float(max_offset)
        taps = self.kernel_size[0] * self.kernel_size[1]
        branch_channels = (3 if self.modulated else 2) * offset_groups * taps
        self.conv_offset = nn.Conv2d(
            in_channels,
            branch_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.reset_offset_branch()

    def reset_offset_branch(self) -> None:
        """Zero the offset branch: offsets 0 and mask 1, so the layer is a plain convolution."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offsets_and_mask(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        """The offsets ``(B, 2*G*kh*kw, Ho, Wo)`` and mask ``(B, G*kh*kw, Ho, Wo)`` (or ``None``)
        that the layer predicts for ``input``."""
        out = self.conv_offset(input)
        n_offset = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        offset = out[:, :n_offset]
        if self.max_offset is not None:
            offset = self.max_offset * torch.tanh(offset / self.max_offset)
        mask = 2 * torch.sigmoid(out[:, n_offset:]) if self.modulated else None
        return offset, mask

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        self._check_input(input)
        offset, mask = self.offsets_and_mask(input)
        return super().forward(input, offset, mask)

    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        offset_groups: int = 1,
        modulated: bool = True,
        max_offset: float | None = None,
    ) -> DeformableConv2d:
        """A deformable layer that starts as a copy of ``conv`` (zero padding mode only).

        Example:
            >>> conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            >>> layer = DeformableConv2d.from_conv2d(conv)
            >>> x = torch.rand(1, 3, 8, 8)
            >>> torch.allclose(layer(x), conv(x), atol=1e-5)
            True
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                "conv must use numeric zero padding (padding_mode='zeros', padding not a string), "
                f"got padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            offset_groups=offset_groups,
            modulated=modulated,
            max_offset=max_offset,
        )
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                assert layer.bias is not None
                layer.bias.copy_(conv.bias)
        return layer

    def load_mmcv_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load a state_dict of mmcv's ``DeformConv2dPack`` or ``ModulatedDeformConv2dPack`` into
        this layer's design.

        mmcv's modulated layer uses ``sigmoid`` as its mask (starting at 0.5) where this layer
        uses ``2 * sigmoid``; the main weight is halved on loading so the outputs are identical.
        The legacy key prefix ``conv_offset_mask.`` is mapped to ``conv_offset.``. To keep mmcv's
        layer itself (its numbers, names and ordinary ``load_state_dict``), use
        :mod:`deformconv.compat.mmcv` instead.

        Returns:
            (NamedTuple): ``(missing_keys, unexpected_keys)``, as ``load_state_dict`` returns.
        """
        mapped: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            if key.startswith("conv_offset_mask."):
                key = "conv_offset." + key[len("conv_offset_mask.") :]
            if key == "weight" and self.modulated:
                value = value / 2
            mapped[key] = value
        return self.load_state_dict(mapped, strict=strict)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.offset_groups != 1:
            s += f", offset_groups={self.offset_groups}"
        if not self.modulated:
            s += ", modulated=False"
        if self.max_offset is not None:
            s += f", max_offset={self.max_offset}"
        return s
