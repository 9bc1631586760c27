"""Depthwise convolution: one spatial filter bank per input channel.

A depthwise convolution convolves every input channel with ``depth_multiplier`` filters of its
own and never mixes channels, so ``in_channels * depth_multiplier`` maps come out. It is the first
half of the depthwise separable convolution of MobileNets (Howard et al., 2017,
arXiv:1704.04861) and Xception (Chollet, 2017, arXiv:1610.02357).

Output channel ``c * depth_multiplier + m`` is filter ``m`` of input channel ``c``: the order
of ``torch.nn.Conv2d(groups=in_channels)`` and of Keras ``DepthwiseConv2D``, so weights move
between them with a reshape.

``padding="same"`` follows TensorFlow's rule for every stride: the output has
``ceil(size / stride)`` positions and, when the total padding is odd, the extra row or column
goes to the bottom or right. PyTorch's own ``"same"`` agrees for stride 1 and refuses larger
strides.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deformconv._validation import check_int, padding_pair, to_pair

__all__ = ["DepthwiseConv2d", "pad_same", "same_padding"]

PaddingArg = int | tuple[int, int] | str


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pad_mode(padding_mode: str) -> str:
    """``F.pad``'s name for a ``torch.nn.Conv2d`` padding mode, after checking it."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    return "constant" if padding_mode == "zeros" else padding_mode


def _geometry_repr(
    stride: tuple[int, int], padding: tuple[int, int] | str, dilation: tuple[int, int]
) -> list[str]:
    """The ``extra_repr`` parts of the stride, padding and dilation that are not the default."""
    parts = []
    if stride != (1, 1):
        parts.append(f"stride={stride}")
    if padding != (0, 0):
        parts.append(f"padding={padding!r}")
    if dilation != (1, 1):
        parts.append(f"dilation={dilation}")
    return parts


def same_padding(
    size: int, kernel_size: int, stride: int = 1, dilation: int = 1
) -> tuple[int, int]:
    """TensorFlow's ``"same"`` padding of one spatial dimension, as ``(before, after)``.

    The output keeps ``ceil(size / stride)`` positions; an odd total puts the extra element after.

    Args:
        size: input length along the dimension.
        kernel_size: kernel length along the dimension.
        stride: stride along the dimension.
        dilation: dilation along the dimension.

    Returns:
        The zeros to add before and after the input.

    Example:
        >>> same_padding(12, 5)
        (2, 2)
        >>> same_padding(12, 4, stride=2)
        (1, 1)
        >>> same_padding(13, 4, stride=2)
        (1, 2)
    """
    for name, value, low in (
        ("size", size, 0),
        ("kernel_size", kernel_size, 1),
        ("stride", stride, 1),
        ("dilation", dilation, 1),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    extent = dilation * (kernel_size - 1) + 1
    total = max((math.ceil(size / stride) - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def pad_same(
    input: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    padding_mode: str = "zeros",
) -> Tensor:
    """Pad the last two dimensions of ``input`` by TensorFlow's ``"same"`` rule.

    Args:
        input: ``Tensor[..., height, width]``.
        kernel_size: kernel ``(kh, kw)`` or one int for both.
        stride: stride ``(sh, sw)`` or one int.
        dilation: dilation ``(dh, dw)`` or one int.
        padding_mode: what the border holds, as in ``torch.nn.Conv2d``: ``"zeros"``,
            ``"reflect"``, ``"replicate"`` or ``"circular"``.

    Returns:
        ``Tensor[..., height + pad_h, width + pad_w]``: after a convolution with these settings and
        no further padding, the output is ``ceil(height / sh) x ceil(width / sw)``.

    Example:
        >>> pad_same(torch.zeros(1, 1, 13, 12), 4, stride=2).shape
        torch.Size([1, 1, 16, 14])
    """
    mode = _pad_mode(padding_mode)
    (kh, kw), (sh, sw) = to_pair(kernel_size, "kernel_size", 1), to_pair(stride, "stride", 1)
    dh, dw = to_pair(dilation, "dilation", 1)
    top, bottom = same_padding(input.shape[-2], kh, sh, dh)
    left, right = same_padding(input.shape[-1], kw, sw, dw)
    if top == bottom == left == right == 0:
        return input
    return F.pad(input, (left, right, top, bottom), mode=mode)


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise 2-D convolution: ``depth_multiplier`` filters per input channel.

    A ``torch.nn.Conv2d`` with ``groups=in_channels`` (same ``weight`` and ``bias`` parameters and
    state dict), which also accepts TensorFlow's ``padding="same"`` at any stride.

    Args:
        in_channels: channels ``C`` of the input.
        kernel_size: kernel ``(kh, kw)`` or one int.
        depth_multiplier: filters per input channel; ``C * depth_multiplier`` channels come out.
        stride: stride ``(sh, sw)`` or one int.
        padding: zeros added on both sides ``(ph, pw)``, one int, ``"valid"`` (none) or ``"same"``
            (TensorFlow's rule, see :func:`same_padding`).
        dilation: spacing of the kernel taps ``(dh, dw)`` or one int.
        bias: add a learned bias per output channel.
        padding_mode: what the padding holds: ``"zeros"``, ``"reflect"``, ``"replicate"`` or
            ``"circular"`` (as in ``torch.nn.Conv2d``, for explicit and ``"same"`` padding).

    Shape:
        - input: ``(B, C, H, W)``
        - output: ``(B, C * depth_multiplier, H_out, W_out)``, where
          ``H_out = floor((H + 2 * ph - dh * (kh - 1) - 1) / sh) + 1``, or ``ceil(H / sh)`` for
          ``"same"``.

    Attributes:
        weight: ``Tensor[C * depth_multiplier, 1, kh, kw]``; row ``c * depth_multiplier + m`` is
            filter ``m`` of input channel ``c``.
        bias: ``Tensor[C * depth_multiplier]`` or ``None``.

    Example:
        >>> layer = DepthwiseConv2d(3, kernel_size=5, depth_multiplier=2)
        >>> layer(torch.rand(1, 3, 12, 12)).shape
        torch.Size([1, 6, 8, 8])
        >>> DepthwiseConv2d(3, 4, stride=2, padding="same")(torch.rand(1, 3, 13, 13)).shape
        torch.Size([1, 3, 7, 7])
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: int | tuple[int, int],
        depth_multiplier: int = 1,
        stride: int | tuple[int, int] = 1,
        padding: PaddingArg = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _pad_mode(padding_mode)
        check_int(in_channels, "in_channels")
        check_int(depth_multiplier, "depth_multiplier")
        pad = padding_pair(padding)
        super().__init__(
            in_channels,
            in_channels * depth_multiplier,
            to_pair(kernel_size, "kernel_size", 1),
            stride=to_pair(stride, "stride", 1),
            padding=(0, 0) if pad == "same" else pad,
            dilation=to_pair(dilation, "dilation", 1),
            groups=in_channels,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.depth_multiplier = depth_multiplier
        # torch's own "same" refuses strides above 1, so the padding is applied in forward().
        self.padding = pad

    def forward(self, input: Tensor) -> Tensor:
        """Convolve ``Tensor[B, C, H, W]`` into ``Tensor[B, C * depth_multiplier, H_out, W_out]``."""
        if self.padding != "same":
            return super().forward(input)
        padded = pad_same(input, self.kernel_size, self.stride, self.dilation, self.padding_mode)
        return F.conv2d(padded, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def extra_repr(self) -> str:
        parts = [f"{self.in_channels}", f"kernel_size={self.kernel_size}"]
        if self.depth_multiplier != 1:
            parts.append(f"depth_multiplier={self.depth_multiplier}")
        parts += _geometry_repr(self.stride, self.padding, self.dilation)
        if self.bias is None:
            parts.append("bias=False")
        if self.padding_mode != "zeros":
            parts.append(f"padding_mode={self.padding_mode!r}")
        return ", ".join(parts)
