"""Depthwise separable convolutions: a depthwise step, then a 1 x 1 (pointwise) step.

The depthwise step filters every input channel on its own; the pointwise step mixes channels.
Xception (Chollet, 2017, arXiv:1610.02357) and MobileNets (Howard et al., 2017,
arXiv:1704.04861) replace full convolutions with this pair: a 3 x 3 layer from 16 to 32 channels
has 16 * 32 * 9 = 4,608 weights, its separable version 16 * 9 + 16 * 32 = 656.

- :class:`SeparableConv2d` has the arguments and semantics of Keras ``SeparableConv2D`` (padding
  ``"valid"`` or ``"same"`` with TensorFlow's rule at any stride, dilation, depth multiplier, bias
  after the pointwise step) and loads Keras-layout weights.
- :class:`DeformableSeparableConv2d` makes the depthwise step deformable (a depthwise
  :class:`~deformconv.nn.deform_conv.DeformableConv2d` that predicts its own offsets), then
  applies the same pointwise step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from deformconv._validation import check_int, to_pair
from deformconv.nn.deform_conv import DeformableConv2d
from deformconv.nn.depthwise import DepthwiseConv2d, PaddingArg

__all__ = ["DeformableSeparableConv2d", "SeparableConv2d"]

ArrayLike = Tensor | np.ndarray | Sequence


def _check_channels(in_channels: int, out_channels: int, depth_multiplier: int) -> None:
    check_int(in_channels, "in_channels")
    check_int(out_channels, "out_channels")
    check_int(depth_multiplier, "depth_multiplier")


class _DepthwisePointwise(nn.Module):
    """What both separable layers share: a ``depthwise`` step, then a ``pointwise`` one."""

    @property
    def in_channels(self) -> int:
        return self.depthwise.in_channels  # type: ignore[return-value]

    @property
    def out_channels(self) -> int:
        return self.pointwise.out_channels  # type: ignore[return-value]

    def forward(self, input: Tensor) -> Tensor:
        """Convolve ``Tensor[B, C, H, W]`` into ``Tensor[B, out_channels, H_out, W_out]``."""
        return self.pointwise(self.depthwise(input))


class SeparableConv2d(_DepthwisePointwise):
    """Depthwise separable 2-D convolution with the semantics of Keras ``SeparableConv2D``.

    ``depthwise`` (a :class:`~deformconv.nn.depthwise.DepthwiseConv2d` without bias) turns ``C``
    channels into ``C * depth_multiplier``; ``pointwise`` (a 1 x 1 ``nn.Conv2d``) mixes them into
    ``out_channels`` and adds the bias.

    Args:
        in_channels: channels ``C`` of the input.
        out_channels: channels of the output (Keras ``filters``).
        kernel_size: depthwise kernel ``(kh, kw)`` or one int.
        stride: depthwise stride ``(sh, sw)`` or one int (Keras ``strides``).
        padding: ``"valid"`` (Keras' default), ``"same"`` (TensorFlow's rule: ``ceil(H / sh)``
            rows out, an odd total padding puts the extra row or column at the bottom or right),
            or explicit zeros ``(ph, pw)`` / one int.
        dilation: depthwise dilation ``(dh, dw)`` or one int (Keras ``dilation_rate``).
        depth_multiplier: depthwise filters per input channel.
        bias: add a bias after the pointwise step (Keras ``use_bias``).
        padding_mode: what the depthwise step's padding holds: ``"zeros"`` (Keras),
            ``"reflect"``, ``"replicate"`` or ``"circular"`` (as in ``torch.nn.Conv2d``).

    Shape:
        - input: ``(B, C, H, W)``
        - output: ``(B, out_channels, H_out, W_out)``, with ``H_out`` as for the depthwise step.

    Example:
        >>> layer = SeparableConv2d(3, 256, kernel_size=5)
        >>> layer(torch.rand(1, 3, 12, 12)).shape
        torch.Size([1, 256, 8, 8])
        >>> sum(p.numel() for p in SeparableConv2d(16, 32, 3, bias=False).parameters())
        656
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg = "valid",
        dilation: int | tuple[int, int] = 1,
        depth_multiplier: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_channels(in_channels, out_channels, depth_multiplier)
        self.depthwise = DepthwiseConv2d(
            in_channels,
            kernel_size,
            depth_multiplier=depth_multiplier,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=False,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.pointwise = nn.Conv2d(
            in_channels * depth_multiplier, out_channels, 1, bias=bias, device=device, dtype=dtype
        )

    @property
    def depth_multiplier(self) -> int:
        return self.depthwise.depth_multiplier

    @property
    def padding_mode(self) -> str:
        return self.depthwise.padding_mode

    @torch.no_grad()
    def load_keras_weights(
        self,
        depthwise_kernel: ArrayLike,
        pointwise_kernel: ArrayLike,
        bias: ArrayLike | None = None,
    ) -> None:
        """Copy weights in Keras' layout (the order of ``SeparableConv2D.get_weights()``).

        Args:
            depthwise_kernel: ``[kh, kw, C, depth_multiplier]``.
            pointwise_kernel: ``[1, 1, C * depth_multiplier, out_channels]``.
            bias: ``[out_channels]``; required exactly when the layer has a bias.

        Example:
            >>> layer = SeparableConv2d(2, 3, kernel_size=3, depth_multiplier=2)
            >>> layer.load_keras_weights(np.ones((3, 3, 2, 2)), np.ones((1, 1, 4, 3)), np.zeros(3))
            >>> layer(torch.ones(1, 2, 3, 3)).flatten().tolist()
            [36.0, 36.0, 36.0]
        """
        c, m = self.in_channels, self.depth_multiplier
        kh, kw = self.depthwise.kernel_size
        dw = self._as_tensor(depthwise_kernel, "depthwise_kernel", (kh, kw, c, m))
        pw = self._as_tensor(pointwise_kernel, "pointwise_kernel", (1, 1, c * m, self.out_channels))
        has_bias = self.pointwise.bias is not None
        if (bias is not None) != has_bias:
            raise ValueError(
                f"bias must be {'given' if has_bias else 'None'}: the layer was built with "
                f"bias={has_bias}, got bias={'None' if bias is None else 'an array'}"
            )
        # Keras' depthwise output channel c * m + j is filter j of channel c: the order of
        # a grouped convolution's weight rows, so a permute and a reshape suffice.
        self.depthwise.weight.copy_(dw.permute(2, 3, 0, 1).reshape(c * m, 1, kh, kw))
        self.pointwise.weight.copy_(pw.permute(3, 2, 0, 1))
        if bias is not None:
            assert self.pointwise.bias is not None
            self.pointwise.bias.copy_(self._as_tensor(bias, "bias", (self.out_channels,)))

    def _as_tensor(self, value: ArrayLike, name: str, shape: tuple[int, ...]) -> Tensor:
        weight = self.pointwise.weight
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} must have Keras shape {list(shape)}, got {list(tensor.shape)}"
            )
        return tensor.to(device=weight.device, dtype=weight.dtype)

    @classmethod
    def from_keras(
        cls,
        depthwise_kernel: ArrayLike,
        pointwise_kernel: ArrayLike,
        bias: ArrayLike | None = None,
        *,
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg = "valid",
        dilation: int | tuple[int, int] = 1,
        dtype: torch.dtype | None = None,
    ) -> SeparableConv2d:
        """A layer sized by Keras-layout weights and holding them.

        Channels, kernel size and depth multiplier come from the weight shapes; the rest must be
        passed as in the Keras layer's config.

        Args:
            depthwise_kernel: ``[kh, kw, C, depth_multiplier]``.
            pointwise_kernel: ``[1, 1, C * depth_multiplier, out_channels]``.
            bias: ``[out_channels]`` or ``None`` for a layer without bias.
            stride: as in the constructor.
            padding: as in the constructor.
            dilation: as in the constructor.
            dtype: dtype of the layer's parameters (default: torch's default dtype).

        Example:
            >>> layer = SeparableConv2d.from_keras(np.ones((5, 5, 3, 1)), np.ones((1, 1, 3, 8)))
            >>> layer
            SeparableConv2d(
              (depthwise): DepthwiseConv2d(3, kernel_size=(5, 5), bias=False)
              (pointwise): Conv2d(3, 8, kernel_size=(1, 1), stride=(1, 1), bias=False)
            )
        """
        dw_shape, pw_shape = np.shape(depthwise_kernel), np.shape(pointwise_kernel)
        if len(dw_shape) != 4:
            raise ValueError(
                f"depthwise_kernel must have Keras shape [kh, kw, C, depth_multiplier], "
                f"got {list(dw_shape)}"
            )
        if len(pw_shape) != 4:
            raise ValueError(
                f"pointwise_kernel must have Keras shape [1, 1, C * depth_multiplier, filters], "
                f"got {list(pw_shape)}"
            )
        kh, kw, c, m = (int(v) for v in dw_shape)
        layer = cls(
            c,
            int(pw_shape[3]),
            (kh, kw),
            stride=stride,
            padding=padding,
            dilation=dilation,
            depth_multiplier=m,
            bias=bias is not None,
            dtype=dtype,
        )
        layer.load_keras_weights(depthwise_kernel, pointwise_kernel, bias)
        return layer


class DeformableSeparableConv2d(_DepthwisePointwise):
    """Deformable depthwise convolution followed by a pointwise (1 x 1) convolution.

    ``depthwise`` is a :class:`~deformconv.nn.deform_conv.DeformableConv2d` with
    ``groups=in_channels`` and no bias, so every input channel is sampled at learned offsets
    (shared by the channels of an offset group) and filtered on its own; ``pointwise`` mixes the
    ``in_channels * depth_multiplier`` maps into ``out_channels``. The offset branch starts at
    zero, so a new layer equals a :class:`SeparableConv2d` with the same weights.

    Args:
        in_channels: channels ``C`` of the input.
        out_channels: channels of the output.
        kernel_size: depthwise kernel ``(kh, kw)`` or one int.
        stride: of the depthwise step.
        padding: of the depthwise step (explicit zeros).
        dilation: of the depthwise step.
        depth_multiplier: depthwise filters per input channel.
        bias: add a bias after the pointwise step.
        offset_groups: groups of input channels sharing one offset field; must divide ``C``.
        modulated: predict a modulation mask too (DCNv2) rather than offsets only (DCNv1).
        max_offset: optional bound on each offset component, in pixels.

    Shape:
        - input: ``(B, C, H, W)``
        - output: ``(B, out_channels, H_out, W_out)``, with
          ``H_out = floor((H + 2 * ph - dh * (kh - 1) - 1) / sh) + 1``.

    Example:
        >>> layer = DeformableSeparableConv2d(4, 8, kernel_size=3, padding=1)
        >>> x = torch.rand(2, 4, 10, 10)
        >>> layer(x).shape
        torch.Size([2, 8, 10, 10])
        >>> plain = SeparableConv2d(4, 8, 3, padding=1)
        >>> plain.load_state_dict(layer.state_dict(), strict=False).unexpected_keys
        ['depthwise.conv_offset.weight', 'depthwise.conv_offset.bias']
        >>> torch.allclose(layer(x), plain(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        depth_multiplier: int = 1,
        bias: bool = True,
        offset_groups: int = 1,
        modulated: bool = True,
        max_offset: float | None = None,
    ) -> None:
        super().__init__()
        _check_channels(in_channels, out_channels, depth_multiplier)
        if isinstance(padding, str):
            raise TypeError(
                f"padding must be an int or a pair of ints (explicit zeros), got {padding!r}"
            )
        self.depthwise = DeformableConv2d(
            in_channels,
            in_channels * depth_multiplier,
            to_pair(kernel_size, "kernel_size", 1),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=in_channels,
            bias=False,
            offset_groups=offset_groups,
            modulated=modulated,
            max_offset=max_offset,
        )
        self.pointwise = nn.Conv2d(in_channels * depth_multiplier, out_channels, 1, bias=bias)
        self.depth_multiplier = depth_multiplier
