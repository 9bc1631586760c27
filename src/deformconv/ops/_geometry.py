"""Output-size arithmetic shared by the operators, their kernels and the layers above them."""

from __future__ import annotations

Pair = tuple[int, int]


def output_size(
    height: int, width: int, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair
) -> Pair:
    """Output ``(height, width)`` of a convolution, by the rule of ``F.conv2d``.

    ``kernel``, ``stride``, ``padding`` (on each side) and ``dilation`` are ``(height, width)``
    pairs. The result may be below 1 when the kernel does not fit; callers check it.

    Example:
        >>> output_size(56, 56, kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1))
        (28, 28)
    """
    out_h = (height + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return out_h, out_w
