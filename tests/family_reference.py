"""NumPy references for the convolution family, written the way TensorFlow documents them.

Channels-last (``NHWC``) arrays and Keras weight layouts, loops over output positions: an
independent check of the PyTorch layers, which are channels-first and use grouped convolutions.
"""

from __future__ import annotations

import numpy as np


def tf_same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "same" padding, as its convolution guide states it."""
    extent = dilation * (kernel - 1) + 1
    remainder = size % stride
    total = max(extent - (stride if remainder == 0 else remainder), 0)
    return total // 2, total - total // 2


def _pads(padding, size_h, size_w, kernel, stride, dilation):
    if padding == "same":
        return (
            tf_same_pads(size_h, kernel[0], stride[0], dilation[0]),
            tf_same_pads(size_w, kernel[1], stride[1], dilation[1]),
        )
    if padding == "valid":
        return (0, 0), (0, 0)
    return (padding[0], padding[0]), (padding[1], padding[1])


def depthwise_nhwc(x, kernel, stride=(1, 1), padding="valid", dilation=(1, 1)) -> np.ndarray:
    """Keras ``DepthwiseConv2D``: ``x[B, H, W, C]``, ``kernel[kh, kw, C, m]`` -> ``[B, Ho, Wo, C*m]``.

    Output channel ``c * m + j`` is filter ``j`` of input channel ``c``.
    """
    x = np.asarray(x, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    batch, height, width, channels = x.shape
    kh, kw, _, mult = kernel.shape
    (top, bottom), (left, right) = _pads(padding, height, width, (kh, kw), stride, dilation)
    padded = np.zeros((batch, height + top + bottom, width + left + right, channels))
    padded[:, top : top + height, left : left + width] = x
    out_h = (padded.shape[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (padded.shape[2] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((batch, out_h, out_w, channels, mult))
    for y in range(out_h):
        for x_ in range(out_w):
            for i in range(kh):
                for j in range(kw):
                    value = padded[
                        :, y * stride[0] + i * dilation[0], x_ * stride[1] + j * dilation[1]
                    ]
                    out[:, y, x_] += value[:, :, None] * kernel[i, j][None]
    return out.reshape(batch, out_h, out_w, channels * mult)


def separable_nhwc(
    x,
    depthwise_kernel,
    pointwise_kernel,
    bias=None,
    stride=(1, 1),
    padding="valid",
    dilation=(1, 1),
) -> np.ndarray:
    """Keras ``SeparableConv2D``: depthwise, then ``pointwise_kernel[1, 1, C*m, F]``, then bias."""
    mid = depthwise_nhwc(x, depthwise_kernel, stride, padding, dilation)
    out = mid @ np.asarray(pointwise_kernel, dtype=np.float64)[0, 0]
    if bias is not None:
        out = out + np.asarray(bias, dtype=np.float64)
    return out


_NUMPY_PAD_MODES = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "edge",
    "circular": "wrap",
}


def pad_nchw(x: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], mode: str) -> np.ndarray:
    """Pad the last two axes of an ``NCHW`` array the way ``torch.nn.Conv2d``'s padding modes
    are documented (reflect without repeating the edge, replicate the edge, wrap around), using
    NumPy's own modes."""
    return np.pad(x, ((0, 0), (0, 0), rows, cols), mode=_NUMPY_PAD_MODES[mode])
