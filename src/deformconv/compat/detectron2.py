"""detectron2's deformable convolution layers, exactly: ``detectron2.layers.DeformConv`` and
``ModulatedDeformConv`` (``detectron2/layers/deform_conv.py``), with detectron2's arguments
(``deformable_groups``, ``norm``, ``activation``, the bias defaults), initialisation,
``state_dict`` keys and forward signatures, on deformconv's operator.

detectron2's own layers raise "Deformable Conv is not supported on CPUs!" in every CPU backward
and in the modulated forward, and refuse ``deformable_groups != 1`` in the CPU forward; these run
forward and backward on every device, with any group counts, under autocast and
``torch.compile``. Swap ``from detectron2.layers import DeformConv, ModulatedDeformConv`` for
``from deformconv.compat.detectron2 import DeformConv, ModulatedDeformConv``; checkpoints load
unchanged (``weight``, ``bias``, and ``norm.*`` when a norm module is given).

As in detectron2, an empty input (``x.numel() == 0``) returns an empty tensor of the output's
shape, without running ``norm`` or ``activation``, whose gradient flows back to ``x``.

The offset gradient follows detectron2's CUDA kernel (mmdetection's): a tap that samples
exactly on row or column -1 gets none, where torchvision's kernel, which detectron2's CPU forward
calls, would give it the gradient towards the image.

What differs from detectron2, on purpose: ``stride``, ``padding`` and ``dilation`` are stored as
pairs in both layers (detectron2's ``ModulatedDeformConv`` keeps the ints it was given), and bad
arguments raise a ``ValueError`` naming the argument where detectron2 asserts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn

from deformconv._validation import check_divisor
from deformconv.compat._common import check_group_counts, without_edge_gradient
from deformconv.nn.deform_conv import DeformConv2d as _DeformConv2d
from deformconv.ops import output_size
from deformconv.ops.deform_conv import deform_conv2d

__all__ = ["DeformConv", "ModulatedDeformConv"]

IntPair = int | tuple[int, int]


class _Detectron2Layer(_DeformConv2d):
    """What detectron2's two layers share: the init, the forward with its norm and activation,
    empty inputs."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair,
        padding: IntPair,
        dilation: IntPair,
        groups: int,
        deformable_groups: int,
        bias: bool,
        norm: nn.Module | None,
        activation: Callable[[Tensor], Tensor] | None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        self.deformable_groups = check_divisor(
            deformable_groups, "deformable_groups", in_channels, "in_channels"
        )
        self.norm = norm
        self.activation = activation

    @property
    def offset_groups(self) -> int:
        """``deformable_groups`` under deformconv's name."""
        return self.deformable_groups

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _empty_output(self, x: Tensor) -> Tensor:
        """detectron2's answer to an empty input: an empty tensor of the output's shape."""
        height, width = output_size(
            x.shape[-2], x.shape[-1], self.kernel_size, self.stride, self.padding, self.dilation
        )
        shape = (x.shape[0], self.out_channels, height, width)
        if min(shape) < 0 or math.prod(shape) != 0:
            raise ValueError(
                f"input of shape {tuple(x.shape)} is empty but its output would have shape "
                f"{shape}; give at least one row and column, or an empty batch"
            )
        # A reshape of the empty input, so that backward reaches x as detectron2's does.
        return x.reshape(shape)

    def _forward(self, x: Tensor, offset: Tensor, mask: Tensor | None) -> Tensor:
        """Both layers' forward: ``mask`` is ``None`` for ``DeformConv``, as its ``bias`` is."""
        self._check_input(x)
        if x.numel() == 0:
            return self._empty_output(x)
        check_group_counts(
            x, offset, mask, self.weight, self.groups, self.deformable_groups, "deformable_groups"
        )
        offset = without_edge_gradient(
            offset, self.weight, self.stride, self.padding, self.dilation
        )
        out = deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )
        if self.norm is not None:
            out = self.norm(out)
        if self.activation is not None:
            out = self.activation(out)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, "
            f"deformable_groups={self.deformable_groups}, bias={self.bias is not None}"
        )


class DeformConv(_Detectron2Layer):
    """detectron2's ``DeformConv``: deformable convolution v1 whose offsets come from the caller,
    without bias, followed by the optional ``norm`` and ``activation``.

    Args:
        in_channels: as ``nn.Conv2d``.
        out_channels: as ``nn.Conv2d``.
        kernel_size: as ``nn.Conv2d``.
        stride: as ``nn.Conv2d`` (default 1).
        padding: as ``nn.Conv2d`` (default 0).
        dilation: as ``nn.Conv2d`` (default 1).
        groups: as ``nn.Conv2d`` (default 1).
        deformable_groups: offset groups; must divide ``in_channels``.
        bias: must be false, as in detectron2.
        norm: a normalization module applied to the output (its keys are ``norm.*``).
        activation: a callable applied last.

    Shape:
        - x: ``(B, in_channels, H, W)``
        - offset: ``(B, 2 * deformable_groups * kh * kw, H_out, W_out)``
        - output: ``(B, out_channels, H_out, W_out)``

    Example:
        >>> import torch
        >>> layer = DeformConv(4, 6, 3, padding=1, norm=torch.nn.BatchNorm2d(6))
        >>> sorted(layer.state_dict())[:2]
        ['norm.bias', 'norm.num_batches_tracked']
        >>> layer(torch.rand(2, 4, 8, 8), torch.zeros(2, 18, 8, 8)).shape
        torch.Size([2, 6, 8, 8])
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
        deformable_groups: int = 1,
        bias: bool = False,
        norm: nn.Module | None = None,
        activation: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if bias:
            raise ValueError(
                f"bias={bias!r} is not supported in DeformConv (detectron2's has none)"
            )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            deformable_groups,
            False,
            norm,
            activation,
        )

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:  # type: ignore[override]
        return self._forward(x, offset, None)


class ModulatedDeformConv(_Detectron2Layer):
    """detectron2's ``ModulatedDeformConv``: DCNv2 whose offsets and mask come from the caller,
    with a bias by default (starting at zero), followed by the optional ``norm`` and
    ``activation``.

    Args:
        in_channels: as ``nn.Conv2d``.
        out_channels: as ``nn.Conv2d``.
        kernel_size: as ``nn.Conv2d``.
        stride: as ``nn.Conv2d`` (default 1).
        padding: as ``nn.Conv2d`` (default 0).
        dilation: as ``nn.Conv2d`` (default 1).
        groups: as ``nn.Conv2d`` (default 1).
        deformable_groups: offset groups; must divide ``in_channels``.
        bias: learn a bias (default ``True``); ``with_bias`` records it, as in detectron2.
        norm: a normalization module applied to the output (its keys are ``norm.*``).
        activation: a callable applied last.

    Shape:
        - x: ``(B, in_channels, H, W)``
        - offset: ``(B, 2 * deformable_groups * kh * kw, H_out, W_out)``
        - mask: ``(B, deformable_groups * kh * kw, H_out, W_out)``
        - output: ``(B, out_channels, H_out, W_out)``

    Example:
        >>> import torch
        >>> layer = ModulatedDeformConv(4, 6, 3, padding=1, activation=torch.relu)
        >>> x, offset, mask = torch.rand(2, 4, 8, 8), torch.zeros(2, 18, 8, 8), torch.ones(2, 9, 8, 8)
        >>> layer(x, offset, mask).shape
        torch.Size([2, 6, 8, 8])
        >>> layer(torch.rand(0, 4, 8, 8), offset[:0], mask[:0]).shape
        torch.Size([0, 6, 8, 8])
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
        deformable_groups: int = 1,
        bias: bool = True,
        norm: nn.Module | None = None,
        activation: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            deformable_groups,
            bool(bias),
            norm,
            activation,
        )
        self.with_bias = bool(bias)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        return self._forward(x, offset, mask)
