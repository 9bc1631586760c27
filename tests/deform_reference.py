"""A naive, loop-based deformable convolution in NumPy: the tests' independent reference.

Written for clarity, not speed: one Python loop iteration per (image, offset group, tap, output
pixel), the bilinear interpolation spelled out corner by corner as in the DCN papers.
"""

from __future__ import annotations

import math

import numpy as np


def bilinear(plane: np.ndarray, y: float, x: float) -> np.ndarray:
    """Sample ``plane[..., H, W]`` at (y, x) with zeros outside; NaN/inf positions read zero."""
    height, width = plane.shape[-2:]
    if not (math.isfinite(y) and math.isfinite(x)):
        return np.zeros(plane.shape[:-2])
    if y <= -1 or y >= height or x <= -1 or x >= width:
        return np.zeros(plane.shape[:-2])
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = np.zeros(plane.shape[:-2])
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= yy < height and 0 <= xx < width:
                total = total + wy * wx * plane[..., yy, xx]
    return total


def deform_conv2d_naive(
    input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None
) -> np.ndarray:
    """Deformable convolution of NumPy arrays (or anything ``np.asarray`` takes), in float64."""
    x = np.asarray(input, dtype=np.float64)
    off = np.asarray(offset, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    batch, channels, _, _ = x.shape
    out_channels, cpg, kh, kw = w.shape
    groups = channels // cpg
    out_h, out_w = off.shape[2:]
    taps = kh * kw
    offset_groups = off.shape[1] // (2 * taps)
    channels_per_og = channels // offset_groups
    cols = np.zeros((batch, channels, taps, out_h, out_w))
    for b in range(batch):
        for g in range(offset_groups):
            planes = x[b, g * channels_per_og : (g + 1) * channels_per_og]
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    for oy in range(out_h):
                        for ox in range(out_w):
                            dy = off[b, 2 * (g * taps + k), oy, ox]
                            dx = off[b, 2 * (g * taps + k) + 1, oy, ox]
                            y = oy * stride[0] - padding[0] + i * dilation[0] + dy
                            xx = ox * stride[1] - padding[1] + j * dilation[1] + dx
                            value = bilinear(planes, y, xx)
                            if mask is not None:
                                value = value * float(np.asarray(mask)[b, g * taps + k, oy, ox])
                            cols[b, g * channels_per_og : (g + 1) * channels_per_og, k, oy, ox] = (
                                value
                            )
    out = np.zeros((batch, out_channels, out_h, out_w))
    opg = out_channels // groups
    for grp in range(groups):
        c = cols[:, grp * cpg : (grp + 1) * cpg].reshape(batch, cpg * taps, out_h * out_w)
        wg = w[grp * opg : (grp + 1) * opg].reshape(opg, cpg * taps)
        out[:, grp * opg : (grp + 1) * opg] = np.einsum("ok,bkp->bop", wg, c).reshape(
            batch, opg, out_h, out_w
        )
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64).reshape(1, -1, 1, 1)
    return out
